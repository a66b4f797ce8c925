/**
 * Direct exchange over grpc-web, as a browser page does it: the signed-in user's own Cognito
 * ID token is the only credential (no API key), exchanged for that user's tokens. Against a
 * real broker process that trusts a pool double whose JWKS is served on loopback.
 */
import { afterAll, beforeAll, expect, test } from "vitest";
import { ErrorKind } from "../src/index.js";
import { createWebClient } from "../src/web.js";
import { type Broker, startBroker } from "./broker.js";
import { CLIENT_ID, type TestPool, startPool } from "./cognito.js";
import { failure } from "./failure.js";

let pool: TestPool;
let broker: Broker;

beforeAll(async () => {
  pool = await startPool();
  broker = await startBroker(pool.config(true));
}, 60_000);

afterAll(async () => {
  await broker?.stop();
  await pool?.close();
});

const exchange = (token: string) => ({ subject: { case: "cognitoToken" as const, value: token } });

test("a user's own ID token, as the only credential, exchanges for that user's tokens", async () => {
  const idToken = pool.idToken("Grace@Example.com", "sub-grace");
  const page = createWebClient({ baseUrl: broker.baseUrl, apiKey: idToken });
  const issued = await page.issueTokens(exchange(idToken));

  const service = createWebClient({ baseUrl: broker.baseUrl, apiKey: broker.keys.service });
  const facts = await service.introspect({ token: issued.access!.secret });
  expect(facts.active).toBe(true);
  expect(facts.email).toBe("grace@example.com");
  expect(facts.cognitoSub).toBe("sub-grace");
  expect(facts.clientId).toBe(CLIENT_ID);

  // The page rotates without any credential, as for any pair.
  const anonymous = createWebClient({ baseUrl: broker.baseUrl });
  const rotated = await anonymous.refreshTokens({
    refreshToken: issued.refresh!.secret,
    clientId: CLIENT_ID,
  });
  expect(rotated.familyId).toBe(issued.familyId);
});

test("the ID token exchanges only itself, and is no credential for anything else", async () => {
  const idToken = pool.idToken("heidi@example.com", "sub-heidi");
  const page = createWebClient({ baseUrl: broker.baseUrl, apiKey: idToken });
  const other = pool.idToken("ivan@example.com", "sub-ivan");
  const mismatch = await failure(page.issueTokens(exchange(other)));
  expect(mismatch.kind).toBe(ErrorKind.PermissionDenied);
  const introspect = await failure(page.introspect({ token: "tba_x" }));
  expect(introspect.kind).toBe(ErrorKind.PermissionDenied);

  const expired = pool.idToken("heidi@example.com", "sub-heidi", -600);
  const err = await failure(
    createWebClient({ baseUrl: broker.baseUrl, apiKey: expired }).issueTokens(exchange(expired)),
  );
  expect(err.kind).toBe(ErrorKind.Unauthenticated);
  expect(`${err} ${JSON.stringify(err)}`).not.toContain(expired);
});

test("a pool without direct exchange refuses the ID token as a credential", async () => {
  const strict = await startBroker(pool.config(false));
  try {
    const idToken = pool.idToken("judy@example.com", "sub-judy");
    const page = createWebClient({ baseUrl: strict.baseUrl, apiKey: idToken });
    const err = await failure(page.issueTokens(exchange(idToken)));
    expect(err.kind).toBe(ErrorKind.Unauthenticated);
  } finally {
    await strict.stop();
  }
}, 60_000);
