/** The example's movie API as the tests run it: `node dist-api/server.js` on a free port. */
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { spawnSupervised, terminate } from "../../../test/broker.js";

const APP = resolve(dirname(fileURLToPath(import.meta.url)), "..");

/** A running movie API. */
export interface Api {
  /** `http://127.0.0.1:PORT`. */
  url: string;
  stop(): Promise<void>;
  /** What it printed (stdout and stderr). */
  log(): string;
}

/**
 * Starts the API against the broker at `brokerUrl` with its `service` key, allowing `origin`
 * (CORS), and waits (at most 30 s) until it listens.
 */
export async function startApi(brokerUrl: string, serviceKey: string, origin = ""): Promise<Api> {
  const child = spawnSupervised(process.execPath, [join(APP, "dist-api/server.js")], {
    ...process.env,
    BROKER_URL: brokerUrl,
    TB_SERVICE_KEY: serviceKey,
    API_ALLOWED_ORIGINS: origin,
    API_HOST: "127.0.0.1",
    API_PORT: "0",
  });
  let log = "";
  child.stderr?.on("data", (chunk: Buffer) => {
    log += chunk.toString();
  });
  try {
    const url = await new Promise<string>((done, fail) => {
      const timer = setTimeout(() => fail(new Error(`the API did not listen: ${log}`)), 30_000);
      createInterface({ input: child.stdout! }).on("line", (line) => {
        log += `${line}\n`;
        const found = line.match(/^movie api listening on (\S+)$/)?.[1];
        if (found !== undefined) {
          clearTimeout(timer);
          done(found);
        }
      });
      child.on("exit", (code) => fail(new Error(`the API exited (${code}): ${log}`)));
    });
    return { url, stop: () => terminate(child), log: () => log };
  } catch (err) {
    await terminate(child);
    throw err;
  }
}
