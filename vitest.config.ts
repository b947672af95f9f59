import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { defineConfig } from "vitest/config";

const pkg = JSON.parse(readFileSync(new URL("./package.json", import.meta.url), "utf8"));

export default defineConfig({
  define: { __FLEET_VERSION__: JSON.stringify(pkg.version) },
  test: {
    // Operator signing keys that tests' `fleet init` makes go to a scratch dir, not ~/.config.
    env: { FLEET_KEY_DIR: process.env.FLEET_KEY_DIR ?? mkdtempSync(join(tmpdir(), "fleet-test-keys-")) },
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
  },
});
