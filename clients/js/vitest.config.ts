import { defineConfig } from "vitest/config";

// Each test file starts its own broker process in `beforeAll`; the calls are on loopback, so a
// test that takes more than 20 s is stuck, not slow.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 20_000,
    hookTimeout: 60_000,
  },
});
