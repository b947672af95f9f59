// `npm run bench [-- --devices N] [--jobs N] [--storm N] [--registry N] [vitest args]`: runs the
// benchmarks in test/bench (each prints a table and writes bench-results/<name>.json).
import { spawnSync } from "node:child_process";

const flags = {
  "--devices": "BENCH_DEVICES",
  "--jobs": "BENCH_JOBS",
  "--storm": "BENCH_STORM_DEVICES",
  "--registry": "BENCH_REGISTRY",
};
const env = { ...process.env };
const rest = [];
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const [name, inline] = a.split("=", 2);
  if (flags[name]) {
    const v = inline ?? argv[++i];
    if (!/^\d+$/.test(v ?? "")) {
      console.error(`${name} wants a number, got "${v ?? ""}"`);
      process.exit(2);
    }
    env[flags[name]] = v;
  } else rest.push(a);
}
const r = spawnSync("npx", ["vitest", "run", "--config", "vitest.bench.config.ts", ...rest], {
  stdio: "inherit",
  env,
});
process.exit(r.status ?? 1);
