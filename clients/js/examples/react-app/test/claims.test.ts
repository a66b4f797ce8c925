/**
 * The page's other token source, `tokens: "claims"`: the broker's tokens read from the ID
 * token's claims, where the trigger put them. moto runs no trigger, so this test plays it, in
 * Node rather than Chromium: a pair minted with the `trigger` key (IssueTokens with asserted
 * claims, the call the trigger makes) is written into the trigger's claims
 * (`fauna_access_token`, `fauna_refresh_token`) of an ID-token-shaped JWT. That JWT is
 * unsigned, unlike Cognito's: the page only reads its claims (Cognito signed the real one, and
 * the broker verifies nothing of it on this path). Then the page's session code (src/session.ts)
 * runs against the real broker and the movie API.
 */
import { createNodeClient } from "@tokenbroker/client/node";
import { afterAll, beforeAll, expect, test } from "vitest";
import { type Broker, startBroker } from "../../../test/broker.js";
import type { AppConfig } from "../src/config.js";
import { BrokerSession, SessionEnded } from "../src/session.js";
import { type Api, startApi } from "./api.js";

const ACCESS_TTL_SECONDS = 3;
const CLIENT_ID = "movies-claims-client";

let broker: Broker;
let api: Api;

beforeAll(async () => {
  broker = await startBroker(`[tokens]\naccess_ttl_seconds = ${ACCESS_TTL_SECONDS}`);
  api = await startApi(broker.baseUrl, broker.keys.service);
}, 60_000);

afterAll(async () => {
  await api?.stop();
  await broker?.stop();
});

const config = (): AppConfig => ({
  cognito: { userPoolId: "us-east-1_Claims0001", clientId: CLIENT_ID },
  brokerUrl: broker.baseUrl,
  apiUrl: api.url,
  tokens: "claims",
  accessClaim: "fauna_access_token",
  refreshClaim: "fauna_refresh_token",
});

/** What the trigger does at sign-in: mint a pair for the user, and put it into claims. */
async function idTokenWithClaims(email: string, withRefresh: boolean) {
  const trigger = createNodeClient({ baseUrl: broker.baseUrl, apiKey: broker.keys.trigger });
  const pair = await trigger.issueTokens({
    subject: { case: "claims", value: { email, clientId: CLIENT_ID } },
  });
  const claims = {
    sub: `sub-${email}`,
    email,
    token_use: "id",
    fauna_access_token: pair.access!.secret,
    ...(withRefresh ? { fauna_refresh_token: pair.refresh!.secret } : {}),
  };
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return { idToken: `${part({ alg: "none" })}.${part(claims)}.`, pair };
}

const pastTheTtl = () => new Promise((done) => setTimeout(done, (ACCESS_TTL_SECONDS + 1) * 1000));

test("a session from the trigger's claims calls the API, rotates on a 401, and logs out", async () => {
  const email = "bob@example.com";
  const { idToken, pair } = await idTokenWithClaims(email, true);
  const session = await BrokerSession.start(config(), idToken);
  expect(session.info).toEqual({ email, accessTokenId: "", familyId: "", rotations: 0 });
  expect((await session.fetch("/movies")).status).toBe(200);

  await pastTheTtl();
  const rotated = await session.fetch("/movies");
  expect(rotated.status).toBe(200);
  expect(session.info.rotations).toBe(1);
  expect(session.info.accessTokenId).toMatch(/^tok_/);
  expect(session.info.familyId).toBe(pair.familyId);

  const admin = createNodeClient({ baseUrl: broker.baseUrl, apiKey: broker.keys.admin });
  const active = async () =>
    (await admin.listTokens({ account: { case: "email", value: email } })).tokens.length;
  expect(await active()).toBeGreaterThan(0);
  await session.logOut();
  expect(await active()).toBe(0);
  await expect(session.fetch("/movies")).rejects.toBeInstanceOf(SessionEnded);
}, 30_000);

test("without the refresh claim, an expired access token ends the session", async () => {
  const { idToken } = await idTokenWithClaims("carol@example.com", false);
  const session = await BrokerSession.start(config(), idToken);
  expect((await session.fetch("/movies")).status).toBe(200);
  await pastTheTtl();
  await expect(session.fetch("/movies")).rejects.toThrow(/no refresh token/);
}, 30_000);

test("an ID token without the access claim is refused at the start", async () => {
  const part = (value: object) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const idToken = `${part({ alg: "none" })}.${part({ sub: "s", email: "dan@example.com" })}.`;
  await expect(BrokerSession.start(config(), idToken)).rejects.toThrow(
    /no fauna_access_token claim/,
  );
});
