/**
 * A real `tokenbroker` process for the tests: a generated config (embedded store in a
 * temporary directory, API keys made by `tokenbroker gen-key`, grpc-web on), listening on a
 * port the OS picks, read back from the line the broker prints on stdout.
 *
 * The binary is `$TOKENBROKER_BIN`, or the workspace's debug build (`cargo build -p
 * tokenbroker`; `scripts/test` runs these tests after `cargo test`, which builds it).
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

/** The origin the test brokers allow for grpc-web pages. */
export const APP_ORIGIN = "https://app.example.com";

/** The name of the API key whose rate limit is tiny (one call, then RESOURCE_EXHAUSTED). */
const THROTTLED = "js-throttled";

/** The API keys of a test broker. */
export interface Keys {
  admin: string;
  trigger: string;
  service: string;
  /** Role service, limited to a burst of one call and one more every 5 s. */
  throttled: string;
}

/** A running broker. */
export interface Broker {
  /** `http://127.0.0.1:PORT`. */
  baseUrl: string;
  keys: Keys;
  /** Sends the broker SIGTERM and waits for it to exit; removes its directory. */
  stop(): Promise<void>;
}

/** Returns the broker binary, or throws saying how to get one. */
export function brokerBinary(): string {
  const path = process.env.TOKENBROKER_BIN ?? join(REPO, "target/debug/tokenbroker");
  if (!existsSync(path)) {
    throw new Error(
      `no broker binary at ${path}: run \`cargo build -p tokenbroker\` at the repository root, ` +
        "or set TOKENBROKER_BIN",
    );
  }
  return path;
}

/**
 * Runs a program (`$0 "$@"`) under a small shell that also stops it when its stdin closes:
 * `stop()` closes it, and so does the end of the test process, however it ends. A test that
 * throws before its `stop()` would otherwise leave a broker running after the tests (seen
 * once), and a `process.on("exit")` hook does not run when vitest ends a worker. The shell
 * exits when the program does, with its status. (A background job's stdin is /dev/null, hence
 * the copy of it as fd 3.)
 */
const SUPERVISE = `exec 3<&0
"$0" "$@" <&- & pid=$!
{ cat <&3 >/dev/null; kill -TERM "$pid" 2>/dev/null; } &
exec 3<&-
wait "$pid"`;

/**
 * Starts `program` with `args` under {@link SUPERVISE}: its stdout and stderr are pipes, and
 * {@link terminate} (or the end of the test process) sends it SIGTERM.
 */
export function spawnSupervised(
  program: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): ChildProcess {
  return spawn("sh", ["-c", SUPERVISE, program, ...args], {
    stdio: ["pipe", "pipe", "pipe"],
    env,
  });
}

/** Makes an API key with `gen-key`: the key, and its `[[api_keys]]` entry. */
function genKey(binary: string, name: string, role: string): { key: string; entry: string } {
  const out = execFileSync(binary, ["gen-key", "--name", name, "--role", role], {
    encoding: "utf8",
  });
  const lines = out.split("\n");
  const key = lines[1]?.trim() ?? "";
  const at = lines.findIndex((line) => line.startsWith("Config entry:"));
  if (!key.startsWith("tbk_") || at < 0) {
    throw new Error("unexpected gen-key output");
  }
  const entry = lines
    .slice(at + 1)
    .map((line) => line.replace(/^ {2}/, ""))
    .join("\n");
  return { key, entry };
}

/**
 * Starts a broker and waits (at most 30 s) until it listens. `extraConfig` is TOML appended
 * to the generated config (tables only, such as a `[[cognito.pools]]` entry, or `[tokens]`);
 * `origins` are the pages allowed to call it over grpc-web (`server.cors.allowed_origins`).
 */
export async function startBroker(extraConfig = "", origins = [APP_ORIGIN]): Promise<Broker> {
  const binary = brokerBinary();
  const dir = mkdtempSync(join(tmpdir(), "tokenbroker-js-"));
  const made = {
    admin: genKey(binary, "js-admin", "admin"),
    trigger: genKey(binary, "js-trigger", "trigger"),
    service: genKey(binary, "js-service", "service"),
    throttled: genKey(binary, THROTTLED, "service"),
  };
  const config = [
    "[server]",
    'listen = "127.0.0.1:0"',
    "grpc_web = true",
    "shutdown_grace_seconds = 2",
    "[server.cors]",
    `allowed_origins = ${JSON.stringify(origins)}`,
    "[store.embedded]",
    `dir = ${JSON.stringify(join(dir, "data"))}`,
    `[limits.callers.${THROTTLED}]`,
    "per_second = 0.2",
    "burst = 1",
    "",
    ...Object.values(made).map((k) => k.entry),
    extraConfig,
  ].join("\n");
  const configPath = join(dir, "tokenbroker.toml");
  writeFileSync(configPath, config);
  // Without the caller's TOKENBROKER_* variables: the broker reads every one as a setting
  // override (TOKENBROKER_BIN itself would be an unknown setting `bin`).
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([name]) => !name.startsWith("TOKENBROKER_")),
  );
  const child = spawnSupervised(binary, ["--config", configPath], { ...env, RUST_LOG: "warn" });
  let stderr = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    stderr = (stderr + chunk.toString()).slice(-4000);
  });
  let address: string;
  try {
    address = await listeningAddress(child, () => stderr);
  } catch (err) {
    child.stdin?.end();
    rmSync(dir, { recursive: true, force: true });
    throw err;
  }
  const keys: Keys = {
    admin: made.admin.key,
    trigger: made.trigger.key,
    service: made.service.key,
    throttled: made.throttled.key,
  };
  return {
    baseUrl: `http://${address}`,
    keys,
    async stop() {
      await terminate(child);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Reads stdout until `tokenbroker listening on ADDR`. */
function listeningAddress(child: ChildProcess, stderr: () => string): Promise<string> {
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: child.stdout! });
    const timer = setTimeout(() => {
      child.stdin?.end();
      reject(new Error(`the broker did not listen within 30 s: ${stderr()}`));
    }, 30_000);
    lines.on("line", (line) => {
      const address = line.match(/^tokenbroker listening on (\S+)$/)?.[1];
      if (address !== undefined) {
        clearTimeout(timer);
        resolve(address);
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`the broker exited (${code}) before listening: ${stderr()}`));
    });
  });
}

/** Closes the supervisor's stdin (a SIGTERM to the program), then waits for the exit. */
export function terminate(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve();
  }
  return new Promise((resolve) => {
    // The broker drains for at most shutdown_grace_seconds (2 s); past 10 s something is wrong.
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.once("exit", () => {
      clearTimeout(timer);
      resolve();
    });
    child.stdin?.end();
  });
}
