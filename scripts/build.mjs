// Bundles the CLI (and with it the agent) into dist/fleet.js with esbuild.
// npm packages stay external here; `fleet flash` builds a fully self-contained agent bundle.
import { readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));

await build({
  entryPoints: [join(root, "cli", "main.ts")],
  outfile: join(root, "dist", "fleet.js"),
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  packages: "external",
  sourcemap: true,
  define: { __FLEET_VERSION__: JSON.stringify(pkg.version), __FLEET_BUILD_TIME__: String(Date.now()) },
  logLevel: "warning",
});
