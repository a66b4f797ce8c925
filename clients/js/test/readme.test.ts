/**
 * The README's usage example, run as written against a real broker: its `ts` block is taken
 * from README.md, pointed at the test broker (its two base URLs) and at this package's sources
 * (its imports), and imported, with the API keys in the environment variables it reads.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, beforeAll, expect, test } from "vitest";
import { type Broker, startBroker } from "./broker.js";

const HERE = dirname(fileURLToPath(import.meta.url));
let broker: Broker;
// Inside test/, so the example's relative imports of ../src resolve as they do here.
const scratch = mkdtempSync(join(HERE, ".readme-"));

beforeAll(async () => {
  broker = await startBroker();
}, 60_000);

afterAll(async () => {
  await broker?.stop();
  rmSync(scratch, { recursive: true, force: true });
});

test("the README's example runs", async () => {
  const readme = readFileSync(resolve(HERE, "../README.md"), "utf8");
  const block = readme.match(/```ts\n([\s\S]*?)```/)?.[1];
  expect(block, "a ts block in README.md").toBeDefined();
  const example = block!
    .replaceAll('"http://127.0.0.1:50051"', JSON.stringify(broker.baseUrl))
    .replaceAll('"https://broker.example.com"', JSON.stringify(broker.baseUrl))
    .replaceAll('"@tokenbroker/client/node"', '"../../src/node.js"')
    .replaceAll('"@tokenbroker/client/web"', '"../../src/web.js"');
  expect(example).not.toContain("@tokenbroker/client");
  const file = join(scratch, "example.ts");
  writeFileSync(file, `${example}\nexport const done = true;\n`);
  process.env.TB_TRIGGER_KEY = broker.keys.trigger;
  process.env.TB_SERVICE_KEY = broker.keys.service;
  const module = (await import(file)) as { done: boolean };
  expect(module.done).toBe(true);
});
