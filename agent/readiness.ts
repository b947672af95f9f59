// The readiness decision: given one QUEUED or WAITING task, its job and what the device knows,
// what should happen to it now? Pure — no store, no clock, no broker — so every rung of the
// ladder is unit-tested on its own (test/unit/readiness.test.ts). The scheduler applies the
// decision (scheduler.ts); nothing else decides.
//
// The ladder, first match wins: expired → trigger rule says skip → dependencies pending →
// not_before → retry backoff → maintenance window → preconditions → run.
import { type DecodedTask, TaskState } from "../proto/index.js";
import { JOB_DEP_PREFIX } from "../proto/jobspec.js";
import { evaluateTrigger } from "./dag.js";
import { checkRequirements, type Facts } from "./facts.js";

export type Readiness =
  /** Start it (when a slot is free). */
  | { kind: "run" }
  /** Leave it as it is (a retry whose backoff has not passed). */
  | { kind: "hold" }
  /** WAITING with this reason; the scheduler writes it only when the reason changes. */
  | { kind: "wait"; reason: string; message: string }
  /** Terminal without running: FAILED or SKIPPED. */
  | { kind: "end"; state: TaskState; reason: string; message: string };

export interface ReadinessInput {
  now: number;
  task: DecodedTask;
  /** The task's current run (its message, and when a retry may start). */
  run: { message: string; nextAttemptAt?: number };
  job: {
    expiresAt: number;
    notBeforeMs?: number | null;
    /** The maintenance window, when the job has one. */
    window?: { open: (now: number) => boolean; describe: string };
  };
  /**
   * The state of a dependency: a task of the same execution, or `job:<id>` (the latest
   * execution of another job on this device); undefined when that job is unknown here.
   */
  dependency: (dep: string) => TaskState | undefined;
  facts: () => Facts;
}

export function decideReadiness(i: ReadinessInput): Readiness {
  const { now, task, run, job } = i;
  if (now >= job.expiresAt)
    return {
      kind: "end",
      state: TaskState.FAILED,
      reason: "expired",
      message: `job expired before the task ran${run.message ? ` (${run.message})` : ""}`,
    };
  // The common case — no graph, no conditions — costs nothing more than these checks.
  const plain =
    !task.dependsOn?.length &&
    !task.trigger &&
    !task.requires?.length &&
    !job.notBeforeMs &&
    !job.window &&
    !run.nextAttemptAt;
  if (plain) return { kind: "run" };

  const deps = new Map<string, TaskState>();
  const missing: string[] = [];
  for (const d of task.dependsOn ?? []) {
    const s = i.dependency(d);
    if (s === undefined && d.startsWith(JOB_DEP_PREFIX)) missing.push(d);
    else deps.set(d, s ?? TaskState.QUEUED);
  }
  const trigger = evaluateTrigger(task.trigger ?? 0, deps);
  if (trigger.kind === "skip")
    return { kind: "end", state: TaskState.SKIPPED, reason: "trigger", message: trigger.message };
  if (missing.length || trigger.kind === "wait")
    return {
      kind: "wait",
      reason: "dependencies",
      message: `waiting for ${[...missing, ...(trigger.kind === "wait" ? trigger.on : [])].join(", ")}`,
    };
  if (job.notBeforeMs && now < job.notBeforeMs)
    return {
      kind: "wait",
      reason: "not_before",
      message: `not before ${new Date(job.notBeforeMs).toISOString()}`,
    };
  if (run.nextAttemptAt && now < run.nextAttemptAt) return { kind: "hold" };
  if (job.window && !job.window.open(now))
    return { kind: "wait", reason: "window", message: `outside maintenance window ${job.window.describe}` };
  const pre = checkRequirements(task.requires ?? [], i.facts());
  switch (pre.kind) {
    case "met":
      return { kind: "run" };
    case "wait":
      return { kind: "wait", reason: "precondition", message: pre.message };
    case "fail":
      return {
        kind: "end",
        state: TaskState.FAILED,
        reason: "precondition",
        message: `unmet ${pre.message}`,
      };
    case "skip":
      return {
        kind: "end",
        state: TaskState.SKIPPED,
        reason: "precondition",
        message: `unmet ${pre.message}`,
      };
  }
}

/** A task that may run, as far as ordering goes. */
export interface Runnable {
  spec: Pick<DecodedTask, "priority">;
  e: { createdAt: number };
  receivedAt: number;
  /** The task's place in its job. */
  index: number;
}

/** Run order among ready tasks: higher priority, then older execution, older job, earlier task. */
export function runOrder(a: Runnable, b: Runnable): number {
  return (
    (b.spec.priority ?? 0) - (a.spec.priority ?? 0) ||
    a.e.createdAt - b.e.createdAt ||
    a.receivedAt - b.receivedAt ||
    a.index - b.index
  );
}
