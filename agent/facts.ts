// Preconditions (`requires`) checked against device facts (DESIGN.md §5).

import type { FactValue } from "../firmware-tasks/types.js";
import { OnUnmet, type Requirement } from "../proto/index.js";
import { compareValues } from "../proto/jobspec.js";

export type Facts = Record<string, FactValue>;

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
