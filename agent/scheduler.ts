// The agent's task runner: job executions as DAGs of tasks, with trigger rules, priorities,
// concurrency limits, not_before/expiry, maintenance windows, preconditions, retries with
// backoff, timeouts, cancellation, recurring schedules and crash recovery.
//
// Task lifecycle (every transition goes through `apply`, persisted before the act it allows):
//   QUEUED ─┬─> WAITING (deps, window, not_before, precondition, backoff) ─> QUEUED/RUNNING
//           ├─> RUNNING ─> SUCCEEDED | FAILED | TIMED_OUT | CANCELED   (FAILED/TIMED_OUT with
//           │                attempts left -> WAITING "retry_backoff")
//           └─> SKIPPED (trigger rule, skip precondition) | FAILED (expired, fail precondition)
//                        | CANCELED (job cancelled)
import type { KeyObject } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { truncateOutput } from "../common/output.js";
import {
  TaskCanceledError,
  TaskFailedError,
  TaskTimeoutError,
  UnrecoverableError,
} from "../firmware-tasks/errors.js";
import type { ArtifactSource, SystemPort, TaskHandler, TaskPolicy } from "../firmware-tasks/types.js";
import { type DecodedTask as TaskSpec, TaskState, type TaskStatus, TERMINAL_STATES } from "../proto/index.js";
import { JOB_DEP_PREFIX } from "../proto/jobspec.js";
import type { TrustedClock } from "./clock.js";
import { CronMatcher } from "./cron.js";
import { deriveJobState, evaluateTrigger } from "./dag.js";
import { checkRequirements, type Facts } from "./facts.js";
import type { AgentStore, ExecutionRecord, JobRecord, TaskRun } from "./store.js";
import type { Spec } from "./verify.js";

const TICK_MS = 1000;
const PROGRESS_EVERY_MS = 1000;
const RECURRING_LOOKBACK_MS = 60_000;
const KEEP_DONE_OCCURRENCES = 10;
const COMPACT_GRACE_MS = 60 * 60_000;

export interface SchedulerOptions {
  store: AgentStore;
  clock: TrustedClock;
  handlers: ReadonlyMap<string, TaskHandler>;
  policy: TaskPolicy;
  root: string;
  dataDir: string;
  log: Logger;
  counters: Counters;
  facts: () => Facts;
  system: SystemPort;
  artifacts: ArtifactSource;
  trustedKeys: ReadonlyMap<string, KeyObject>;
  maxConcurrency: number;
  typeConcurrency: Readonly<Record<string, number>>;
  /** Called after statuses are on disk (the outbox picks them up). */
  onStatuses: (s: TaskStatus[]) => void;
}

interface JobPlan {
  record: JobRecord;
  spec: Spec;
  params: Map<string, unknown>;
  tasks: Map<string, { spec: TaskSpec; index: number }>;
  window?: CronMatcher;
  schedule?: CronMatcher;
  lastChecked: number;
}

interface Running {
  controller: AbortController;
  type: string;
  lastProgressAt: number;
}

type Patch = Partial<TaskRun> & { state: TaskState };

const execKey = (jobId: string, execId: string) => `${jobId}!${execId}`;
const runKey = (jobId: string, execId: string, taskId: string) => `${jobId}!${execId}!${taskId}`;

export class Scheduler {
  private readonly jobs = new Map<string, JobPlan>();
  /** Executions not yet done, plus the latest one of every job (for `job:` deps and re-acks). */
  private readonly active = new Map<string, ExecutionRecord>();
  private readonly latest = new Map<string, ExecutionRecord>();
  private readonly running = new Map<string, Running>();
  /** Occurrence ids of recurring jobs, oldest first. */
  private readonly occurrences = new Map<string, string[]>();
  private timer: NodeJS.Timeout | undefined;
  private scheduled = false;
  private stopped = false;
  private lastCompact = 0;

  constructor(private readonly o: SchedulerOptions) {}

  // ---- lifecycle -------------------------------------------------------------------------

  /** Loads jobs and executions and applies crash recovery (DESIGN.md §4.5). */
  async load(
    decode: (r: JobRecord) => { spec: Spec; params: Map<string, unknown> } | undefined,
  ): Promise<void> {
    for (const r of await this.o.store.loadJobs()) {
      const d = decode(r);
      if (!d) {
        this.o.log.error({ jobId: r.jobId }, "stored job no longer decodes; dropping it");
        this.o.counters.inc("stored_job_undecodable");
        continue;
      }
      this.addPlan(r, d.spec, d.params);
    }
    const recovered: TaskStatus[] = [];
    const changed: ExecutionRecord[] = [];
    const now = this.o.clock.now();
    for (const e of await this.o.store.loadExecutions()) {
      this.track(e);
      if (e.done) continue;
      const plan = this.jobs.get(e.jobId);
      for (const [taskId, run] of Object.entries(e.tasks)) {
        if (run.state !== TaskState.RUNNING) continue;
        const t = plan?.tasks.get(taskId);
        const h = t && this.o.handlers.get(t.spec.type);
        if (h?.resumable) {
          recovered.push(
            this.patch(e, taskId, {
              state: TaskState.QUEUED,
              message: "resuming after a restart",
              reason: "resuming",
              resume: true,
            }),
          );
        } else if (h?.idempotent) {
          recovered.push(
            this.patch(e, taskId, {
              state: TaskState.QUEUED,
              message: "re-running after interruption",
              reason: "interrupted",
            }),
          );
        } else {
          recovered.push(
            ...this.failure(e, taskId, "interrupted by an agent restart", "interrupted", now, run.output),
          );
        }
        changed.push(e);
      }
      recovered.push(...this.settle(e));
    }
    if (recovered.length) {
      this.o.log.warn(
        { count: recovered.length },
        "recovered tasks that were running when the agent stopped",
      );
      await this.commit({ executions: changed, statuses: recovered }, true);
    }
  }

  start(): void {
    this.stopped = false;
    this.timer = setInterval(() => this.tick(), TICK_MS);
    this.kick();
  }

  /** Stops scheduling; running tasks are aborted and stay RUNNING on disk (recovered on start). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    for (const r of this.running.values()) r.controller.abort(new Error("agent stopping"));
    for (const p of this.jobs.values()) {
      p.window?.dispose();
      p.schedule?.dispose();
    }
  }

  // ---- queries ----------------------------------------------------------------------------

  hasJob(jobId: string): JobRecord | undefined {
    return this.jobs.get(jobId)?.record;
  }

  jobIds(): string[] {
    return [...this.jobs.keys()];
  }

  get queueDepth(): number {
    let n = 0;
    for (const e of this.active.values()) if (!e.done) n++;
    return n;
  }

  get runningCount(): number {
    return this.running.size;
  }

  /** The job-level status used to re-acknowledge an identical re-delivery. */
  currentJobStatus(jobId: string): TaskStatus {
    const plan = this.jobs.get(jobId);
    const e = this.latest.get(jobId);
    const state = e
      ? (e.jobState ?? this.jobStateOf(e))
      : plan?.record.cancelled
        ? TaskState.CANCELED
        : TaskState.QUEUED;
    return {
      jobId,
      taskId: "",
      executionId: e?.execId ?? "",
      state,
      message: "already accepted",
      reason: "duplicate_delivery",
      atMs: this.o.clock.now(),
    };
  }

  // ---- commands ---------------------------------------------------------------------------

  /** Adds an accepted job; for a one-shot job creates its execution with every task QUEUED. */
  async accept(record: JobRecord, spec: Spec, params: Map<string, unknown>): Promise<void> {
    const plan = this.addPlan(record, spec, params);
    const executions: ExecutionRecord[] = [];
    if (!plan.schedule) executions.push(this.newExecution(plan, ""));
    const queued: TaskStatus = {
      jobId: record.jobId,
      taskId: "",
      executionId: "",
      state: TaskState.QUEUED,
      message: plan.schedule ? `scheduled: ${spec.schedule?.cron}` : `accepted, ${spec.tasks.length} task(s)`,
      atMs: this.o.clock.now(),
    };
    await this.commit({ jobs: [record], executions, statuses: [queued] }, true);
    for (const e of executions) this.track(e);
    this.kick();
  }

  async cancel(jobId: string, reason: string): Promise<boolean> {
    const plan = this.jobs.get(jobId);
    if (!plan || plan.record.cancelled) return false;
    plan.record.cancelled = { reason, at: this.o.clock.now() };
    const statuses: TaskStatus[] = [];
    const changed: ExecutionRecord[] = [];
    for (const e of this.active.values()) {
      if (e.jobId !== jobId || e.done) continue;
      for (const [taskId, run] of Object.entries(e.tasks)) {
        const r = this.running.get(runKey(jobId, e.execId, taskId));
        if (r) r.controller.abort(new TaskCanceledError(reason));
        else if (!TERMINAL_STATES.has(run.state))
          statuses.push(
            this.patch(e, taskId, { state: TaskState.CANCELED, message: reason, reason: "canceled" }),
          );
      }
      statuses.push(...this.settle(e));
      changed.push(e);
    }
    if (!changed.length)
      statuses.push({
        ...this.currentJobStatus(jobId),
        state: TaskState.CANCELED,
        message: reason,
        reason: "canceled",
      });
    await this.commit({ jobs: [plan.record], executions: changed, statuses }, true);
    this.kick();
    return true;
  }

  /** Coalesces evaluation requests into one pass. */
  kick(): void {
    if (this.scheduled || this.stopped) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      this.evaluate().catch((err) => this.o.log.error({ err }, "scheduler pass failed"));
    });
  }

  private tick(): void {
    try {
      this.fireRecurring();
      this.kick();
      const now = this.o.clock.now();
      if (now - this.lastCompact > 10 * 60_000) {
        this.lastCompact = now;
        this.compact(now).catch((err) => this.o.log.error({ err }, "compaction failed"));
      }
    } catch (err) {
      this.o.log.error({ err }, "scheduler tick failed");
    }
  }

  // ---- plans and executions -------------------------------------------------------------

  private addPlan(record: JobRecord, spec: Spec, params: Map<string, unknown>): JobPlan {
    const plan: JobPlan = {
      record,
      spec,
      params,
      tasks: new Map(spec.tasks.map((t, index) => [t.id, { spec: t, index }])),
      lastChecked: this.o.clock.now(),
    };
    if (spec.window?.cron) plan.window = new CronMatcher(spec.window.cron, spec.window.timezone);
    if (spec.schedule?.cron) plan.schedule = new CronMatcher(spec.schedule.cron, spec.schedule.timezone);
    this.jobs.set(record.jobId, plan);
    return plan;
  }

  private newExecution(plan: JobPlan, execId: string): ExecutionRecord {
    const tasks: Record<string, TaskRun> = {};
    for (const t of plan.spec.tasks)
      tasks[t.id] = { state: TaskState.QUEUED, attempt: 0, progress: 0, message: "", reason: "" };
    return { jobId: plan.record.jobId, execId, createdAt: this.o.clock.now(), done: false, tasks };
  }

  private track(e: ExecutionRecord): void {
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

  private jobStateOf(e: ExecutionRecord): TaskState {
    const plan = this.jobs.get(e.jobId);
    return deriveJobState(
      Object.values(e.tasks).map((t) => t.state),
      Boolean(plan?.record.cancelled),
    );
  }

  /** Applies a patch to a task run and returns the status describing it. */
  private patch(e: ExecutionRecord, taskId: string, p: Patch): TaskStatus {
    const run = e.tasks[taskId]!;
    Object.assign(run, p);
    const plan = this.jobs.get(e.jobId);
    return {
      jobId: e.jobId,
      taskId,
      executionId: e.execId,
      taskType: plan?.tasks.get(taskId)?.spec.type ?? "",
      state: run.state,
      attempt: run.attempt,
      progress: run.progress,
      message: run.message,
      reason: run.reason,
      output: run.output ?? "",
      atMs: this.o.clock.now(),
      startedAtMs: run.startedAt ?? 0,
      finishedAtMs: run.finishedAt ?? 0,
    };
  }

  /** Marks the execution done when every task is terminal; returns the job-level status if so. */
  private settle(e: ExecutionRecord): TaskStatus[] {
    if (e.done || Object.values(e.tasks).some((t) => !TERMINAL_STATES.has(t.state))) return [];
    e.done = true;
    e.jobState = this.jobStateOf(e);
    this.track(e);
    const counts = new Map<string, number>();
    for (const t of Object.values(e.tasks))
      counts.set(TaskState[t.state]!, (counts.get(TaskState[t.state]!) ?? 0) + 1);
    return [
      {
        jobId: e.jobId,
        taskId: "",
        executionId: e.execId,
        state: e.jobState,
        message: [...counts].map(([s, n]) => `${n} ${s}`).join(", "),
        atMs: this.o.clock.now(),
        finishedAtMs: this.o.clock.now(),
      },
    ];
  }

  /** A failed attempt: retry after backoff while attempts remain, else terminal. */
  private failure(
    e: ExecutionRecord,
    taskId: string,
    message: string,
    reason: string,
    now: number,
    output?: string,
    state: TaskState = TaskState.FAILED,
    retryable = true,
  ): TaskStatus[] {
    const run = e.tasks[taskId]!;
    const spec = this.jobs.get(e.jobId)?.tasks.get(taskId)?.spec;
    const max = Math.max(1, spec?.retry?.maxAttempts ?? 1);
    const attempt = Math.max(1, run.attempt);
    if (retryable && attempt < max && !this.jobs.get(e.jobId)?.record.cancelled) {
      const factor = spec?.retry?.factor || 2;
      const delayMs = (spec?.retry?.backoffS ?? 0) * 1000 * factor ** (attempt - 1);
      return [
        this.patch(e, taskId, {
          state: TaskState.WAITING,
          nextAttemptAt: now + delayMs,
          message: `attempt ${attempt}/${max} ${TaskState[state]}: ${message}; retrying in ${Math.round(delayMs / 100) / 10}s`,
          reason: "retry_backoff",
          output: output ?? "",
          finishedAt: now,
        }),
      ];
    }
    return [
      this.patch(e, taskId, { state, message, reason, output: output ?? "", finishedAt: now }),
      ...this.settle(e),
    ];
  }

  private async commit(
    c: {
      jobs?: JobRecord[];
      executions?: ExecutionRecord[];
      statuses?: TaskStatus[];
      deleteJobs?: string[];
      deleteExecutions?: Array<{ jobId: string; execId: string }>;
    },
    sync: boolean,
  ): Promise<void> {
    const executions = c.executions ? [...new Set(c.executions)] : undefined;
    try {
      const statuses = await this.o.store.commit({ ...c, executions }, sync);
      if (statuses.length) this.o.onStatuses(statuses);
    } catch (err) {
      // Disk full or I/O error: state stays in memory and is re-persisted with the next change.
      this.o.counters.inc("store_write_failed");
      this.o.log.error({ err }, "cannot persist task state");
      throw err;
    }
  }

  // ---- the scheduling pass ----------------------------------------------------------------

  private async evaluate(): Promise<void> {
    if (this.stopped) return;
    const now = this.o.clock.now();
    const facts = this.o.facts();
    const statuses: TaskStatus[] = [];
    const changed: ExecutionRecord[] = [];
    let sync = false;
    const ready: Array<{ e: ExecutionRecord; plan: JobPlan; taskId: string; spec: TaskSpec; index: number }> =
      [];

    // With every slot taken, a plain QUEUED task could only become ready: skip it without
    // work, so a deep queue costs little per pass (the pass after a slot frees sees it).
    const full = this.running.size >= this.o.maxConcurrency;
    for (const e of this.active.values()) {
      if (e.done) continue;
      const plan = this.jobs.get(e.jobId);
      if (!plan) continue;
      const before = statuses.length;
      const wait = (taskId: string, reason: string, message: string) => {
        const run = e.tasks[taskId]!;
        // A status only when the kind of wait changes, not on every pass.
        if (run.state === TaskState.WAITING && run.reason === reason) return;
        statuses.push(this.patch(e, taskId, { state: TaskState.WAITING, reason, message }));
      };
      for (const [taskId, run] of Object.entries(e.tasks)) {
        if (run.state !== TaskState.QUEUED && run.state !== TaskState.WAITING) continue;
        if (this.running.has(runKey(e.jobId, e.execId, taskId))) continue;
        const t = plan.tasks.get(taskId);
        if (!t) continue;
        const plain =
          run.state === TaskState.QUEUED &&
          now < plan.record.expiresAt &&
          !t.spec.dependsOn?.length &&
          !t.spec.trigger &&
          !t.spec.requires?.length &&
          !plan.spec.notBeforeMs &&
          !plan.window;
        if (plain) {
          if (!full) ready.push({ e, plan, taskId, spec: t.spec, index: t.index });
          continue;
        }
        if (now >= plan.record.expiresAt) {
          statuses.push(
            this.patch(e, taskId, {
              state: TaskState.FAILED,
              reason: "expired",
              message: `job expired before the task ran${run.message ? ` (${run.message})` : ""}`,
              finishedAt: now,
            }),
          );
          continue;
        }
        const deps = new Map<string, TaskState>();
        const missing: string[] = [];
        for (const d of t.spec.dependsOn ?? []) {
          if (d.startsWith(JOB_DEP_PREFIX)) {
            const other = this.latest.get(d.slice(JOB_DEP_PREFIX.length));
            if (other) deps.set(d, other.done ? other.jobState! : TaskState.RUNNING);
            else missing.push(d);
          } else deps.set(d, e.tasks[d]?.state ?? TaskState.QUEUED);
        }
        const decision = evaluateTrigger(t.spec.trigger ?? 0, deps);
        if (decision.kind === "skip") {
          statuses.push(
            this.patch(e, taskId, {
              state: TaskState.SKIPPED,
              reason: "trigger",
              message: decision.message,
              finishedAt: now,
            }),
          );
          continue;
        }
        if (missing.length || decision.kind === "wait") {
          wait(
            taskId,
            "dependencies",
            `waiting for ${[...missing, ...(decision.kind === "wait" ? decision.on : [])].join(", ")}`,
          );
          continue;
        }
        if (plan.spec.notBeforeMs && now < plan.spec.notBeforeMs) {
          wait(taskId, "not_before", `not before ${new Date(plan.spec.notBeforeMs).toISOString()}`);
          continue;
        }
        if (run.nextAttemptAt && now < run.nextAttemptAt) continue; // already WAITING retry_backoff
        if (plan.window && !plan.window.windowOpen(now, (plan.spec.window?.durationS ?? 0) * 1000).open) {
          wait(
            taskId,
            "window",
            `outside maintenance window "${plan.spec.window?.cron}" (${plan.spec.window?.timezone || "UTC"})`,
          );
          continue;
        }
        const pre = checkRequirements(t.spec.requires ?? [], facts);
        if (pre.kind === "wait") {
          wait(taskId, "precondition", pre.message);
          continue;
        }
        if (pre.kind === "fail") {
          statuses.push(
            this.patch(e, taskId, {
              state: TaskState.FAILED,
              reason: "precondition",
              message: `unmet ${pre.message}`,
              finishedAt: now,
            }),
          );
          continue;
        }
        if (pre.kind === "skip") {
          statuses.push(
            this.patch(e, taskId, {
              state: TaskState.SKIPPED,
              reason: "precondition",
              message: `unmet ${pre.message}`,
              finishedAt: now,
            }),
          );
          continue;
        }
        ready.push({ e, plan, taskId, spec: t.spec, index: t.index });
      }
      const settled = this.settle(e);
      statuses.push(...settled);
      if (statuses.length > before) {
        changed.push(e);
        if (statuses.slice(before).some((s) => TERMINAL_STATES.has(s.state!))) sync = true;
      }
    }
    if (statuses.length) await this.commit({ executions: changed, statuses }, sync);

    ready.sort(
      (a, b) =>
        (b.spec.priority ?? 0) - (a.spec.priority ?? 0) ||
        a.e.createdAt - b.e.createdAt ||
        a.plan.record.receivedAt - b.plan.record.receivedAt ||
        a.index - b.index,
    );
    for (const r of ready) {
      if (this.running.size >= this.o.maxConcurrency) break;
      const limit = this.o.typeConcurrency[r.spec.type];
      if (
        limit !== undefined &&
        [...this.running.values()].filter((x) => x.type === r.spec.type).length >= limit
      )
        continue;
      this.launch(r.e, r.plan, r.taskId, r.spec);
    }
  }

  // ---- running a task ---------------------------------------------------------------------

  private launch(e: ExecutionRecord, plan: JobPlan, taskId: string, spec: TaskSpec): void {
    const key = runKey(e.jobId, e.execId, taskId);
    const entry: Running = { controller: new AbortController(), type: spec.type, lastProgressAt: 0 };
    this.running.set(key, entry);
    this.execute(e, plan, taskId, spec, entry)
      .catch((err) => this.o.log.error({ err, jobId: e.jobId, taskId }, "task bookkeeping failed"))
      .finally(() => {
        this.running.delete(key);
        this.kick();
      });
  }

  private async execute(e: ExecutionRecord, plan: JobPlan, taskId: string, spec: TaskSpec, entry: Running) {
    const handler = this.o.handlers.get(spec.type)!;
    const run = e.tasks[taskId]!;
    const resumed = Boolean(run.resume);
    const startedAt = this.o.clock.now();
    const log = this.o.log.child({ jobId: e.jobId, taskId, execId: e.execId || undefined, type: spec.type });
    // Persist RUNNING before acting: after a crash this is what tells us the task was interrupted.
    const started = this.patch(e, taskId, {
      state: TaskState.RUNNING,
      attempt: run.resume ? Math.max(1, run.attempt) : run.attempt + 1,
      resume: undefined,
      progress: 0,
      message: "",
      reason: "",
      output: "",
      startedAt,
      finishedAt: undefined,
      nextAttemptAt: undefined,
    });
    await this.commit({ executions: [e], statuses: [started] }, true);
    if (entry.controller.signal.aborted) {
      // Cancelled between the decision and the write.
      const reason = entry.controller.signal.reason;
      if (reason instanceof TaskCanceledError) {
        await this.finish(e, [
          this.patch(e, taskId, {
            state: TaskState.CANCELED,
            message: reason.message,
            reason: "canceled",
            finishedAt: startedAt,
          }),
          ...this.settle(e),
        ]);
      }
      return;
    }
    const timeoutS = spec.timeoutS ?? 0;
    const timer =
      timeoutS > 0
        ? setTimeout(() => entry.controller.abort(new TaskTimeoutError(timeoutS)), timeoutS * 1000)
        : undefined;
    const scratchDir = handler.scratch === false ? "" : await mkdtemp(join(tmpdir(), "fleet-task-"));
    const signal = entry.controller.signal;
    const aborted = new Promise<never>((_, reject) => {
      if (signal.aborted) reject(signal.reason);
      signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    });
    aborted.catch(() => {});
    try {
      const result = await Promise.race([
        handler.run(
          {
            jobId: e.jobId,
            taskId,
            executionId: e.execId,
            attempt: run.attempt,
            root: this.o.root,
            dataDir: this.o.dataDir,
            scratchDir,
            facts: this.o.facts(),
            kv: this.o.store.kv,
            log,
            policy: this.o.policy,
            system: this.o.system,
            artifacts: this.o.artifacts,
            trustedKeys: this.o.trustedKeys,
            resumed,
            now: () => this.o.clock.now(),
            progress: (percent, message) => this.progress(e, taskId, entry, percent, message),
          },
          plan.params.get(taskId),
          signal,
        ),
        aborted,
      ]);
      if (this.stopped) return;
      const now = this.o.clock.now();
      await this.finish(e, [
        this.patch(e, taskId, {
          state: TaskState.SUCCEEDED,
          progress: 100,
          message: result?.message ?? "ok",
          reason: "",
          output: truncateOutput(result?.output ?? "", this.o.policy.outputLimitBytes),
          finishedAt: now,
        }),
        ...this.settle(e),
      ]);
      log.info({ attempt: run.attempt, ms: now - startedAt }, "task succeeded");
    } catch (err) {
      if (this.stopped) return; // stays RUNNING on disk; recovery decides on the next start
      const now = this.o.clock.now();
      const reason = signal.aborted ? signal.reason : err;
      const output = truncateOutput(
        err instanceof TaskFailedError ? (err.details.output ?? "") : "",
        this.o.policy.outputLimitBytes,
      );
      let statuses: TaskStatus[];
      if (reason instanceof TaskCanceledError) {
        statuses = [
          this.patch(e, taskId, {
            state: TaskState.CANCELED,
            message: reason.message,
            reason: "canceled",
            output,
            finishedAt: now,
          }),
          ...this.settle(e),
        ];
      } else if (reason instanceof TaskTimeoutError) {
        statuses = this.failure(e, taskId, reason.message, "timeout", now, output, TaskState.TIMED_OUT);
      } else {
        const msg = (reason as Error)?.message ?? String(reason);
        const why = reason instanceof TaskFailedError ? (reason.details.reason ?? "failed") : "error";
        statuses = this.failure(
          e,
          taskId,
          msg,
          why,
          now,
          output,
          TaskState.FAILED,
          !(reason instanceof UnrecoverableError),
        );
      }
      await this.finish(e, statuses);
      log.warn(
        { attempt: run.attempt, state: TaskState[e.tasks[taskId]!.state], err: (reason as Error)?.message },
        "task did not succeed",
      );
    } finally {
      if (timer) clearTimeout(timer);
      if (scratchDir) await rm(scratchDir, { recursive: true, force: true }).catch(() => {});
    }
  }

  private finish(e: ExecutionRecord, statuses: TaskStatus[]): Promise<void> {
    return this.commit({ executions: [e], statuses }, true);
  }

  private progress(
    e: ExecutionRecord,
    taskId: string,
    entry: Running,
    percent: number,
    message?: string,
  ): void {
    const run = e.tasks[taskId]!;
    if (run.state !== TaskState.RUNNING || entry.controller.signal.aborted) return;
    run.progress = Math.max(0, Math.min(100, Math.round(percent)));
    if (message !== undefined) run.message = message;
    const now = this.o.clock.now();
    if (now - entry.lastProgressAt < PROGRESS_EVERY_MS) return;
    entry.lastProgressAt = now;
    this.commit(
      { executions: [e], statuses: [this.patch(e, taskId, { state: TaskState.RUNNING })] },
      false,
    ).catch(() => {});
  }

  // ---- recurring jobs and compaction --------------------------------------------------------

  /** Starts at most one occurrence per job per tick, whatever the clock did (see cron.ts). */
  private fireRecurring(): void {
    const now = this.o.clock.now();
    for (const plan of this.jobs.values()) {
      if (!plan.schedule || plan.record.cancelled) continue;
      if (now >= plan.record.expiresAt || (plan.spec.notBeforeMs && now < plan.spec.notBeforeMs)) continue;
      if (now < plan.lastChecked) plan.lastChecked = now - TICK_MS; // time moved back: resume from here
      const slot = plan.schedule.latestSlot(plan.lastChecked, now, RECURRING_LOOKBACK_MS);
      plan.lastChecked = now;
      if (slot === undefined) continue;
      const prev = this.latest.get(plan.record.jobId);
      if (prev && !prev.done) {
        this.o.counters.inc("occurrence_skipped_overlap");
        this.o.log.warn({ jobId: plan.record.jobId }, "previous occurrence still running; skipping this one");
        continue;
      }
      // The slot alone is not unique: the clock may come back to it. The counter is.
      plan.record.occurrences = (plan.record.occurrences ?? 0) + 1;
      plan.record.lastSlot = slot;
      const e = this.newExecution(plan, `${new Date(slot).toISOString()}#${plan.record.occurrences}`);
      this.track(e);
      const old = this.pruneOccurrences(plan.record.jobId);
      this.commit({ jobs: [plan.record], executions: [e], deleteExecutions: old }, true).catch(() => {});
    }
  }

  /** The oldest occurrence ids beyond the history limit, to delete. */
  private pruneOccurrences(jobId: string): Array<{ jobId: string; execId: string }> {
    const list = this.occurrences.get(jobId) ?? [];
    const drop =
      list.length > KEEP_DONE_OCCURRENCES ? list.splice(0, list.length - KEEP_DONE_OCCURRENCES) : [];
    return drop.map((execId) => ({ jobId, execId }));
  }

  /** Forgets jobs whose expiry has passed and whose executions are all done (the seen-id record). */
  async compact(now = this.o.clock.now()): Promise<number> {
    const dead: string[] = [];
    for (const [jobId, plan] of this.jobs) {
      if (now < plan.record.expiresAt + COMPACT_GRACE_MS) continue;
      if ([...this.active.values()].some((e) => e.jobId === jobId)) continue;
      dead.push(jobId);
    }
    if (!dead.length) return 0;
    await this.o.store.forget(Math.max(...dead.map((id) => this.jobs.get(id)!.record.expiresAt)));
    const deleteExecutions: Array<{ jobId: string; execId: string }> = [];
    for (const e of await this.o.store.loadExecutions())
      if (dead.includes(e.jobId)) deleteExecutions.push({ jobId: e.jobId, execId: e.execId });
    await this.commit({ deleteJobs: dead, deleteExecutions }, false);
    for (const id of dead) {
      const p = this.jobs.get(id);
      p?.window?.dispose();
      p?.schedule?.dispose();
      this.jobs.delete(id);
      this.latest.delete(id);
      this.occurrences.delete(id);
    }
    this.o.counters.inc("jobs_compacted", dead.length);
    return dead.length;
  }
}
