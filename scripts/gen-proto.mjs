// Generates proto/gen/fleet.{js,d.ts} from proto/fleet.proto with protobufjs-cli.
// `--check DIR` writes into DIR instead (used by the test that detects stale code).
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const i = process.argv.indexOf("--out");
const outDir = i > 0 ? resolve(process.argv[i + 1]) : join(root, "proto", "gen");
mkdirSync(outDir, { recursive: true });
const bin = join(root, "node_modules", "protobufjs-cli", "bin");
const js = join(outDir, "fleet.js");
execFileSync(
  process.execPath,
  [
    join(bin, "pbjs"),
    "-t",
    "static-module",
    "-w",
    "es6",
    "--es6",
    "--dependency",
    "protobufjs/minimal.js",
    "--no-beautify",
    "--force-number",
    "-o",
    js,
    join(root, "proto", "fleet.proto"),
  ],
  { stdio: "inherit" },
);
execFileSync(process.execPath, [join(bin, "pbts"), "-o", join(outDir, "fleet.d.ts"), js], {
  stdio: "inherit",
});
