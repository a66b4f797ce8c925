/**
 * The browser test: the example app in headless Chromium (Debian's `chromium`, driven by
 * playwright-core; no downloaded browser), against real components on 127.0.0.1:
 *
 * - Cognito: moto's server (`python3 -m moto.server`), with a user pool, an app client that
 *   allows USER_PASSWORD_AUTH, and a confirmed user, made through Cognito's own JSON API.
 *   moto deviates from Cognito where it matters here: its ID tokens are signed with one fixed
 *   key (`kid` "dummy") served at `/<poolId>/.well-known/jwks.json` on its own port rather than
 *   at the issuer, it says `email_verified` as the string "true", and it runs no Lambda trigger
 *   (so the page gets its tokens by direct exchange).
 * - The broker: `$TOKENBROKER_BIN` (the release build under scripts/test), or
 *   target/debug/tokenbroker, with grpc-web on, the page's origin allowed, a 5 s access TTL, and moto's pool trusted with
 *   `direct_exchange = true`.
 * - The movie API (dist-api/server.js, `node`), which introspects with a `service` key.
 * - The page, built by `vite build` (dist/), served by a small static server with the run's
 *   `config.json`.
 *
 * The tests are the walk's steps, in order; each needs the one before. Screenshots of every
 * step go to target/browser-test/ (or $BROWSER_TEST_OUT).
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { type Server, createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { dirname, extname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import {
  type Browser,
  type BrowserContext,
  type Page,
  type Request,
  chromium,
} from "playwright-core";
import { ErrorKind, TokenBrokerError, createWebClient } from "@tokenbroker/client/web";
import { afterAll, beforeAll, expect, test } from "vitest";
import {
  type Broker,
  brokerBinary,
  spawnSupervised,
  startBroker,
  terminate,
} from "../../../test/broker.js";
import { type Api, startApi } from "./api.js";

const APP = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const REPO = resolve(APP, "../../../..");
const OUT = process.env.BROWSER_TEST_OUT ?? join(REPO, "target/browser-test");
const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
/** The access tokens' lifetime: short, so the walk sees one expire. */
const ACCESS_TTL_SECONDS = 5;
/** How long one step may wait for the page (a loaded 2-core machine). */
const STEP_MS = 30_000;

const EMAIL = "alice@example.com";
// moto checks Cognito's default password policy: upper and lower case, a digit, a symbol.
const PASSWORD = `Movies-${randomBytes(6).toString("hex")}-A1`;

const started = Date.now();
let moto: { url: string; stop: () => Promise<void> };
let pool: { userPoolId: string; clientId: string };
let site: { origin: string; server: Server; config: Record<string, unknown> };
let broker: Broker;
let api: Api;
let browser: Browser;

/** Everything the pages sent and got, seen from outside the page. */
interface Seen {
  url: string;
  method: string;
  authorization?: string;
  status?: number;
  /** The refresh secret in an IssueTokens or RefreshTokens answer, read off the wire. */
  refreshSecret?: string;
}
/** A refresh secret's exact form (broker/src/model/secret.rs). */
const REFRESH_SECRET = /tbr_[0-9a-f]{32}_[A-Za-z0-9_-]{43}/;
const seen: Seen[] = [];
const consoleLines: string[] = [];

/** A free port on loopback (for moto, which takes no port 0). */
async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((done) => probe.listen(0, "127.0.0.1", done));
  const { port } = probe.address() as AddressInfo;
  await new Promise<void>((done) => probe.close(() => done()));
  return port;
}

/** Polls `check` every 200 ms until it holds, for at most `ms`. */
async function until(what: string, check: () => Promise<boolean> | boolean, ms = STEP_MS) {
  const end = Date.now() + ms;
  for (;;) {
    try {
      if (await check()) return;
    } catch {
      // not yet
    }
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((done) => setTimeout(done, 200));
  }
}

async function startMoto() {
  const port = await freePort();
  const child = spawnSupervised(
    "python3",
    ["-m", "moto.server", "-H", "127.0.0.1", "-p", `${port}`],
    {
      ...process.env,
    },
  );
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-4000);
  });
  child.stdout?.resume();
  const url = `http://127.0.0.1:${port}`;
  await until(
    "moto to listen",
    async () => child.exitCode === null && (await fetch(`${url}/moto-api/`)).status < 500,
  ).catch((err: Error) => {
    child.stdin?.end();
    throw new Error(`${err.message}; moto's stderr: ${stderr}`);
  });
  return { url, stop: () => terminate(child) };
}

/** One call of Cognito's JSON API on moto (moto checks no signature; the region is us-east-1). */
async function cognito(action: string, body: unknown): Promise<Record<string, any>> {
  const response = await fetch(moto.url, {
    method: "POST",
    headers: {
      "content-type": "application/x-amz-json-1.1",
      "x-amz-target": `AWSCognitoIdentityProviderService.${action}`,
      authorization:
        "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/cognito-idp/aws4_request, " +
        "SignedHeaders=host, Signature=0",
    },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`Cognito ${action}: ${response.status} ${text}`);
  return JSON.parse(text || "{}");
}

/** The user pool, its app client and a confirmed user whose email is verified. */
async function makePool() {
  const { UserPool } = await cognito("CreateUserPool", {
    PoolName: "movies",
    UsernameAttributes: ["email"],
    AutoVerifiedAttributes: ["email"],
  });
  const userPoolId: string = UserPool.Id;
  const { UserPoolClient } = await cognito("CreateUserPoolClient", {
    UserPoolId: userPoolId,
    ClientName: "movies-web",
    ExplicitAuthFlows: ["ALLOW_USER_PASSWORD_AUTH", "ALLOW_REFRESH_TOKEN_AUTH"],
    // Without these, moto's ID tokens lack `email_verified`, which the broker requires.
    ReadAttributes: ["email", "email_verified"],
  });
  await cognito("AdminCreateUser", {
    UserPoolId: userPoolId,
    Username: EMAIL,
    UserAttributes: [
      { Name: "email", Value: EMAIL },
      { Name: "email_verified", Value: "true" },
    ],
    MessageAction: "SUPPRESS",
  });
  await cognito("AdminSetUserPassword", {
    UserPoolId: userPoolId,
    Username: EMAIL,
    Password: PASSWORD,
    Permanent: true,
  });
  return { userPoolId, clientId: UserPoolClient.ClientId as string };
}

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript",
  ".css": "text/css",
  ".json": "application/json",
  ".svg": "image/svg+xml",
};

/** Serves dist/ (the `vite build` output) and the run's config.json. */
async function serveSite() {
  const dist = join(APP, "dist");
  const config: Record<string, unknown> = {};
  const server = createServer((request, response) => {
    const path = new URL(request.url ?? "/", "http://localhost").pathname;
    if (path === "/config.json") {
      response.writeHead(200, { "content-type": TYPES[".json"], "cache-control": "no-store" });
      response.end(JSON.stringify(config));
      return;
    }
    const file = normalize(join(dist, path === "/" ? "index.html" : path));
    try {
      if (!file.startsWith(dist)) throw new Error("outside dist");
      const body = readFileSync(file);
      response.writeHead(200, {
        "content-type": TYPES[extname(file)] ?? "application/octet-stream",
      });
      response.end(body);
    } catch {
      response.writeHead(404).end();
    }
  });
  await new Promise<void>((done) => server.listen(0, "127.0.0.1", done));
  const { port } = server.address() as AddressInfo;
  return { origin: `http://127.0.0.1:${port}`, server, config };
}

/** A new browser context (its own memory, cookies and storage) with its traffic recorded. */
async function newTab(): Promise<{ context: BrowserContext; page: Page }> {
  const context = await browser.newContext({ viewport: { width: 900, height: 640 } });
  const entries = new WeakMap<Request, Seen>();
  context.on("request", (request) => {
    const entry = {
      url: request.url(),
      method: request.method(),
      authorization: request.headers().authorization,
    };
    entries.set(request, entry);
    seen.push(entry);
  });
  context.on("response", (response) => {
    const entry = entries.get(response.request());
    if (entry === undefined) return;
    entry.status = response.status();
    if (/\/(IssueTokens|RefreshTokens)$/.test(entry.url)) {
      // The grpc-web answer is protobuf; the secret is a plain string field in it.
      response.body().then(
        (body) => {
          entry.refreshSecret = body.toString("latin1").match(REFRESH_SECRET)?.[0];
        },
        () => {},
      );
    }
  });
  const page = await context.newPage();
  page.on("console", (message) => consoleLines.push(message.text()));
  page.on("pageerror", (err) => consoleLines.push(`pageerror: ${err.message}`));
  page.setDefaultTimeout(STEP_MS);
  return { context, page };
}

const shot = (page: Page, name: string) =>
  page.screenshot({ path: join(OUT, `${name}.png`), fullPage: true });
const text = async (page: Page, testId: string) =>
  ((await page.getByTestId(testId).textContent()) ?? "").trim();
const isBroker = (method: string) => (s: Seen) =>
  s.url === `${broker.baseUrl}/tokenbroker.v1.TokenBroker/${method}` && s.method === "POST";
const isApi = (s: Seen) => s.url === `${api.url}/movies` && s.method === "GET";
const isCognito = (s: Seen) => s.url.startsWith(moto.url);
/** The statuses of the API calls after the first `from`, once every one has its answer. */
async function apiStatuses(from = 0): Promise<(number | undefined)[]> {
  const calls = () => seen.filter(isApi).slice(from);
  await until("the API's answers", () => calls().every((s) => s.status !== undefined));
  return calls().map((s) => s.status);
}

async function signIn(page: Page) {
  await page.goto(`${site.origin}/`);
  await page.getByLabel("Email").fill(EMAIL);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByTestId("movies").locator("li").first().waitFor();
}

beforeAll(async () => {
  rmSync(OUT, { recursive: true, force: true });
  mkdirSync(OUT, { recursive: true });
  moto = await startMoto();
  pool = await makePool();
  site = await serveSite();
  broker = await startBroker(
    [
      "[tokens]",
      `access_ttl_seconds = ${ACCESS_TTL_SECONDS}`,
      "[[cognito.pools]]",
      `issuer = "https://cognito-idp.us-east-1.amazonaws.com/${pool.userPoolId}"`,
      `jwks_url = "${moto.url}/${pool.userPoolId}/.well-known/jwks.json"`,
      `client_ids = ["${pool.clientId}"]`,
      "direct_exchange = true",
    ].join("\n"),
    [site.origin],
  );
  api = await startApi(broker.baseUrl, broker.keys.service, site.origin);
  Object.assign(site.config, {
    cognito: { ...pool, endpoint: `${moto.url}/` },
    brokerUrl: broker.baseUrl,
    apiUrl: api.url,
    tokens: "direct",
  });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // --no-sandbox: Chromium's sandbox cannot start as root (CI runs as root). The rest keep
    // it from trying hosts it cannot reach.
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}, 120_000);

afterAll(async () => {
  await browser?.close();
  await api?.stop();
  await broker?.stop();
  await moto?.stop();
  await new Promise((done) => (site ? site.server.close(done) : done(undefined)));
  if (api) writeFileSync(join(OUT, "api.log"), api.log());
  writeFileSync(join(OUT, "console.log"), consoleLines.join("\n"));
  console.log(
    `browser test: ${((Date.now() - started) / 1000).toFixed(1)} s; screenshots in ${OUT}`,
  );
});

let first: { context: BrowserContext; page: Page };
let signedInAt = 0;
let firstAccessId = "";

test("sign-in: the protected movie list loads", async () => {
  first = await newTab();
  const { page } = first;
  await signIn(page);
  signedInAt = Date.now();
  expect(await text(page, "status")).toBe(`Signed in as ${EMAIL}`);
  expect(await page.getByTestId("movies").locator("li").count()).toBe(4);
  firstAccessId = await text(page, "access-id");
  expect(firstAccessId).toMatch(/^tok_/);
  expect(await text(page, "rotations")).toBe("0");
  // The sign-in went to moto (so step 2 can tell a new one), the tokens came by direct
  // exchange (one IssueTokens), and the API let the access token in.
  expect(seen.filter(isCognito).length).toBeGreaterThan(0);
  expect(seen.filter(isBroker("IssueTokens"))).toHaveLength(1);
  expect(await apiStatuses()).toEqual([200]);
  // In memory only: nothing in the page's storage or cookies.
  const kept = await page.evaluate(() => [
    localStorage.length,
    sessionStorage.length,
    document.cookie,
  ]);
  expect(kept).toEqual([0, 0, ""]);
  await shot(page, "1-signed-in");
});

test("the access token expires and is rotated without a new sign-in", async () => {
  const { page } = first;
  const cognitoCalls = seen.filter(isCognito).length;
  const apiCalls = seen.filter(isApi).length;
  // The one wait that is a sleep: until the access token is past its TTL.
  const wait = signedInAt + (ACCESS_TTL_SECONDS + 1) * 1000 - Date.now();
  await new Promise((done) => setTimeout(done, Math.max(0, wait)));

  await page.getByRole("button", { name: "Reload movies" }).click();
  // The second call of the page done: its counter counts calls that got an answer.
  await page.waitForFunction(
    () => document.querySelector('[data-testid="api-calls"]')?.textContent === "2",
  );
  expect(await text(page, "rotations")).toBe("1");
  const rotatedId = await text(page, "access-id");
  expect(rotatedId).toMatch(/^tok_/);
  expect(rotatedId).not.toBe(firstAccessId);
  expect(await page.getByTestId("movies").locator("li").count()).toBe(4);
  // The API refused the expired token, the page rotated over grpc-web, and the retry passed.
  expect(await apiStatuses(apiCalls)).toEqual([401, 200]);
  expect(seen.filter(isBroker("RefreshTokens"))).toHaveLength(1);
  // Without a new sign-in: Cognito was not called again.
  expect(seen.filter(isCognito)).toHaveLength(cognitoCalls);
  expect(await text(page, "status")).toBe(`Signed in as ${EMAIL}`);
  await shot(page, "2-refreshed");
});

test('"Log out" revokes the session; the next API call is refused', async () => {
  const { page } = first;
  const callFromPage = (authorization: string) =>
    page.evaluate(
      async ([url, authorization]) => (await fetch(url, { headers: { authorization } })).status,
      [`${api.url}/movies`, authorization] as const,
    );
  const lastAccepted = async () => {
    await apiStatuses();
    return seen.filter((s) => isApi(s) && s.status === 200).at(-1)!.authorization!;
  };
  // Before: the API accepts the page's current access token, so the 401 below is the log-out's
  // doing, not the token's expiry. Should it have expired meanwhile (a slow machine), the page
  // rotates on "Reload movies" and the check is made with the new one.
  let bearer = await lastAccepted();
  for (let attempt = 1; (await callFromPage(bearer)) !== 200; attempt++) {
    expect(attempt, "the page's access token expires before it can be checked").toBeLessThan(4);
    const calls = await text(page, "api-calls");
    await page.getByRole("button", { name: "Reload movies" }).click();
    await page.waitForFunction(
      (before) => document.querySelector('[data-testid="api-calls"]')?.textContent !== before,
      calls,
    );
    bearer = await lastAccepted();
  }
  expect(bearer).toMatch(/^Bearer tba_/);
  const rotation = seen.filter(isBroker("RefreshTokens")).at(-1)!;
  await until("the rotated refresh secret", () => rotation.refreshSecret !== undefined);

  await page.getByRole("button", { name: "Log out" }).click();
  await page.getByText("Logged out: the broker revoked the session.").waitFor();
  // The page forgot its tokens. The access token it used last is refused by the API now, and
  // the refresh token by the broker (its lifetime is an hour: this is the Revoke's doing): the
  // log-out ended the whole session.
  expect(await callFromPage(bearer)).toBe(401);
  const refused = await createWebClient({ baseUrl: broker.baseUrl })
    .refreshTokens({ refreshToken: rotation.refreshSecret!, clientId: pool.clientId })
    .then(
      () => undefined,
      (err: unknown) => err,
    );
  expect(refused).toBeInstanceOf(TokenBrokerError);
  expect((refused as TokenBrokerError).kind).toBe(ErrorKind.Unauthenticated);
  expect(await text(page, "status")).toBe("Signed out");
  expect(seen.filter(isBroker("Revoke"))).toHaveLength(1);
  await shot(page, "3-logged-out");
});

test("a second tab, signed in, is refused after tokenbroker-admin revokes the user", async () => {
  const { context, page } = await newTab();
  try {
    await signIn(page);
    expect(await text(page, "status")).toBe(`Signed in as ${EMAIL}`);
    await shot(page, "4-second-tab");

    const admin =
      process.env.TOKENBROKER_ADMIN_BIN ?? join(dirname(brokerBinary()), "tokenbroker-admin");
    const { stdout } = await promisify(execFile)(admin, ["revoke", "--email", EMAIL], {
      env: { ...process.env, TB_ENDPOINT: broker.baseUrl, TB_API_KEY: broker.keys.admin },
      timeout: STEP_MS,
    });
    expect(stdout).toMatch(/revoked/i);

    const apiCalls = seen.filter(isApi).length;
    const refreshes = seen.filter(isBroker("RefreshTokens")).length;
    await page.getByRole("button", { name: "Reload movies" }).click();
    await page.getByText(/^Refused: /).waitFor();
    expect(await text(page, "status")).toBe("Signed out");
    // The API refused the revoked access token, and the broker the refresh token.
    expect(await apiStatuses(apiCalls)).toEqual([401]);
    expect(seen.filter(isBroker("RefreshTokens"))).toHaveLength(refreshes + 1);
    await shot(page, "5-revoked");
  } finally {
    await context.close();
  }
});

test("no token reached the console, the API's log or the page's storage", async () => {
  const secrets = seen
    .flatMap((s) => [s.authorization?.replace(/^Bearer /, ""), s.refreshSecret])
    .filter((s): s is string => s !== undefined && s !== "");
  // The ID token (direct exchange) and access tokens were all seen on the wire.
  expect(secrets.some((s) => s.startsWith("eyJ"))).toBe(true);
  expect(secrets.some((s) => s.startsWith("tba_"))).toBe(true);
  expect(secrets.some((s) => s.startsWith("tbr_"))).toBe(true);
  const printed = `${consoleLines.join("\n")}\n${api.log()}`;
  for (const secret of secrets) {
    expect(printed).not.toContain(secret);
  }
  expect(printed).not.toMatch(/tb[ar]_[A-Za-z0-9]/);
});
