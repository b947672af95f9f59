import { mkdirSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";

export interface Figure {
  name: string;
  value: number;
  unit: string;
  baseline: number;
  ratio: number;
  goal: string;
}

/** Prints a table and writes bench-results/<name>.json. */
export function report(bench: string, figures: Figure[]): void {
  const machine = `${cpus().length}x ${cpus()[0]?.model ?? "cpu"}, node ${process.version}`;
  console.log(`\n${bench} (${machine})`);
  console.table(
    figures.map((f) => ({
      figure: f.name,
      value: `${f.value.toFixed(1)} ${f.unit}`,
      baseline: `${f.baseline.toFixed(1)} ${f.unit}`,
      ratio: f.ratio.toFixed(2),
      goal: f.goal,
    })),
  );
  mkdirSync("bench-results", { recursive: true });
  writeFileSync(
    join("bench-results", `${bench}.json`),
    JSON.stringify({ bench, machine, at: new Date().toISOString(), figures }, null, 2),
  );
}
