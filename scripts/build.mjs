// Builds with esbuild:
//  - dist/fleet.js: the CLI (npm packages stay external; they are installed next to it);
//  - dist/agent/agent.cjs: the self-contained agent that `fleet flash` copies onto devices,
//    everything bundled, plus classic-level's prebuilt LevelDB binaries for Linux x64, arm64 and
//    armv7 in dist/agent/prebuilds (node-gyp-build finds them next to the bundle).
import { cpSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const define = { __FLEET_VERSION__: JSON.stringify(pkg.version), __FLEET_BUILD_TIME__: String(Date.now()) };

await build({
  entryPoints: [join(root, "cli", "main.ts")],
  outfile: join(root, "dist", "fleet.js"),
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  packages: "external",
  sourcemap: true,
  define,
  logLevel: "warning",
});

const agentDir = join(root, "dist", "agent");
rmSync(agentDir, { recursive: true, force: true });
await build({
  entryPoints: [join(root, "cli", "agent-main.ts")],
  outfile: join(agentDir, "agent.cjs"),
  bundle: true,
  platform: "node",
  format: "cjs",
  target: "node20",
  minify: true,
  legalComments: "external",
  external: ["osx-temperature-sensor"],
  // ESM dependencies (node-cron) read import.meta.url; give them this file's URL in CJS.
  banner: { js: 'const __importMetaUrl = require("url").pathToFileURL(__filename).href;' },
  define: { ...define, "import.meta.url": "__importMetaUrl" },
  logLevel: "error",
});
// A site gateway serves the dashboard too: its static files travel with the agent bundle.
const staticDir = join(agentDir, "dashboard", "static");
mkdirSync(staticDir, { recursive: true });
for (const f of ["app.js", "app.css"])
  cpSync(join(root, "broker", "dashboard", "static", f), join(staticDir, f));
for (const f of ["uPlot.iife.min.js", "uPlot.min.css"])
  cpSync(join(root, "node_modules", "uplot", "dist", f), join(staticDir, f));
for (const p of ["linux-x64", "linux-arm64", "linux-arm"]) {
  mkdirSync(join(agentDir, "prebuilds"), { recursive: true });
  cpSync(join(root, "node_modules", "classic-level", "prebuilds", p), join(agentDir, "prebuilds", p), {
    recursive: true,
  });
}
