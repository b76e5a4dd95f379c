import { defineConfig } from "vitest/config";

// No React plugin: JSX goes through the transformer's automatic runtime, and the built files are all the daemon
// serves (ui.assets_dir), so nothing inline: the page's CSP is `default-src 'self'`.
export default defineConfig({
  oxc: { jsx: { runtime: "automatic" } },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    modulePreload: { polyfill: false },
    chunkSizeWarningLimit: 600,
    rolldownOptions: {
      // TanStack Query marks its modules "use client" for server components; a browser bundle has none.
      onwarn(warning, warn) {
        if (warning.code !== "MODULE_LEVEL_DIRECTIVE") warn(warning);
      },
    },
  },
  test: { include: ["src/**/*.test.ts"] },
});
