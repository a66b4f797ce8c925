import { defineConfig } from "vitest/config";

// The browser walk: one file whose tests are its steps, run in order. Each step waits for
// conditions for at most 30 s (a loaded 2-core machine), so a step past 60 s is stuck.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 120_000,
  },
});
