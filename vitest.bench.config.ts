import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defineConfig } from "vitest/config";

const pkg = JSON.parse(readFileSync(new URL("./package.json", import.meta.url), "utf8"));

// `npm run bench`: timing runs that print ratios against a baseline measured in the same run.
export default defineConfig({
  define: { __FLEET_VERSION__: JSON.stringify(pkg.version) },
  test: {
    include: ["test/bench/**/*.bench.ts"],
    testTimeout: 600_000,
    fileParallelism: false,
    env: { FLEET_KEY_DIR: process.env.FLEET_KEY_DIR ?? mkdtempSync(join(tmpdir(), "fleet-bench-keys-")) },
  },
});
