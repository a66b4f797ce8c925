import { defineConfig } from "vite";

// No plugin: Vite compiles TSX itself (`jsx: "react-jsx"` in tsconfig.json). The page is
// static; its settings come from `config.json` next to it, or VITE_* variables (src/config.ts).
export default defineConfig({
  // amazon-cognito-identity-js's `buffer` dependency reads the Node global `global`.
  define: { global: "globalThis" },
  build: { outDir: "dist", sourcemap: false },
});
