// The scheduler's decisions, without a broker, a store or a clock: the readiness ladder, the
// retry arithmetic and how an attempt's ending is classified.
import { describe, expect, it } from "vitest";
import { JobTable } from "../../agent/job-table.js";
import { decideReadiness, type ReadinessInput } from "../../agent/readiness.js";
import { retryDelay } from "../../agent/retry.js";
import type { StoredJob } from "../../agent/store.js";
import { classify } from "../../agent/task-runner.js";
import type { Spec } from "../../agent/verify.js";
import {
  TaskCanceledError,
  TaskFailedError,
  TaskTimeoutError,
  UnrecoverableError,
} from "../../firmware-tasks/errors.js";
import { type DecodedTask, OnUnmet, pb, TaskState as S, type TaskSpec, Trigger } from "../../proto/index.js";

const NOW = Date.parse("2026-11-28T12:00:00Z");
const task = (t: Partial<TaskSpec> = {}) =>
  pb.TaskSpec.create({ id: "t", type: "noop", ...t }) as DecodedTask;
const input = (over: Partial<ReadinessInput> = {}): ReadinessInput => ({
  now: NOW,
  task: task(),
  run: { message: "" },
  job: { expiresAt: NOW + 60_000 },
  dependency: () => undefined,
  facts: () => ({}),
  ...over,
});

describe("readiness", () => {
  it("a task with nothing to wait for runs, without looking at facts", () => {
    let looked = false;
    const facts = () => {
      looked = true;
      return {};
    };
    expect(decideReadiness(input({ facts }))).toEqual({ kind: "run" });
    expect(looked).toBe(false);
  });
  it("expiry comes first, and keeps the reason it was waiting", () => {
    const d = decideReadiness(input({ job: { expiresAt: NOW }, run: { message: "waiting for a" } }));
    expect(d).toEqual({
      kind: "end",
      state: S.FAILED,
      reason: "expired",
      message: "job expired before the task ran (waiting for a)",
    });
  });
  it("dependencies: waits while pending, skips when upstream failed, runs after success", () => {
    const states: Record<string, S> = { a: S.RUNNING };
    const i = input({ task: task({ dependsOn: ["a"] }), dependency: (d) => states[d] });
    expect(decideReadiness(i)).toMatchObject({
      kind: "wait",
      reason: "dependencies",
      message: "waiting for a",
    });
    states.a = S.FAILED;
    expect(decideReadiness(i)).toMatchObject({ kind: "end", state: S.SKIPPED, reason: "trigger" });
    states.a = S.SUCCEEDED;
    expect(decideReadiness(i)).toEqual({ kind: "run" });
  });
  it("a job: dependency this device does not hold waits; one_failed skips when all succeeded", () => {
    const i = input({ task: task({ dependsOn: ["job:other"] }) });
    expect(decideReadiness(i)).toMatchObject({ kind: "wait", message: "waiting for job:other" });
    const onFail = input({
      task: task({ dependsOn: ["a"], trigger: Trigger.TRIGGER_ONE_FAILED }),
      dependency: () => S.SUCCEEDED,
    });
    expect(decideReadiness(onFail)).toMatchObject({ kind: "end", state: S.SKIPPED });
  });
  it("not_before, then retry backoff (hold: no new status), then the window", () => {
    const later = input({ job: { expiresAt: NOW + 60_000, notBeforeMs: NOW + 1000 } });
    expect(decideReadiness(later)).toMatchObject({ kind: "wait", reason: "not_before" });
    const backoff = input({ run: { message: "", nextAttemptAt: NOW + 1 } });
    expect(decideReadiness(backoff)).toEqual({ kind: "hold" });
    const over = input({ run: { message: "", nextAttemptAt: NOW } });
    expect(decideReadiness(over)).toEqual({ kind: "run" });
    const closed = input({
      job: { expiresAt: NOW + 60_000, window: { open: () => false, describe: '"0 2 * * *"' } },
    });
    expect(decideReadiness(closed)).toEqual({
      kind: "wait",
      reason: "window",
      message: 'outside maintenance window "0 2 * * *"',
    });
  });
  it("preconditions: wait, skip or fail as the requirement says", () => {
    const req = (onUnmet: OnUnmet) =>
      task({ requires: [{ fact: "battery", op: ">=", value: "50", onUnmet }] });
    const facts = () => ({ battery: 20 });
    expect(decideReadiness(input({ task: req(OnUnmet.ON_UNMET_WAIT), facts }))).toMatchObject({
      kind: "wait",
      reason: "precondition",
    });
    expect(decideReadiness(input({ task: req(OnUnmet.ON_UNMET_SKIP), facts }))).toMatchObject({
      kind: "end",
      state: S.SKIPPED,
    });
    expect(decideReadiness(input({ task: req(OnUnmet.ON_UNMET_FAIL), facts }))).toMatchObject({
      kind: "end",
      state: S.FAILED,
      message: "unmet precondition battery >= 50 (is 20)",
    });
    expect(
      decideReadiness(input({ task: req(OnUnmet.ON_UNMET_FAIL), facts: () => ({ battery: 80 }) })),
    ).toEqual({
      kind: "run",
    });
  });
});

describe("retry arithmetic", () => {
  it("backs off by factor^(attempt-1) until the attempts are used up", () => {
    const p = { maxAttempts: 4, backoffS: 2, factor: 3 };
    expect([1, 2, 3, 4].map((a) => retryDelay(p, a))).toEqual([2000, 6000, 18_000, undefined]);
  });
  it("one attempt by default; factor 2 by default", () => {
    expect(retryDelay(undefined, 1)).toBeUndefined();
    expect(retryDelay({ maxAttempts: 3, backoffS: 1 }, 2)).toBe(2000);
    expect(retryDelay({ maxAttempts: 3 }, 0)).toBe(0); // an attempt counted from 1
  });
});

describe("attempt outcomes", () => {
  it("cancel and timeout come from the abort reason, failures from what was thrown", () => {
    expect(classify(new TaskCanceledError("stop"), undefined, 100)).toMatchObject({ kind: "canceled" });
    expect(classify(new TaskTimeoutError(5), undefined, 100)).toMatchObject({
      kind: "timed_out",
      message: "timed out after 5s",
    });
    const f = new TaskFailedError("exit 3", { reason: "exit_code", output: "x".repeat(500) });
    const out = classify(f, f, 100);
    expect(out).toMatchObject({ kind: "failed", reason: "exit_code", retryable: true });
    expect(Buffer.byteLength((out as { output: string }).output)).toBeLessThanOrEqual(100);
    const u = new UnrecoverableError("bad image");
    expect(classify(u, u, 100)).toMatchObject({ kind: "failed", retryable: false });
    expect(classify(new Error("boom"), new Error("boom"), 100)).toMatchObject({
      reason: "error",
      retryable: true,
    });
  });
});

describe("job-state rules (JobTable)", () => {
  const spec = (tasks: Array<Partial<TaskSpec>>, more: Partial<Spec> = {}) =>
    ({ jobId: "j", tasks: tasks.map((t, i) => task({ id: `t${i}`, ...t })), ...more }) as unknown as Spec;
  const record = (): StoredJob => ({
    jobId: "j",
    digest: "d",
    signed: new Uint8Array(),
    receivedAt: NOW,
    expiresAt: NOW + 3600_000,
  });
  const setup = (tasks: Array<Partial<TaskSpec>>, more: Partial<Spec> = {}) => {
    const table = new JobTable();
    const plan = table.add(record(), spec(tasks, more), new Map(), NOW);
    const e = table.newExecution(plan, "", NOW);
    table.track(e);
    return { table, plan, e };
  };

  it("only scheduled jobs are in the tick's list of recurring plans, and leave it with their job", () => {
    const table = new JobTable();
    table.add(record(), spec([{}]), new Map(), NOW);
    table.add(
      { ...record(), jobId: "r" },
      spec([{}], { jobId: "r", schedule: { cron: "* * * * *" } } as never),
      new Map(),
      NOW,
    );
    expect([...table.plans.keys()]).toEqual(["j", "r"]);
    expect([...table.recurring.keys()]).toEqual(["r"]);
    table.remove("r");
    expect([...table.recurring.keys()]).toEqual([]);
  });

  it("a failed attempt waits for its retry, the last one ends the task and the execution", () => {
    const { table, e } = setup([{ retry: { maxAttempts: 2, backoffS: 5 } }]);
    table.start(e, "t0", NOW);
    const first = table.finished(
      e,
      "t0",
      { kind: "failed", message: "exit 1", reason: "exit_code", output: "", retryable: true },
      NOW,
    );
    expect(first).toHaveLength(1);
    expect(first[0]).toMatchObject({ state: S.WAITING, reason: "retry_backoff", attempt: 1 });
    expect(e.tasks.t0!.nextAttemptAt).toBe(NOW + 5000);
    table.start(e, "t0", NOW + 5000);
    const last = table.finished(
      e,
      "t0",
      { kind: "failed", message: "exit 1", reason: "exit_code", output: "", retryable: true },
      NOW + 5000,
    );
    expect(last.map((s) => [s.taskId, s.state])).toEqual([
      ["t0", S.FAILED],
      ["", S.FAILED],
    ]);
    expect(last[1]!.message).toBe("1 FAILED");
    expect(e.done).toBe(true);
    expect(table.queueDepth).toBe(0);
  });
  it("an unrecoverable failure, or one of a cancelled job, is not retried", () => {
    const { table, e, plan } = setup([{ retry: { maxAttempts: 5 } }, {}]);
    table.start(e, "t0", NOW);
    const out = table.finished(
      e,
      "t0",
      { kind: "failed", message: "x", reason: "r", output: "", retryable: false },
      NOW,
    );
    expect(out).toEqual([expect.objectContaining({ state: S.FAILED })]); // t1 still queued: no job status
    plan.record.cancelled = { reason: "stop", at: NOW };
    table.start(e, "t1", NOW);
    table.finished(e, "t1", { kind: "timed_out", message: "timed out after 1s", output: "" }, NOW);
    expect(e.tasks.t1!.state).toBe(S.TIMED_OUT);
    expect(e.jobState).toBe(S.CANCELED);
  });
  it("recovery: resumable continues the attempt, idempotent re-runs, anything else failed", () => {
    const { table, e } = setup([{}, {}, {}]);
    for (const id of ["t0", "t1", "t2"]) table.start(e, id, NOW);
    expect(table.recover(e, "t0", { resumable: true }, NOW)[0]).toMatchObject({
      state: S.QUEUED,
      reason: "resuming",
    });
    expect(table.recover(e, "t1", { idempotent: true }, NOW)[0]).toMatchObject({
      state: S.QUEUED,
      reason: "interrupted",
    });
    expect(table.recover(e, "t2", undefined, NOW)[0]).toMatchObject({
      state: S.FAILED,
      reason: "interrupted",
    });
    expect(table.start(e, "t0", NOW).attempt).toBe(1); // same attempt
    expect(table.start(e, "t1", NOW).attempt).toBe(2);
  });
  it("job: dependencies read the other job's latest execution", () => {
    const { table, e } = setup([{}]);
    expect(table.dependency(e, "job:j")).toBe(S.RUNNING);
    expect(table.dependency(e, "job:other")).toBeUndefined();
    table.start(e, "t0", NOW);
    table.finished(e, "t0", { kind: "succeeded", message: "ok", output: "" }, NOW);
    expect(table.dependency(e, "job:j")).toBe(S.SUCCEEDED);
  });
  it("a recurring job starts one occurrence per slot and skips a slot while one still runs", () => {
    const table = new JobTable();
    const plan = table.add(
      record(),
      spec([{}], { schedule: { cron: "* * * * *" } } as Partial<Spec>),
      new Map(),
      NOW,
    );
    const first = table.occurrence(plan, NOW + 60_000, 1000, 60_000);
    expect(first).toMatchObject({ kind: "start" });
    expect(table.occurrence(plan, NOW + 61_000, 1000, 60_000)).toEqual({ kind: "none" }); // same slot
    expect(table.occurrence(plan, NOW + 120_000, 1000, 60_000)).toEqual({ kind: "overlap" });
    expect(plan.record.occurrences).toBe(1);
  });
});
