// `npm run lint`: which folder may import which (DESIGN.md §2). The server and the task handlers
// never import the agent; the shared layers (common/, proto/) import none of the pieces.
import { readdirSync, readFileSync } from "node:fs";
import { join, relative, resolve } from "node:path";

const root = resolve(import.meta.dirname, "..");
const forbidden = {
  broker: ["agent"],
  "firmware-tasks": ["agent", "broker", "cli"],
  common: ["agent", "broker", "cli", "firmware-tasks"],
  proto: ["agent", "broker", "cli", "firmware-tasks"],
};

function* files(dir) {
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) {
      if (e.name !== "gen") yield* files(p);
    } else if (e.name.endsWith(".ts")) yield p;
  }
}

const problems = [];
for (const [layer, banned] of Object.entries(forbidden)) {
  for (const file of files(join(root, layer))) {
    const src = readFileSync(file, "utf8");
    for (const m of src.matchAll(/from\s+["'](\.[^"']+)["']/g)) {
      const target = relative(root, resolve(file, "..", m[1]));
      const top = target.split("/")[0];
      if (banned.includes(top))
        problems.push(`${relative(root, file)}: imports ${target} (${layer}/ may not import ${top}/)`);
    }
  }
}
if (problems.length) {
  console.error(`layer rules broken:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
  process.exit(1);
}
console.log("layers: ok");
