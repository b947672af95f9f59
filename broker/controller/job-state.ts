// The controller's job-state rules, pure: how one device's status folds into its assignment,
// what a job's state is across its devices, and which outcomes count as failures. Unit-tested
// without a broker (test/unit/job-state.test.ts).
import { TaskState, type TaskStatus, TERMINAL_STATES } from "../../proto/index.js";
import type { Assignment, JobRecord, TaskView } from "./store.js";

/** A job's state across its devices. */
export function jobState(job: JobRecord, asgs: readonly Assignment[]): string {
  if (job.any) {
    // Work-queue: done when `need` devices succeeded; failed when nobody is left to try.
    const ok = asgs.filter((a) => a.state === TaskState.SUCCEEDED).length;
    if (ok >= job.any.need) return "SUCCEEDED";
    if (asgs.some((a) => !TERMINAL_STATES.has(a.state))) return job.cancelled ? "CANCELING" : "RUNNING";
    if (job.cancelled) return "CANCELED";
    return job.any.exhausted ? "FAILED" : "RUNNING";
  }
  if (asgs.some((a) => !TERMINAL_STATES.has(a.state))) {
    if (job.cancelled) return "CANCELING";
    return asgs.some((a) => a.acked) ? "RUNNING" : "PENDING";
  }
  if (job.cancelled) return "CANCELED";
  return asgs.every((a) => a.state === TaskState.SUCCEEDED) ? "SUCCEEDED" : "FAILED";
}

/**
 * A device's outcome that counts as a failure (for counts, rollout thresholds, failure lists).
 * Not the agent's UPSTREAM_FAILED_STATES: a cancelled device is counted as cancelled here.
 */
export const FAILED_OUTCOMES: ReadonlySet<number> = new Set<number>([
  TaskState.FAILED,
  TaskState.TIMED_OUT,
  TaskState.REJECTED,
  TaskState.SKIPPED,
]);

/** Where assignments are: one tally for a job's counts and a rollout's. */
export function tally(asgs: readonly Assignment[]) {
  const c = { pending: 0, running: 0, succeeded: 0, failed: 0, canceled: 0, timedOut: 0 };
  for (const a of asgs) {
    if (a.state === TaskState.SUCCEEDED) c.succeeded++;
    else if (FAILED_OUTCOMES.has(a.state)) {
      c.failed++;
      if (a.state === TaskState.TIMED_OUT) c.timedOut++;
    } else if (a.state === TaskState.CANCELED) c.canceled++;
    else if (a.acked) c.running++;
    else c.pending++;
  }
  return c;
}

/** Folds one status into an assignment. */
export function applyStatus(a: Assignment, s: TaskStatus, now: number): void {
  const state = s.state ?? TaskState.TASK_STATE_UNSPECIFIED;
  const execId = s.executionId ?? "";
  a.updatedAt = now;
  if (execId !== a.execId && execId) {
    // A new occurrence of a recurring job: its tasks start over.
    a.execId = execId;
    a.tasks = {};
  }
  if (!s.taskId) {
    if (state === TaskState.QUEUED || state === TaskState.REJECTED || s.reason === "duplicate_delivery")
      a.acked = true;
    if (a.closed) return; // the controller already decided this device's outcome
    if (execId && TERMINAL_STATES.has(state)) {
      a.runs++; // a recurring occurrence ended; the job itself goes on
      a.message = `last run ${TaskState[state]}`;
      return;
    }
    if (s.reason === "duplicate_delivery" && !TERMINAL_STATES.has(state)) return;
    if (TERMINAL_STATES.has(a.state) && !TERMINAL_STATES.has(state)) return;
    a.state = state;
    a.reason = s.reason ?? "";
    a.message = s.message ?? "";
    return;
  }
  a.acked = true;
  // Built field by field, not with conditional spreads: this runs for every status (issue 17).
  const task: TaskView = {
    type: s.taskType ?? a.tasks[s.taskId]?.type ?? "",
    state,
    attempt: s.attempt ?? 0,
    message: s.message ?? "",
    reason: s.reason ?? "",
  };
  if (s.output) task.output = s.output;
  const bySource = s.bytesBySource && Object.entries(s.bytesBySource);
  if (bySource?.length)
    task.bytesBySource = Object.fromEntries(
      bySource.slice(0, 8).map(([k, v]) => [k.slice(0, 16), Number(v) || 0]),
    );
  a.tasks[s.taskId] = task;
  if (!a.closed && !TERMINAL_STATES.has(a.state) && state === TaskState.RUNNING) a.state = TaskState.RUNNING;
}

/** A device's assignment of a job, before it has said anything about it. */
export function newAssignment(jobId: string, deviceId: string, now: number, acked = false): Assignment {
  return {
    jobId,
    deviceId,
    acked,
    state: TaskState.TASK_STATE_UNSPECIFIED,
    reason: "",
    message: "",
    execId: "",
    tasks: {},
    updatedAt: now,
    runs: 0,
    assignedAt: now,
  };
}
