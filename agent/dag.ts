// Task graph checks and trigger rules (DESIGN.md §5).
import { FAILED_STATES, type TaskSpec, TaskState, TERMINAL_STATES, Trigger } from "../proto/index.js";

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

export type TriggerDecision =
  | { kind: "ready" }
  | { kind: "wait"; on: string[] }
  | { kind: "skip"; message: string };

/** Decides from the states of a task's dependencies whether it may run. */
export function evaluateTrigger(
  trigger: Trigger,
  depStates: ReadonlyMap<string, TaskState>,
): TriggerDecision {
  const pending = [...depStates].filter(([, s]) => !TERMINAL_STATES.has(s)).map(([d]) => d);
  const failed = [...depStates].filter(([, s]) => FAILED_STATES.has(s)).map(([d]) => d);
  switch (trigger) {
    case Trigger.TRIGGER_ALL_DONE:
      return pending.length ? { kind: "wait", on: pending } : { kind: "ready" };
    case Trigger.TRIGGER_ONE_FAILED:
      if (failed.length) return { kind: "ready" };
      return pending.length
        ? { kind: "wait", on: pending }
        : { kind: "skip", message: "no upstream task failed" };
    default:
      if (failed.length) return { kind: "skip", message: `upstream ${failed.join(", ")} did not succeed` };
      return pending.length ? { kind: "wait", on: pending } : { kind: "ready" };
  }
}

/** A job execution's state, derived from its tasks. */
export function deriveJobState(states: readonly TaskState[], cancelled: boolean): TaskState {
  if (states.some((s) => !TERMINAL_STATES.has(s))) {
    return states.some((s) => s === TaskState.RUNNING) ? TaskState.RUNNING : TaskState.QUEUED;
  }
  if (cancelled) return TaskState.CANCELED;
  if (states.some((s) => s === TaskState.REJECTED)) return TaskState.REJECTED;
  if (states.some((s) => s === TaskState.TIMED_OUT)) return TaskState.TIMED_OUT;
  if (states.some((s) => s === TaskState.FAILED)) return TaskState.FAILED;
  if (states.some((s) => s === TaskState.CANCELED)) return TaskState.CANCELED;
  return TaskState.SUCCEEDED;
}
