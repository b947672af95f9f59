// Task graph checks and trigger rules (DESIGN.md §5).
import { TaskState, TERMINAL_STATES, Trigger, UPSTREAM_FAILED_STATES } from "../proto/index.js";

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
  const failed = [...depStates].filter(([, s]) => UPSTREAM_FAILED_STATES.has(s)).map(([d]) => d);
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
