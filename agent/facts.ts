// Preconditions (`requires`) checked against device facts (DESIGN.md §5).

import type { FactValue } from "../firmware-tasks/types.js";
import { OnUnmet, type Requirement } from "../proto/index.js";

export type Facts = Record<string, FactValue>;

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
const VERSION_RE = /^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:[-+].*)?$/;

/** Numbers and sizes ("500MB" = 500 MiB) as numbers; anything else stays a string. */
export function parseQuantity(v: FactValue): number | undefined {
  if (typeof v === "number") return v;
  if (typeof v === "boolean") return undefined;
  const m = SIZE_RE.exec(v.trim());
  if (!m) return undefined;
  return Number(m[1]) * (UNITS[(m[2] ?? "B").toUpperCase()] ?? 1);
}

function compareVersions(a: string, b: string): number | undefined {
  const x = VERSION_RE.exec(a);
  const y = VERSION_RE.exec(b);
  if (!x || !y) return undefined;
  for (let i = 1; i <= 3; i++) {
    const d = Number(x[i] ?? 0) - Number(y[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

/** Compares as versions when both look like versions with a dot, else as quantities, else as strings. */
export function compareValues(actual: FactValue, expected: string): number {
  const a = String(actual);
  if (a.includes(".") && expected.includes(".") && !/[a-z]/i.test(expected.replace(/^v/, ""))) {
    const v = compareVersions(a, expected);
    if (v !== undefined) return v;
  }
  const x = parseQuantity(actual);
  const y = parseQuantity(expected);
  if (x !== undefined && y !== undefined) return Math.sign(x - y);
  return a < expected ? -1 : a > expected ? 1 : 0;
}

export const REQUIREMENT_OPS = ["==", "=", "!=", ">=", "<=", ">", "<", "in", "notin", "exists"] as const;

export function evaluateRequirement(r: Requirement, facts: Facts): { met: boolean; actual?: FactValue } {
  const actual = facts[r.fact ?? ""];
  const value = r.value ?? "";
  if (r.op === "exists") return { met: actual !== undefined, actual };
  if (actual === undefined) return { met: false };
  const list = () => value.split(",").map((s) => s.trim().replace(/^\(|\)$/g, ""));
  switch (r.op) {
    case "in":
      return { met: list().includes(String(actual)), actual };
    case "notin":
      return { met: !list().includes(String(actual)), actual };
    case "==":
    case "=":
      return { met: compareValues(actual, value) === 0, actual };
    case "!=":
      return { met: compareValues(actual, value) !== 0, actual };
    case ">=":
      return { met: compareValues(actual, value) >= 0, actual };
    case "<=":
      return { met: compareValues(actual, value) <= 0, actual };
    case ">":
      return { met: compareValues(actual, value) > 0, actual };
    case "<":
      return { met: compareValues(actual, value) < 0, actual };
    default:
      return { met: false, actual };
  }
}

export function describeRequirement(r: Requirement, actual?: FactValue): string {
  return (
    `${r.fact} ${r.op} ${r.value ?? ""}`.trim() +
    (actual === undefined ? " (fact unknown)" : ` (is ${actual})`)
  );
}

export type RequirementOutcome = { kind: "met" } | { kind: "wait" | "fail" | "skip"; message: string };

/** The first unmet requirement decides: fail beats skip beats wait. */
export function checkRequirements(reqs: readonly Requirement[], facts: Facts): RequirementOutcome {
  let outcome: RequirementOutcome = { kind: "met" };
  const rank = { met: 0, wait: 1, skip: 2, fail: 3 } as const;
  for (const r of reqs) {
    const { met, actual } = evaluateRequirement(r, facts);
    if (met) continue;
    const kind =
      r.onUnmet === OnUnmet.ON_UNMET_FAIL ? "fail" : r.onUnmet === OnUnmet.ON_UNMET_SKIP ? "skip" : "wait";
    if (rank[kind] > rank[outcome.kind])
      outcome = { kind, message: `precondition ${describeRequirement(r, actual)}` };
  }
  return outcome;
}
