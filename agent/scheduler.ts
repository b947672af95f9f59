// The agent's task scheduler: job executions as DAGs of tasks, with trigger rules, priorities,
// concurrency limits, not_before/expiry, maintenance windows, preconditions, retries with
// backoff, timeouts, cancellation, recurring schedules and crash recovery.
//
// Decisions and effects are apart: readiness.ts decides what a waiting task should do,
// retry.ts when a failed one runs again, task-runner.ts runs one attempt and says how it
// ended; this file applies those decisions as transitions and persists each before the act
// it allows. Every status is built in status.ts and enters the outbox through `commit`.
// job-table.ts holds the jobs and executions and the rules of each transition. This file is
// a little over 400 lines: it is where the running set, the pass and the commits meet.
//
// Task lifecycle:
//   QUEUED ─┬─> WAITING (deps, window, not_before, precondition, backoff) ─> QUEUED/RUNNING
//           ├─> RUNNING ─> SUCCEEDED | FAILED | TIMED_OUT | CANCELED   (FAILED/TIMED_OUT with
//           │                attempts left -> WAITING "retry_backoff")
//           └─> SKIPPED (trigger rule, skip precondition) | FAILED (expired, fail precondition)
//                        | CANCELED (job cancelled)
import type { KeyObject } from "node:crypto";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { TaskCanceledError } from "../firmware-tasks/errors.js";
import type { ArtifactSource, SystemPort, TaskHandler, TaskPolicy } from "../firmware-tasks/types.js";
import { type DecodedTask, TaskState, type TaskStatus, TERMINAL_STATES } from "../proto/index.js";
import type { TrustedClock } from "./clock.js";
import type { Facts } from "./facts.js";
import { cancelled, type JobPlan, JobTable, type Patch } from "./job-table.js";
import { decideReadiness, type Runnable, runOrder } from "./readiness.js";
import { jobStatus } from "./status.js";
import type { AgentStore, Commit, ExecutionRecord, StoredJob } from "./store.js";
import { runTask } from "./task-runner.js";
import type { Spec } from "./verify.js";

const TICK_MS = 1000;
const PROGRESS_EVERY_MS = 1000;
const RECURRING_LOOKBACK_MS = 60_000;
const COMPACT_GRACE_MS = 60 * 60_000;
/** The first retry of a task's start or result that could not be written; then doubled up to the max. */
const PERSIST_RETRY_MS = 200;
const PERSIST_RETRY_MAX_MS = 30_000;

export interface SchedulerOptions {
  store: AgentStore;
  clock: TrustedClock;
  handlers: ReadonlyMap<string, TaskHandler>;
  policy: TaskPolicy;
  root: string;
  dataDir: string;
  /** Where each run's scratch directory is made. */
  scratchRoot: string;
  log: Logger;
  counters: Counters;
  facts: () => Facts;
  system: SystemPort;
  artifacts: ArtifactSource;
  trustedKeys: ReadonlyMap<string, KeyObject>;
  maxConcurrency: number;
  typeConcurrency: Readonly<Record<string, number>>;
  /** Called after task states changed on disk (the device's state is published soon after). */
  onChange?: () => void;
  /** After a pass that left nothing running, scheduled or being written (`busy` false). */
  onIdle?: () => void;
}

interface Running {
  controller: AbortController;
  type: string;
  lastProgressAt: number;
}

interface Ready extends Runnable {
  e: ExecutionRecord;
  spec: DecodedTask;
  plan: JobPlan;
  taskId: string;
}

const runKey = (jobId: string, execId: string, taskId: string) => `${jobId}!${execId}!${taskId}`;

export class Scheduler {
  private readonly table = new JobTable();
  private readonly running = new Map<string, Running>();
  private timer: NodeJS.Timeout | undefined;
  private scheduled = false;
  private stopped = false;
  private lastCompact = 0;
  private committing = 0;

  constructor(private readonly opts: SchedulerOptions) {}

  // ---- lifecycle -------------------------------------------------------------------------

  /** Loads jobs and executions and applies crash recovery (DESIGN.md §4.5). */
  async load(
    decode: (r: StoredJob) => { spec: Spec; params: Map<string, unknown> } | undefined,
  ): Promise<void> {
    const { store, log, counters, handlers } = this.opts;
    const now = this.now();
    for (const r of await store.loadJobs()) {
      const d = decode(r);
      if (!d) {
        log.error({ jobId: r.jobId }, "stored job no longer decodes; dropping it");
        counters.inc("stored_job_undecodable");
        continue;
      }
      this.table.add(r, d.spec, d.params, now);
    }
    const recovered: TaskStatus[] = [];
    const changed: ExecutionRecord[] = [];
    for (const e of await store.loadExecutions()) {
      this.table.track(e);
      if (e.done) continue;
      const plan = this.table.plans.get(e.jobId);
      for (const [taskId, run] of Object.entries(e.tasks)) {
        if (run.state !== TaskState.RUNNING) continue;
        const t = plan?.tasks.get(taskId);
        recovered.push(...this.table.recover(e, taskId, t && handlers.get(t.spec.type), now));
        changed.push(e);
      }
      recovered.push(...this.table.settle(e, now));
    }
    if (recovered.length) {
      log.warn({ count: recovered.length }, "recovered tasks that were running when the agent stopped");
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
  }

  // ---- queries ----------------------------------------------------------------------------

  /** The stored record of a job this device holds. */
  job(jobId: string): StoredJob | undefined {
    return this.table.plans.get(jobId)?.record;
  }

  jobIds(): string[] {
    return [...this.table.plans.keys()];
  }

  get queueDepth(): number {
    return this.table.queueDepth;
  }

  get runningCount(): number {
    return this.running.size;
  }

  /** Tasks run, a pass is due or a commit is on its way: more statuses are coming soon. */
  get busy(): boolean {
    return this.running.size > 0 || this.scheduled || this.committing > 0;
  }

  /** The job-level status used to re-acknowledge an identical re-delivery. */
  currentJobStatus(jobId: string): TaskStatus {
    const e = this.table.latest.get(jobId);
    const state = e
      ? (e.jobState ?? this.table.jobState(e))
      : this.job(jobId)?.cancelled
        ? TaskState.CANCELED
        : TaskState.QUEUED;
    return jobStatus(jobId, state, "already accepted", this.now(), {
      executionId: e?.execId ?? "",
      reason: "duplicate_delivery",
    });
  }

  // ---- commands ---------------------------------------------------------------------------

  /**
   * Adds an accepted job; for a one-shot job creates its execution with every task QUEUED —
   * and the tasks that may start at once RUNNING, in the same write (issue 17: one durable
   * write per job for accept, QUEUED and the first start; still "persist, then act").
   */
  async accept(
    record: StoredJob,
    spec: Spec,
    params: Map<string, unknown>,
    meta?: Record<string, unknown>,
  ): Promise<void> {
    const now = this.now();
    const plan = this.table.add(record, spec, params, now);
    const executions = plan.schedule ? [] : [this.table.newExecution(plan, "", now)];
    const message = plan.schedule
      ? `scheduled: ${spec.schedule?.cron}`
      : `accepted, ${spec.tasks.length} task(s)`;
    const statuses = [jobStatus(record.jobId, TaskState.QUEUED, message, now)];
    const ready: Ready[] = [];
    for (const e of executions) {
      this.assess(e, plan, now, statuses, this.stopped ? undefined : ready);
      statuses.push(...this.table.settle(e, now));
    }
    const starting = this.reserve(ready);
    for (const { r } of starting) statuses.push(this.table.start(r.e, r.taskId, now));
    try {
      await this.commit({ jobs: [record], executions, statuses, ...(meta ? { meta } : {}) }, true);
    } catch (err) {
      // Not accepted: forgotten here too, so that the re-delivery (no PUBACK) is a new job again.
      for (const { key } of starting) this.running.delete(key);
      this.table.remove(record.jobId);
      throw err;
    }
    for (const e of executions) this.table.track(e);
    const cancelledMeanwhile = plan.record.cancelled;
    for (const { r, key, entry } of starting) {
      if (cancelledMeanwhile) entry.controller.abort(new TaskCanceledError(cancelledMeanwhile.reason));
      this.launch(r, key, entry, true);
    }
    this.kick();
  }

  async cancel(jobId: string, reason: string): Promise<boolean> {
    const plan = this.table.plans.get(jobId);
    if (!plan || plan.record.cancelled) return false;
    const now = this.now();
    plan.record.cancelled = { reason, at: now };
    const statuses: TaskStatus[] = [];
    const changed: ExecutionRecord[] = [];
    for (const e of this.table.active.values()) {
      if (e.jobId !== jobId || e.done) continue;
      for (const [taskId, run] of Object.entries(e.tasks)) {
        const r = this.running.get(runKey(jobId, e.execId, taskId));
        if (r) r.controller.abort(new TaskCanceledError(reason));
        else if (!TERMINAL_STATES.has(run.state))
          statuses.push(
            this.patch(e, taskId, { state: TaskState.CANCELED, message: reason, reason: "canceled" }),
          );
      }
      statuses.push(...this.table.settle(e, now));
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
      this.evaluate()
        .then(() => {
          if (!this.busy) this.opts.onIdle?.();
        })
        .catch((err) => this.opts.log.error({ err }, "scheduler pass failed"));
    });
  }

  private tick(): void {
    try {
      this.fireRecurring();
      this.kick();
      const now = this.now();
      if (now - this.lastCompact > 10 * 60_000) {
        this.lastCompact = now;
        this.compact(now).catch((err) => this.opts.log.error({ err }, "compaction failed"));
      }
    } catch (err) {
      this.opts.log.error({ err }, "scheduler tick failed");
    }
  }

  // ---- transitions --------------------------------------------------------------------------

  private now(): number {
    return this.opts.clock.now();
  }

  private patch(e: ExecutionRecord, taskId: string, p: Patch): TaskStatus {
    return this.table.patch(e, taskId, p, this.now());
  }

  /** The one way state reaches the disk and statuses reach the outbox. */
  private async commit(c: Commit, sync: boolean): Promise<void> {
    this.committing++;
    try {
      const executions = c.executions && [...new Set(c.executions)];
      if ((await this.opts.store.commit({ ...c, executions }, sync)).length) this.opts.onChange?.();
    } catch (err) {
      // Disk full or I/O error: state stays in memory and is written with the next change (a
      // task's start and result are written again until they land: commitDurably).
      this.opts.counters.inc("store_write_failed");
      this.opts.log.error({ err }, "cannot persist task state");
      throw err;
    } finally {
      this.committing--;
    }
  }

  /**
   * A task's own transitions must reach the disk: its start before it acts (after a crash that
   * is what says it was interrupted), its result so that the controller learns it and a restart
   * does not take a finished task for an interrupted one. A write that fails (disk full, I/O
   * error) is tried again, with the execution as it is then, at a growing interval until it
   * lands or the agent stops; the task holds its slot meanwhile. The outbox fills the seqs of
   * the failed write with lost-write records; the statuses get new ones.
   */
  private async commitDurably(c: Commit): Promise<void> {
    for (let wait = PERSIST_RETRY_MS; ; wait = Math.min(wait * 2, PERSIST_RETRY_MAX_MS)) {
      try {
        return await this.commit(c, true);
      } catch (err) {
        if (this.stopped) throw err;
        this.opts.log.warn({ retryInMs: wait }, "task state not written; writing it again");
        await new Promise((r) => setTimeout(r, wait).unref());
        if (this.stopped) throw err;
      }
    }
  }

  // ---- the scheduling pass ----------------------------------------------------------------

  private async evaluate(): Promise<void> {
    if (this.stopped) return;
    const now = this.now();
    let facts: Facts | undefined;
    const statuses: TaskStatus[] = [];
    const changed: ExecutionRecord[] = [];
    let sync = false;
    const ready: Ready[] = [];
    // With every slot taken, a task that may run stays as it is: the pass after a slot frees
    // sees it again, so a deep queue costs only its readiness checks per pass.
    const full = this.running.size >= this.opts.maxConcurrency;
    for (const e of this.table.active.values()) {
      const plan = this.table.plans.get(e.jobId);
      if (e.done || !plan) continue;
      const before = statuses.length;
      this.assess(e, plan, now, statuses, full ? undefined : ready, () => (facts ??= this.opts.facts()));
      statuses.push(...this.table.settle(e, now));
      if (statuses.length > before) {
        changed.push(e);
        if (statuses.slice(before).some((s) => TERMINAL_STATES.has(s.state!))) sync = true;
      }
    }
    if (statuses.length) await this.commit({ executions: changed, statuses }, sync);
    this.launchReady(ready);
  }

  /**
   * What each waiting task of `e` should do now: ends and waits become statuses, tasks that may
   * run join `ready` (when given: not when every slot is taken).
   */
  private assess(
    e: ExecutionRecord,
    plan: JobPlan,
    now: number,
    statuses: TaskStatus[],
    ready: Ready[] | undefined,
    facts: () => Facts = () => this.opts.facts(),
  ): void {
    const window = plan.window && {
      open: (at: number) => plan.window!.windowOpen(at, (plan.spec.window?.durationS ?? 0) * 1000).open,
      describe: `"${plan.spec.window?.cron}" (${plan.spec.window?.timezone || "UTC"})`,
    };
    for (const [taskId, run] of Object.entries(e.tasks)) {
      if (run.state !== TaskState.QUEUED && run.state !== TaskState.WAITING) continue;
      const t = plan.tasks.get(taskId);
      if (!t || this.running.has(runKey(e.jobId, e.execId, taskId))) continue;
      const d = decideReadiness({
        now,
        task: t.spec,
        run,
        job: { expiresAt: plan.record.expiresAt, notBeforeMs: plan.spec.notBeforeMs, window },
        dependency: (dep) => this.table.dependency(e, dep),
        facts,
      });
      if (d.kind === "run") {
        ready?.push({ e, plan, taskId, spec: t.spec, index: t.index, receivedAt: plan.record.receivedAt });
      } else if (d.kind === "end") {
        statuses.push(
          this.patch(e, taskId, { state: d.state, reason: d.reason, message: d.message, finishedAt: now }),
        );
      } else if (d.kind === "wait" && !(run.state === TaskState.WAITING && run.reason === d.reason)) {
        // A status only when the kind of wait changes, not on every pass.
        statuses.push(
          this.patch(e, taskId, { state: TaskState.WAITING, reason: d.reason, message: d.message }),
        );
      }
    }
  }

  /** Takes slots for ready tasks by priority, then age, within the global and per-type limits. */
  private reserve(ready: Ready[]): Array<{ r: Ready; key: string; entry: Running }> {
    ready.sort((a, b) => runOrder(a, b));
    const taken: Array<{ r: Ready; key: string; entry: Running }> = [];
    for (const r of ready) {
      if (this.running.size >= this.opts.maxConcurrency) break;
      const limit = this.opts.typeConcurrency[r.spec.type];
      if (
        limit !== undefined &&
        [...this.running.values()].filter((x) => x.type === r.spec.type).length >= limit
      )
        continue;
      const key = runKey(r.e.jobId, r.e.execId, r.taskId);
      const entry: Running = { controller: new AbortController(), type: r.spec.type, lastProgressAt: 0 };
      this.running.set(key, entry);
      taken.push({ r, key, entry });
    }
    return taken;
  }

  /** Starts ready tasks by priority, then age, within the global and per-type limits. */
  private launchReady(ready: Ready[]): void {
    for (const { r, key, entry } of this.reserve(ready)) this.launch(r, key, entry, false);
  }

  /** Runs a task in its reserved slot; `started`: its RUNNING is on disk already. */
  private launch(r: Ready, key: string, entry: Running, started: boolean): void {
    this.execute(r, entry, started)
      .catch((err) =>
        this.opts.log.error({ err, jobId: r.e.jobId, taskId: r.taskId }, "task bookkeeping failed"),
      )
      .finally(() => {
        this.running.delete(key);
        this.kick();
      });
  }

  // ---- running a task ---------------------------------------------------------------------

  private async execute({ e, plan, taskId, spec }: Ready, entry: Running, started: boolean): Promise<void> {
    const o = this.opts;
    const run = e.tasks[taskId]!;
    const resumed = Boolean(run.resume);
    const startedAt = this.now();
    // The task's logger is made when something logs (a child logger per task is garbage a
    // thousand noop jobs a second do not need).
    let child: Logger | undefined;
    const log = () =>
      (child ??= o.log.child({ jobId: e.jobId, taskId, execId: e.execId || undefined, type: spec.type }));
    // Persist RUNNING before acting: after a crash this is what tells us the task was interrupted.
    // (A task started with its job's acceptance is on disk already: the same write.)
    if (!started) {
      const status = this.table.start(e, taskId, startedAt);
      await this.commitDurably({ executions: [e], statuses: [status] });
    }
    const signal = entry.controller.signal;
    if (signal.aborted) {
      // Cancelled between the decision and the write.
      if (signal.reason instanceof TaskCanceledError)
        await this.finish(e, this.table.end(e, taskId, cancelled(signal.reason.message, startedAt)));
      return;
    }
    const outcome = await runTask({
      handler: o.handlers.get(spec.type)!,
      scratchRoot: o.scratchRoot,
      context: {
        jobId: e.jobId,
        taskId,
        executionId: e.execId,
        attempt: run.attempt,
        root: o.root,
        dataDir: o.dataDir,
        facts: o.facts(),
        kv: o.store.kv,
        get log() {
          return log();
        },
        policy: o.policy,
        system: o.system,
        artifacts: o.artifacts,
        trustedKeys: o.trustedKeys,
        resumed,
        now: () => this.now(),
        progress: (percent, message) => this.progress(e, taskId, entry, percent, message),
      },
      params: plan.params.get(taskId),
      controller: entry.controller,
      timeoutS: spec.timeoutS ?? 0,
      outputLimitBytes: o.policy.outputLimitBytes,
    });
    if (this.stopped) return; // stays RUNNING on disk; recovery decides on the next start
    const now = this.now();
    await this.finish(e, this.table.finished(e, taskId, outcome, now));
    if (outcome.kind === "succeeded") {
      if (o.log.isLevelEnabled("info"))
        log().info({ attempt: run.attempt, ms: now - startedAt }, "task succeeded");
    } else
      log().warn(
        { attempt: run.attempt, state: TaskState[e.tasks[taskId]!.state], err: outcome.message },
        "task did not succeed",
      );
  }

  private finish(e: ExecutionRecord, statuses: TaskStatus[]): Promise<void> {
    return this.commitDurably({ executions: [e], statuses });
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
    const now = this.now();
    if (now - entry.lastProgressAt < PROGRESS_EVERY_MS) return;
    entry.lastProgressAt = now;
    const status = this.patch(e, taskId, { state: TaskState.RUNNING });
    this.commit({ executions: [e], statuses: [status] }, false).catch(() => {});
  }

  // ---- recurring jobs and compaction --------------------------------------------------------

  /** Starts at most one occurrence per job per tick, whatever the clock did (see cron.ts). */
  private fireRecurring(): void {
    const now = this.now();
    for (const plan of this.table.recurring.values()) {
      const due = this.table.occurrence(plan, now, TICK_MS, RECURRING_LOOKBACK_MS);
      if (due.kind === "overlap") {
        this.opts.counters.inc("occurrence_skipped_overlap");
        this.opts.log.warn(
          { jobId: plan.record.jobId },
          "previous occurrence still running; skipping this one",
        );
      } else if (due.kind === "start") {
        const c = { jobs: [plan.record], executions: [due.execution], deleteExecutions: due.prune };
        this.commit(c, true).catch(() => {});
      }
    }
  }

  /** Forgets jobs whose expiry has passed and whose executions are all done (the seen-id record). */
  async compact(now = this.now()): Promise<number> {
    const dead = this.table.expired(now, COMPACT_GRACE_MS);
    if (!dead.length) return 0;
    await this.opts.store.forget(Math.max(...dead.map((r) => r.expiresAt)));
    const ids = new Set(dead.map((r) => r.jobId));
    const deleteExecutions = (await this.opts.store.loadExecutions())
      .filter((e) => ids.has(e.jobId))
      .map((e) => ({ jobId: e.jobId, execId: e.execId }));
    await this.commit({ deleteJobs: [...ids], deleteExecutions }, false);
    for (const id of ids) this.table.remove(id);
    this.opts.counters.inc("jobs_compacted", ids.size);
    return ids.size;
  }
}
