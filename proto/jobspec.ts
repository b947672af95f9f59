// What a job spec means, for everyone who checks one (the controller at submit, the agent at
// accept, handlers): the task graph's rules and how requirement values compare.

import semver from "semver";
import type { TaskSpec } from "./index.js";

/** A fact's value (firmware-tasks re-exports it). */
export type FactValue = string | number | boolean;

export const JOB_DEP_PREFIX = "job:";

export type GraphProblem = {
  reason: "duplicate_task_id" | "unknown_dependency" | "dependency_cycle";
  message: string;
};

/** Finds duplicate ids, unknown in-job dependencies and cycles. Cross-job deps are not checked here. */
export function checkGraph(tasks: readonly TaskSpec[]): GraphProblem | undefined {
  const ids = new Set<string>();
  for (const t of tasks) {
    if (!t.id) return { reason: "duplicate_task_id", message: "a task has no id" };
    if (ids.has(t.id)) return { reason: "duplicate_task_id", message: `task id ${t.id} appears twice` };
    ids.add(t.id);
  }
  const deps = new Map<string, string[]>();
  for (const t of tasks) {
    const inJob = (t.dependsOn ?? []).filter((d) => !d.startsWith(JOB_DEP_PREFIX));
    for (const d of inJob)
      if (!ids.has(d))
        return { reason: "unknown_dependency", message: `task ${t.id} depends on unknown task ${d}` };
    deps.set(t.id!, inJob);
  }
  // Iterative DFS with colors; reports the cycle path.
  const color = new Map<string, 0 | 1 | 2>();
  for (const start of ids) {
    if (color.get(start)) continue;
    const stack: Array<{ id: string; i: number }> = [{ id: start, i: 0 }];
    color.set(start, 1);
    while (stack.length) {
      const top = stack[stack.length - 1]!;
      const next = deps.get(top.id)![top.i++];
      if (next === undefined) {
        color.set(top.id, 2);
        stack.pop();
      } else if (color.get(next) === 1) {
        const path = stack.slice(stack.findIndex((f) => f.id === next)).map((f) => f.id);
        return { reason: "dependency_cycle", message: `dependency cycle: ${[...path, next].join(" -> ")}` };
      } else if (!color.get(next)) {
        color.set(next, 1);
        stack.push({ id: next, i: 0 });
      }
    }
  }
  return undefined;
}

const SIZE_RE = /^(\d+(?:\.\d+)?)\s*(B|KB|KIB|MB|MIB|GB|GIB|TB|TIB|K|M|G|T)?$/i;
const UNITS: Record<string, number> = {
  B: 1,
  K: 1024,
  KB: 1024,
  KIB: 1024,
  M: 1024 ** 2,
  MB: 1024 ** 2,
  MIB: 1024 ** 2,
  G: 1024 ** 3,
  GB: 1024 ** 3,
  GIB: 1024 ** 3,
  T: 1024 ** 4,
  TB: 1024 ** 4,
  TIB: 1024 ** 4,
};
const VERSION_RE = /^v?\d+(?:\.\d+)?(?:\.\d+)?(?:[-+].*)?$/;

/** Numbers and sizes ("500MB" = 500 MiB) as numbers; anything else stays a string. */
export function parseQuantity(v: FactValue): number | undefined {
  if (typeof v === "number") return v;
  if (typeof v === "boolean") return undefined;
  const m = SIZE_RE.exec(v.trim());
  if (!m) return undefined;
  return Number(m[1]) * (UNITS[(m[2] ?? "B").toUpperCase()] ?? 1);
}

/** Versions compared by semver (a pre-release orders before its release); partial ones pad with 0. */
function compareVersions(a: string, b: string): number | undefined {
  if (!VERSION_RE.test(a) || !VERSION_RE.test(b)) return undefined;
  const x = semver.coerce(a, { includePrerelease: true });
  const y = semver.coerce(b, { includePrerelease: true });
  if (!x || !y) return undefined;
  return semver.compare(x, y);
}

/** Compares as versions when both look like versions with a dot, else as quantities, else as strings. */
export function compareValues(actual: FactValue, expected: string): number {
  const a = String(actual);
  if (a.includes(".") && expected.includes(".")) {
    const v = compareVersions(a, expected);
    if (v !== undefined) return v;
  }
  const x = parseQuantity(actual);
  const y = parseQuantity(expected);
  if (x !== undefined && y !== undefined) return Math.sign(x - y);
  return a < expected ? -1 : a > expected ? 1 : 0;
}
