/**
 * The package as `npm pack` makes it: ESM with type declarations for every entry point, and
 * nothing else (no sources, tests or generated protos' `.proto`s). It is unpacked into a
 * scratch project, which then imports it by name through its `exports` map, as a user would.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, expect, test } from "vitest";

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const scratch = mkdtempSync(join(tmpdir(), "tokenbroker-js-pack-"));

afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** Runs `npm pack` into the scratch directory and returns the tarball's path. */
function pack(): string {
  const out = execFileSync("npm", ["pack", "--json", "--pack-destination", scratch], {
    cwd: PACKAGE,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "ignore"],
  });
  const [{ filename }] = JSON.parse(out) as [{ filename: string }];
  return join(scratch, filename);
}

test("npm pack holds ESM and declarations for every entry point, and nothing else", () => {
  const tarball = pack();
  const files = execFileSync("tar", ["-tzf", tarball], { encoding: "utf8" })
    .split("\n")
    .filter((f) => f !== "")
    .map((f) => f.replace(/^package\//, ""));
  for (const entry of ["index", "node", "web", "client", "errors", "secret"]) {
    expect(files).toContain(`dist/${entry}.js`);
    expect(files).toContain(`dist/${entry}.d.ts`);
  }
  expect(files).toContain("dist/gen/tokenbroker/v1/broker_pb.js");
  expect(files).toContain("dist/gen/tokenbroker/v1/broker_pb.d.ts");
  expect(files).toContain("README.md");
  const stray = files.filter(
    (f) => !(f === "package.json" || f === "README.md" || /^dist\/.*\.(js|d\.ts)$/.test(f)),
  );
  expect(stray).toEqual([]);

  // Unpacked into a project's node_modules, beside the dependencies it declares, it imports
  // by name as ESM, each entry point with its factory.
  const modules = join(scratch, "project/node_modules");
  mkdirSync(join(modules, "@tokenbroker"), { recursive: true });
  execFileSync("tar", ["-xzf", tarball, "-C", join(modules, "@tokenbroker")]);
  execFileSync("mv", [join(modules, "@tokenbroker/package"), join(modules, "@tokenbroker/client")]);
  const manifest = JSON.parse(
    readFileSync(join(modules, "@tokenbroker/client/package.json"), "utf8"),
  ) as { type: string; dependencies: Record<string, string> };
  expect(manifest.type).toBe("module");
  for (const scope of new Set(Object.keys(manifest.dependencies).map((d) => d.split("/")[0]))) {
    symlinkSync(join(PACKAGE, "node_modules", scope), join(modules, scope));
  }
  const script = [
    'import { createNodeClient, ErrorKind } from "@tokenbroker/client/node";',
    'import { createWebClient } from "@tokenbroker/client/web";',
    'import { TokenBrokerError, TokenBroker } from "@tokenbroker/client";',
    "const client = createNodeClient({ baseUrl: 'http://127.0.0.1:9', apiKey: 'tbk_x' });",
    "console.log(JSON.stringify([typeof createWebClient, TokenBroker.typeName,",
    "  ErrorKind.Unavailable, client instanceof Object, typeof TokenBrokerError]));",
  ].join("\n");
  const out = execFileSync("node", ["--input-type=module", "-e", script], {
    cwd: join(scratch, "project"),
    encoding: "utf8",
  });
  expect(JSON.parse(out)).toEqual([
    "function",
    "tokenbroker.v1.TokenBroker",
    "Unavailable",
    true,
    "function",
  ]);
});
