// The scheduler's view of what the device holds — every accepted job's plan (its verified spec,
// params, cron matchers) and its executions: the ones not done, and the latest of each job
// (for `job:` dependencies and re-acknowledgements) — and the rules that change a task's run:
// each transition returns the statuses describing it. Memory only and clock-free (the caller
// passes `now`), so the job-state rules are unit-tested without a broker or a store; the
// scheduler persists what these return.

import { type DecodedTask, TaskState, type TaskStatus, TERMINAL_STATES } from "../proto/index.js";
import { JOB_DEP_PREFIX } from "../proto/jobspec.js";
import { CronMatcher } from "./cron.js";
import { deriveJobState } from "./dag.js";
import { retryDelay } from "./retry.js";
import { executionEnded, taskStatus } from "./status.js";
import type { ExecutionRecord, StoredJob, TaskRun } from "./store.js";
import type { Outcome } from "./task-runner.js";
import type { Spec } from "./verify.js";

/** History kept per recurring job: older occurrences are deleted. */
const KEEP_DONE_OCCURRENCES = 10;

export interface JobPlan {
  record: StoredJob;
  spec: Spec;
  params: Map<string, unknown>;
  tasks: Map<string, { spec: DecodedTask; index: number }>;
  window?: CronMatcher;
  schedule?: CronMatcher;
  /** Recurring: when the schedule was last looked at (trusted time). */
  lastChecked: number;
}

export type Patch = Partial<TaskRun> & { state: TaskState };
type Ending = Patch & { finishedAt: number };

const execKey = (jobId: string, execId: string) => `${jobId}!${execId}`;

export class JobTable {
  readonly plans = new Map<string, JobPlan>();
  /**
   * The plans with a schedule: the scheduler's tick looks at these every second, not at every
   * job kept until it expires (thousands on a busy device).
   */
  readonly recurring = new Map<string, JobPlan>();
  /** Executions not yet done. */
  readonly active = new Map<string, ExecutionRecord>();
  /** The latest execution of every job. */
  readonly latest = new Map<string, ExecutionRecord>();
  /** Occurrence ids of recurring jobs, oldest first. */
  private readonly occurrences = new Map<string, string[]>();

  add(record: StoredJob, spec: Spec, params: Map<string, unknown>, now: number): JobPlan {
    const plan: JobPlan = {
      record,
      spec,
      params,
      tasks: new Map(spec.tasks.map((t, index) => [t.id, { spec: t, index }])),
      lastChecked: now,
    };
    if (spec.window?.cron) plan.window = new CronMatcher(spec.window.cron, spec.window.timezone);
    if (spec.schedule?.cron) plan.schedule = new CronMatcher(spec.schedule.cron, spec.schedule.timezone);
    this.plans.set(record.jobId, plan);
    if (plan.schedule) this.recurring.set(record.jobId, plan);
    else this.recurring.delete(record.jobId);
    return plan;
  }

  remove(jobId: string): void {
    this.plans.delete(jobId);
    this.recurring.delete(jobId);
    this.latest.delete(jobId);
    this.occurrences.delete(jobId);
  }

  newExecution(plan: JobPlan, execId: string, now: number): ExecutionRecord {
    const tasks: Record<string, TaskRun> = {};
    for (const t of plan.spec.tasks)
      tasks[t.id] = { state: TaskState.QUEUED, attempt: 0, progress: 0, message: "", reason: "" };
    return { jobId: plan.record.jobId, execId, createdAt: now, done: false, tasks };
  }

  track(e: ExecutionRecord): void {
    const k = execKey(e.jobId, e.execId);
    if (e.done) this.active.delete(k);
    else this.active.set(k, e);
    const l = this.latest.get(e.jobId);
    if (!l || l.createdAt <= e.createdAt) this.latest.set(e.jobId, e);
    if (e.execId) {
      const list = this.occurrences.get(e.jobId) ?? [];
      if (!list.includes(e.execId)) list.push(e.execId);
      this.occurrences.set(e.jobId, list);
    }
  }

  /** The oldest occurrence ids beyond the history limit, to delete. */
  private pruneOccurrences(jobId: string): Array<{ jobId: string; execId: string }> {
    const list = this.occurrences.get(jobId) ?? [];
    const drop =
      list.length > KEEP_DONE_OCCURRENCES ? list.splice(0, list.length - KEEP_DONE_OCCURRENCES) : [];
    return drop.map((execId) => ({ jobId, execId }));
  }

  /**
   * Whether a recurring job's schedule has a slot due since it was last looked at: a new
   * execution (tracked; `prune` lists the history to delete), "overlap" when the previous
   * occurrence is still running (this one is skipped), else "none".
   */
  occurrence(
    plan: JobPlan,
    now: number,
    tickMs: number,
    lookbackMs: number,
  ):
    | { kind: "none" | "overlap" }
    | { kind: "start"; execution: ExecutionRecord; prune: Array<{ jobId: string; execId: string }> } {
    const { record, spec, schedule } = plan;
    if (!schedule || record.cancelled) return { kind: "none" };
    if (now >= record.expiresAt || (spec.notBeforeMs && now < spec.notBeforeMs)) return { kind: "none" };
    if (now < plan.lastChecked) plan.lastChecked = now - tickMs; // time moved back: resume from here
    const slot = schedule.latestSlot(plan.lastChecked, now, lookbackMs);
    plan.lastChecked = now;
    if (slot === undefined) return { kind: "none" };
    const prev = this.latest.get(record.jobId);
    if (prev && !prev.done) return { kind: "overlap" };
    // The slot alone is not unique: the clock may come back to it. The counter is.
    record.occurrences = (record.occurrences ?? 0) + 1;
    record.lastSlot = slot;
    const execution = this.newExecution(plan, `${new Date(slot).toISOString()}#${record.occurrences}`, now);
    this.track(execution);
    return { kind: "start", execution, prune: this.pruneOccurrences(record.jobId) };
  }

  /** Jobs whose expiry passed more than `graceMs` ago with no execution still going: to forget. */
  expired(now: number, graceMs: number): StoredJob[] {
    const busy = new Set([...this.active.values()].map((e) => e.jobId));
    return [...this.plans.values()]
      .filter((p) => now >= p.record.expiresAt + graceMs && !busy.has(p.record.jobId))
      .map((p) => p.record);
  }

  jobState(e: ExecutionRecord): TaskState {
    return deriveJobState(
      Object.values(e.tasks).map((t) => t.state),
      Boolean(this.plans.get(e.jobId)?.record.cancelled),
    );
  }

  /** The state of a dependency of a task of `e`: undefined for a `job:` dependency not held here. */
  dependency(e: ExecutionRecord, dep: string): TaskState | undefined {
    if (!dep.startsWith(JOB_DEP_PREFIX)) return e.tasks[dep]?.state;
    const other = this.latest.get(dep.slice(JOB_DEP_PREFIX.length));
    if (!other) return undefined;
    return other.done ? other.jobState! : TaskState.RUNNING;
  }

  /** Marks the execution done when every task is terminal; returns the job-level status if so. */
  settle(e: ExecutionRecord, now: number): TaskStatus[] {
    if (e.done || Object.values(e.tasks).some((t) => !TERMINAL_STATES.has(t.state))) return [];
    e.done = true;
    e.jobState = this.jobState(e);
    this.track(e);
    return [executionEnded(e, now)];
  }

  taskType(jobId: string, taskId: string): string {
    return this.plans.get(jobId)?.tasks.get(taskId)?.spec.type ?? "";
  }

  get queueDepth(): number {
    let n = 0;
    for (const e of this.active.values()) if (!e.done) n++;
    return n;
  }

  // ---- transitions ------------------------------------------------------------------------

  /** Applies a patch to a task run and returns the status describing it. */
  patch(e: ExecutionRecord, taskId: string, p: Patch, now: number): TaskStatus {
    Object.assign(e.tasks[taskId]!, p);
    return taskStatus(e, taskId, this.taskType(e.jobId, taskId), now);
  }

  /** Ends a task (and its execution, if that was the last one). */
  end(e: ExecutionRecord, taskId: string, p: Ending): TaskStatus[] {
    return [this.patch(e, taskId, p, p.finishedAt), ...this.settle(e, p.finishedAt)];
  }

  /** Starts an attempt (a resumed one continues its attempt number). */
  start(e: ExecutionRecord, taskId: string, now: number): TaskStatus {
    const run = e.tasks[taskId]!;
    return this.patch(
      e,
      taskId,
      {
        state: TaskState.RUNNING,
        attempt: run.resume ? Math.max(1, run.attempt) : run.attempt + 1,
        resume: undefined,
        progress: 0,
        message: "",
        reason: "",
        output: "",
        startedAt: now,
        finishedAt: undefined,
        nextAttemptAt: undefined,
      },
      now,
    );
  }

  /** A failed attempt: WAITING for a retry while attempts remain (and the job stands), else ended. */
  failure(
    e: ExecutionRecord,
    taskId: string,
    f: { message: string; reason: string; output?: string; state?: TaskState; retryable?: boolean },
    now: number,
  ): TaskStatus[] {
    const { message, reason, output = "", state = TaskState.FAILED, retryable = true } = f;
    const run = e.tasks[taskId]!;
    const plan = this.plans.get(e.jobId);
    const retry = plan?.tasks.get(taskId)?.spec.retry;
    const attempt = Math.max(1, run.attempt);
    const delayMs = retryable && !plan?.record.cancelled ? retryDelay(retry, attempt) : undefined;
    if (delayMs === undefined)
      return this.end(e, taskId, { state, message, reason, output, finishedAt: now });
    const max = Math.max(1, retry?.maxAttempts ?? 1);
    const wait = `retrying in ${Math.round(delayMs / 100) / 10}s`;
    const waiting: Patch = {
      state: TaskState.WAITING,
      nextAttemptAt: now + delayMs,
      message: `attempt ${attempt}/${max} ${TaskState[state]}: ${message}; ${wait}`,
      reason: "retry_backoff",
      output,
      finishedAt: now,
    };
    return [this.patch(e, taskId, waiting, now)];
  }

  /** The transition an attempt's outcome makes. */
  finished(e: ExecutionRecord, taskId: string, out: Outcome, now: number): TaskStatus[] {
    switch (out.kind) {
      case "succeeded": {
        const ok = {
          progress: 100,
          message: out.message,
          reason: "",
          output: out.output,
          ...(out.bytesBySource ? { bytesBySource: out.bytesBySource } : {}),
          ...(out.droppedPeers ? { droppedPeers: out.droppedPeers } : {}),
        };
        return this.end(e, taskId, { state: TaskState.SUCCEEDED, ...ok, finishedAt: now });
      }
      case "canceled":
        return this.end(e, taskId, cancelled(out.message, now, out.output));
      case "timed_out":
        return this.failure(e, taskId, { ...out, reason: "timeout", state: TaskState.TIMED_OUT }, now);
      case "failed":
        return this.failure(e, taskId, out, now);
    }
  }

  /** Recovery after a restart of a task that was RUNNING, by what its handler allows (§4.5). */
  recover(
    e: ExecutionRecord,
    taskId: string,
    handler: { resumable?: boolean; idempotent?: boolean } | undefined,
    now: number,
  ): TaskStatus[] {
    if (handler?.resumable) {
      const resume = { message: "resuming after a restart", reason: "resuming", resume: true };
      return [this.patch(e, taskId, { state: TaskState.QUEUED, ...resume }, now)];
    }
    if (handler?.idempotent) {
      const rerun = { message: "re-running after interruption", reason: "interrupted" };
      return [this.patch(e, taskId, { state: TaskState.QUEUED, ...rerun }, now)];
    }
    const why = {
      message: "interrupted by an agent restart",
      reason: "interrupted",
      output: e.tasks[taskId]!.output,
    };
    return this.failure(e, taskId, why, now);
  }
}

export function cancelled(message: string, at: number, output = ""): Ending {
  return { state: TaskState.CANCELED, message, reason: "canceled", output, finishedAt: at };
}
