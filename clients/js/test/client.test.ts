/**
 * Every RPC and every error class, against a real broker process, over both transports: the
 * node client (gRPC over HTTP/2) and the web client (grpc-web over Node's fetch, HTTP/1.1).
 */
import { type AddressInfo, type Socket, createServer } from "node:net";
import { inspect } from "node:util";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createNodeClient } from "../src/node.js";
import {
  type ClientOptions,
  ErrorKind,
  ServingStatus,
  TokenBrokerClient,
  TokenBrokerError,
  TokenKind,
  TokenState,
} from "../src/index.js";
import { createWebClient } from "../src/web.js";
import { type Broker, startBroker } from "./broker.js";
import { failure } from "./failure.js";

let broker: Broker;

beforeAll(async () => {
  broker = await startBroker();
}, 60_000);

afterAll(async () => {
  await broker?.stop();
});

/** Asserted claims for `email` on app client `web`. */
function claims(email: string) {
  return {
    subject: {
      case: "claims" as const,
      value: { email, clientId: "web", cognitoSub: "5f0c1a3e-0000-4000-8000-00000000000a" },
    },
  };
}

/** Returns a loopback port that was free a moment ago (bound, then closed). */
function closedPort(): Promise<number> {
  return new Promise((resolve) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** A TCP server on loopback that accepts connections, reads, and never writes a byte. */
async function silentServer(): Promise<{ baseUrl: string; close(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.resume();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    close: () =>
      new Promise((resolve) => {
        for (const socket of sockets) {
          socket.destroy();
        }
        server.close(() => resolve());
      }),
  };
}

/** Every way an error or a client can be printed, as one string. */
function printed(value: object): string {
  const parts = [String(value), JSON.stringify(value), inspect(value, { depth: 5 })];
  if (value instanceof Error) {
    parts.push(value.stack ?? "");
  }
  return parts.join("\n");
}

const transports: [string, (options: ClientOptions) => TokenBrokerClient][] = [
  ["node (gRPC)", createNodeClient],
  ["web (grpc-web)", createWebClient],
];

describe.each(transports)("%s client", (name, create) => {
  const short = name.split(" ")[0];
  const email = (who: string) => `${who}.${short}@example.com`;
  const as = (key?: string, timeoutMs?: number) =>
    create({ baseUrl: broker.baseUrl, apiKey: key, timeoutMs });

  test("health: the broker and its token service are serving", async () => {
    const client = as();
    expect(await client.checkHealth()).toBe(ServingStatus.SERVING);
    expect(await client.checkHealth("tokenbroker.v1.TokenBroker")).toBe(ServingStatus.SERVING);
  });

  test("IssueTokens, Introspect and RefreshTokens: a session lives and rotates", async () => {
    const issued = await as(broker.keys.trigger).issueTokens(claims(email("alice")));
    expect(issued.access?.secret).toMatch(/^\S{40,}$/);
    expect(issued.refresh?.tokenId).not.toBe("");
    expect(issued.replayed).toBe(false);

    const service = as(broker.keys.service);
    const facts = await service.introspect({ token: issued.access!.secret });
    expect(facts.active).toBe(true);
    expect(facts.kind).toBe(TokenKind.ACCESS);
    expect(facts.email).toBe(email("alice"));
    expect(facts.familyId).toBe(issued.familyId);
    expect(facts.clientId).toBe("web");

    // The refresh secret is the credential: no key.
    const rotated = await as().refreshTokens({
      refreshToken: issued.refresh!.secret,
      clientId: "web",
    });
    expect(rotated.familyId).toBe(issued.familyId);
    expect(rotated.access!.secret).not.toBe(issued.access!.secret);
    expect((await service.introspect({ token: rotated.access!.secret })).active).toBe(true);
  });

  test("IssueTokens with an idempotency key replays the same tokens", async () => {
    const trigger = as(broker.keys.trigger);
    const request = { ...claims(email("replay")), idempotencyKey: `key-${short}` };
    const first = await trigger.issueTokens(request);
    const second = await trigger.issueTokens(request);
    expect(second.replayed).toBe(true);
    expect(second.access!.tokenId).toBe(first.access!.tokenId);
  });

  test("Revoke by secret, token id, family and email, and ListTokens sees it", async () => {
    const trigger = as(broker.keys.trigger);
    const admin = as(broker.keys.admin);
    const service = as(broker.keys.service);
    const active = async (secret: string) => (await service.introspect({ token: secret })).active;

    // By secret, without a key: log-out.
    const a = await trigger.issueTokens(claims(email("bob")));
    await as().revoke({ target: { case: "token", value: a.access!.secret }, clientId: "web" });
    expect(await active(a.access!.secret)).toBe(false);
    expect(await active(a.refresh!.secret)).toBe(true);

    // By token id (admin): a refresh token takes its family with it.
    const byId = await admin.revoke({ target: { case: "tokenId", value: a.refresh!.tokenId } });
    expect(byId.revokedCount).toBe(1n);
    expect(await active(a.refresh!.secret)).toBe(false);

    // By family (admin).
    const b = await trigger.issueTokens(claims(email("bob")));
    const byFamily = await admin.revoke({ target: { case: "familyId", value: b.familyId } });
    expect(byFamily.revokedCount).toBe(2n);
    expect(await active(b.access!.secret)).toBe(false);

    // By email (admin): everything issued to the account so far.
    const c = await trigger.issueTokens(claims(email("bob")));
    const byEmail = await admin.revoke({ target: { case: "email", value: email("bob") } });
    expect(byEmail.revokedCount).toBe(2n);
    expect(await active(c.access!.secret)).toBe(false);

    // ListTokens (admin): every token, none active, no secrets.
    const page = await admin.listTokens({
      account: { case: "email", value: email("bob") },
      includeInactive: true,
    });
    expect(page.accountId).toBe(a.accountId);
    expect(page.tokens).toHaveLength(6);
    expect(page.tokens.every((t) => t.state === TokenState.REVOKED)).toBe(true);
    expect(JSON.stringify(page.tokens, (_, v) => (typeof v === "bigint" ? `${v}` : v))).not.toContain(
      a.access!.secret,
    );
  });

  test("a caller's interceptor runs on every call but never sees the key", async () => {
    const seen: (string | null)[] = [];
    const client = create({
      baseUrl: broker.baseUrl,
      apiKey: broker.keys.service,
      interceptors: [
        (next) => (req) => {
          seen.push(req.header.get("authorization"));
          req.header.set("authorization", "Bearer tbk_overwritten");
          return next(req);
        },
      ],
    });
    // The call is authenticated with the client's key all the same.
    expect((await client.introspect({ token: "x" })).active).toBe(false);
    expect(seen).toEqual([null]);
  });

  test("INVALID_ARGUMENT: a bad email", async () => {
    const err = await failure(as(broker.keys.trigger).issueTokens(claims("not-an-email")));
    expect(err.kind).toBe(ErrorKind.InvalidArgument);
    expect(err.message).toMatch(/email/);
  });

  test("UNAUTHENTICATED: an unknown key, no key, and a dead refresh secret", async () => {
    const unknown = await failure(as("tbk_not_a_key").introspect({ token: "x" }));
    expect(unknown.kind).toBe(ErrorKind.Unauthenticated);
    const none = await failure(as().introspect({ token: "x" }));
    expect(none.kind).toBe(ErrorKind.Unauthenticated);
    const dead = await failure(as().refreshTokens({ refreshToken: "tbr_not_a_token" }));
    expect(dead.kind).toBe(ErrorKind.Unauthenticated);
  });

  test("PERMISSION_DENIED: a service key lists tokens", async () => {
    const err = await failure(
      as(broker.keys.service).listTokens({ account: { case: "email", value: email("x") } }),
    );
    expect(err.kind).toBe(ErrorKind.PermissionDenied);
  });

  test("FAILED_PRECONDITION: a Cognito token where no pool is configured", async () => {
    const err = await failure(
      as(broker.keys.service).issueTokens({ subject: { case: "cognitoToken", value: "a.b.c" } }),
    );
    expect(err.kind).toBe(ErrorKind.FailedPrecondition);
  });

  test("DEADLINE_EXCEEDED: a peer that accepts the connection and never answers", async () => {
    // A broker that hangs (stopped in a debugger, its host overloaded) looks like this from the
    // client: the connection opens, no byte comes back. The deadline must end the call.
    const hung = await silentServer();
    try {
      const client = create({ baseUrl: hung.baseUrl, apiKey: broker.keys.trigger, timeoutMs: 300 });
      const started = Date.now();
      const err = await failure(client.issueTokens(claims(email("late"))));
      expect(err.kind, err.message).toBe(ErrorKind.DeadlineExceeded);
      expect(Date.now() - started).toBeLessThan(5_000);
      expect(printed(err)).not.toContain(broker.keys.trigger);
    } finally {
      await hung.close();
    }
  });

  test("UNAVAILABLE: a stopped broker, and a port nothing listens on", async () => {
    const stopped = await startBroker();
    const client = create({ baseUrl: stopped.baseUrl, apiKey: stopped.keys.service });
    try {
      expect((await client.introspect({ token: "x" })).active).toBe(false);
    } finally {
      await stopped.stop();
    }
    // Refused, or (over HTTP/2, when the client has not yet seen the broker's GOAWAY) a
    // session that went away: both are Unavailable.
    const gone = await failure(client.introspect({ token: "x" }));
    expect(gone.kind, gone.message).toBe(ErrorKind.Unavailable);
    expect(gone.code).toBe(Code.Unavailable);

    // A port that was just free: nothing listens, the connection is refused.
    const never = create({ baseUrl: `http://127.0.0.1:${await closedPort()}`, apiKey: broker.keys.service });
    const err = await failure(never.introspect({ token: "x" }));
    expect(err.kind).toBe(ErrorKind.Unavailable);
    expect(printed(err)).not.toContain(broker.keys.service);
  });

  test("secrets appear in no printed error or client", async () => {
    const issued = await as(broker.keys.trigger).issueTokens(claims(email("quiet")));
    const refresh = issued.refresh!.secret;
    // A refresh for another app client: PERMISSION_DENIED, with the secret in the request.
    const denied = await failure(as().refreshTokens({ refreshToken: refresh, clientId: "other" }));
    expect(denied.kind).toBe(ErrorKind.PermissionDenied);
    const badKey = await failure(as(`${broker.keys.admin}x`).revoke({
      target: { case: "token", value: refresh },
    }));
    expect(badKey.kind).toBe(ErrorKind.Unauthenticated);
    const client = as(broker.keys.admin);
    for (const value of [denied, badKey, client, client.options]) {
      const text = printed(value);
      expect(text).not.toContain(refresh);
      expect(text).not.toContain(broker.keys.admin);
    }
    expect(JSON.stringify(client.options)).toContain("[redacted]");
  });
});

describe.each(transports)("%s client, throttled", (_name, create) => {
  test("RESOURCE_EXHAUSTED carries retryAfter from RetryInfo", async () => {
    const client = create({ baseUrl: broker.baseUrl, apiKey: broker.keys.throttled });
    // A burst of one: of two calls at least one is refused (the first may take the bucket's
    // last token, or find it already spent by the other transport's test).
    const results = await Promise.allSettled([
      client.introspect({ token: "x" }),
      client.introspect({ token: "x" }),
    ]);
    const refused = results.find((r) => r.status === "rejected");
    expect(refused, "one of two calls is throttled").toBeDefined();
    const err = (refused as PromiseRejectedResult).reason as TokenBrokerError;
    expect(err).toBeInstanceOf(TokenBrokerError);
    expect(err.kind).toBe(ErrorKind.ResourceExhausted);
    const wait = err.retryAfter();
    expect(wait).toBeGreaterThan(0);
    expect(wait).toBeLessThanOrEqual(5_000);
    expect(JSON.parse(JSON.stringify(err))).toMatchObject({
      kind: "ResourceExhausted",
      code: "ResourceExhausted",
      retryAfterMs: wait,
    });
  });
});

describe("options", () => {
  test("bad options are refused with InvalidArgument, without echoing the key", () => {
    const bad = [
      { baseUrl: "127.0.0.1:50051" },
      { baseUrl: "ftp://127.0.0.1" },
      { baseUrl: "http://127.0.0.1", apiKey: "" },
      { baseUrl: "http://127.0.0.1", apiKey: "tbk_with space secret" },
      { baseUrl: "http://127.0.0.1", timeoutMs: 0 },
    ];
    for (const options of bad) {
      for (const create of [createNodeClient, createWebClient]) {
        let err: unknown;
        try {
          create(options);
        } catch (e) {
          err = e;
        }
        expect(err, JSON.stringify(options)).toBeInstanceOf(TokenBrokerError);
        expect((err as TokenBrokerError).kind).toBe(ErrorKind.InvalidArgument);
        expect(printed(err as Error)).not.toContain("secret");
      }
    }
  });
});
