/**
 * The example's movie API: `GET /movies` for any signed-in user. Each request is authorized
 * through the broker: Introspect (with `access_only`) of the bearer token, with a `service` API
 * key, over native gRPC (`createNodeClient`). Inactive → 401; the broker unreachable or
 * throttling → 503. Tokens are never logged: a line names the caller by email.
 *
 * Settings (environment):
 *   BROKER_URL           the broker's gRPC address (default http://127.0.0.1:50051)
 *   TB_SERVICE_KEY_FILE  a file holding the `service` API key, or
 *   TB_SERVICE_KEY       the key itself
 *   API_ALLOWED_ORIGINS  comma-separated origins of the page (CORS), e.g. http://127.0.0.1:5173
 *   API_HOST, API_PORT   where to listen (default 127.0.0.1:8787; port 0 picks a free one)
 *
 * It prints `movie api listening on http://HOST:PORT` once it listens.
 */
import { readFileSync } from "node:fs";
import { type IncomingMessage, type ServerResponse, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { ErrorKind, TokenBrokerError, createNodeClient } from "@tokenbroker/client/node";

const MOVIES = [
  { title: "Metropolis", year: 1927 },
  { title: "Seven Samurai", year: 1954 },
  { title: "Stalker", year: 1979 },
  { title: "Spirited Away", year: 2001 },
];

/** Broker errors that pass: the client may try again later (503). */
const PASSING: ErrorKind[] = [
  ErrorKind.Unavailable,
  ErrorKind.ResourceExhausted,
  ErrorKind.DeadlineExceeded,
];

function serviceKey(): string {
  const file = process.env.TB_SERVICE_KEY_FILE;
  const key = file ? readFileSync(file, "utf8").trim() : process.env.TB_SERVICE_KEY;
  if (!key) {
    throw new Error("set TB_SERVICE_KEY_FILE or TB_SERVICE_KEY to a `service` API key");
  }
  return key;
}

const broker = createNodeClient({
  baseUrl: process.env.BROKER_URL ?? "http://127.0.0.1:50051",
  apiKey: serviceKey(),
  timeoutMs: 3_000,
});
const origins = new Set(
  (process.env.API_ALLOWED_ORIGINS ?? "")
    .split(",")
    .map((origin) => origin.trim())
    .filter((origin) => origin !== ""),
);

function send(response: ServerResponse, status: number, body: unknown, headers = {}) {
  response.writeHead(status, { "content-type": "application/json", ...headers });
  response.end(JSON.stringify(body));
}

/** CORS for the page's origin: the page sends `authorization`, and reads JSON back. */
function cors(request: IncomingMessage, response: ServerResponse) {
  const origin = request.headers.origin;
  if (origin !== undefined && origins.has(origin)) {
    response.setHeader("access-control-allow-origin", origin);
    response.setHeader("vary", "origin");
    response.setHeader("access-control-allow-headers", "authorization");
    response.setHeader("access-control-allow-methods", "GET");
    response.setHeader("access-control-max-age", "600");
  }
}

async function movies(request: IncomingMessage, response: ServerResponse) {
  const token = request.headers.authorization?.match(/^Bearer (\S+)$/)?.[1];
  if (token === undefined) {
    send(response, 401, { error: "no bearer token" }, { "www-authenticate": "Bearer" });
    return;
  }
  let facts;
  try {
    facts = await broker.introspect({ token, accessOnly: true });
  } catch (err) {
    // A TokenBrokerError holds no token, so it is safe to log whole.
    console.error(`introspect failed: ${err}`);
    const passing = err instanceof TokenBrokerError && PASSING.includes(err.kind);
    send(response, passing ? 503 : 500, { error: "cannot check the token now" });
    return;
  }
  if (!facts.active) {
    console.log("GET /movies 401 (inactive token)");
    send(
      response,
      401,
      { error: "invalid_token" },
      { "www-authenticate": 'Bearer error="invalid_token"' },
    );
    return;
  }
  console.log(`GET /movies 200 ${facts.email} (token ${facts.tokenId})`);
  send(response, 200, { user: facts.email, movies: MOVIES });
}

const server = createServer((request, response) => {
  cors(request, response);
  const path = new URL(request.url ?? "/", "http://localhost").pathname;
  if (request.method === "OPTIONS") {
    response.writeHead(204).end();
  } else if (request.method === "GET" && path === "/movies") {
    movies(request, response).catch((err: unknown) => {
      console.error(`GET /movies failed: ${err}`);
      if (!response.headersSent) send(response, 500, { error: "internal error" });
    });
  } else if (request.method === "GET" && path === "/health") {
    send(response, 200, { ok: true });
  } else {
    send(response, 404, { error: "not found" });
  }
});

const host = process.env.API_HOST ?? "127.0.0.1";
server.listen(Number(process.env.API_PORT ?? 8787), host, () => {
  const { port } = server.address() as AddressInfo;
  console.log(`movie api listening on http://${host}:${port}`);
});
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
