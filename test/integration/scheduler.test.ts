// Table-driven scheduler tests through a real agent, a real aedes broker and real LevelDB.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { AgentConfigInput } from "../../agent/config.js";
import { type JobSpec, OnUnmet, TaskState as S, type TaskStatus } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec, type TaskInput } from "../helpers/keys.js";
import { events, testHandlers } from "../helpers/probe.js";

let h: Harness;
let n = 0;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

interface Case {
  name: string;
  tasks: TaskInput[];
  job?: () => Partial<JobSpec>;
  config?: Partial<AgentConfigInput>;
  facts?: Record<string, string | number>;
  /** Runs once the job is accepted. */
  act?: (ctx: { deviceId: string; jobId: string }) => Promise<void>;
  expectTasks: Record<string, S>;
  expectJob: S;
  check?: (ctx: { statuses: TaskStatus[]; events: string[] }) => void;
}

const probe = (id: string, params: object = {}, extra: Partial<TaskInput> = {}): TaskInput => ({
  id,
  type: "probe",
  params,
  ...extra,
});
const order = (ev: string[], a: string, b: string) =>
  expect(ev.indexOf(a), `${a} before ${b} in ${ev.join(",")}`).toBeLessThan(ev.indexOf(b));
const soon = (ms: number) => Date.now() + ms;
const hourFromNow = (new Date().getUTCHours() + 12) % 24;

const cases: Case[] = [
  {
    name: "chain runs in order",
    tasks: [probe("a"), probe("b", {}, { dependsOn: ["a"] }), probe("c", {}, { dependsOn: ["b"] })],
    expectTasks: { a: S.SUCCEEDED, b: S.SUCCEEDED, c: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ events: ev }) =>
      expect(ev).toEqual(["start:a", "end:a", "start:b", "end:b", "start:c", "end:c"]),
  },
  {
    name: "diamond branches run in parallel",
    config: { maxConcurrency: 2 },
    tasks: [
      probe("a"),
      probe("b", { ms: 300 }, { dependsOn: ["a"] }),
      probe("c", { ms: 300 }, { dependsOn: ["a"] }),
      probe("d", {}, { dependsOn: ["b", "c"] }),
    ],
    expectTasks: { a: S.SUCCEEDED, b: S.SUCCEEDED, c: S.SUCCEEDED, d: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ events: ev }) => {
      order(ev, "start:b", "end:c");
      order(ev, "start:c", "end:b");
      order(ev, "end:b", "start:d");
      order(ev, "end:c", "start:d");
    },
  },
  {
    name: "all_success: a failed upstream skips the task",
    tasks: [probe("a", { failTimes: 1 }), probe("b", {}, { dependsOn: ["a"] })],
    expectTasks: { a: S.FAILED, b: S.SKIPPED },
    expectJob: S.FAILED,
    check: ({ statuses }) =>
      expect(statuses.find((s) => s.taskId === "b" && s.state === S.SKIPPED)?.message).toContain(
        "upstream a",
      ),
  },
  {
    name: "all_done runs after a failure",
    tasks: [probe("a", { failTimes: 1 }), probe("b", {}, { dependsOn: ["a"], trigger: "all_done" })],
    expectTasks: { a: S.FAILED, b: S.SUCCEEDED },
    expectJob: S.FAILED,
  },
  {
    name: "one_failed runs a cleanup only when something failed",
    tasks: [
      probe("ok"),
      probe("bad", { failTimes: 1 }),
      probe("cleanup-ok", {}, { dependsOn: ["ok"], trigger: "one_failed" }),
      probe("cleanup-bad", {}, { dependsOn: ["bad"], trigger: "one_failed" }),
    ],
    expectTasks: { ok: S.SUCCEEDED, bad: S.FAILED, "cleanup-ok": S.SKIPPED, "cleanup-bad": S.SUCCEEDED },
    expectJob: S.FAILED,
  },
  {
    name: "priority: higher first under a concurrency limit of 1",
    config: { maxConcurrency: 1 },
    tasks: [
      probe("low", {}, { priority: 1 }),
      probe("high", {}, { priority: 10 }),
      probe("mid", {}, { priority: 5 }),
    ],
    expectTasks: { low: S.SUCCEEDED, high: S.SUCCEEDED, mid: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ events: ev }) =>
      expect(ev.filter((e) => e.startsWith("start"))).toEqual(["start:high", "start:mid", "start:low"]),
  },
  {
    name: "per-type limit serializes one type while the global limit allows more",
    config: { maxConcurrency: 4, typeConcurrency: { probe: 1 } },
    tasks: [
      probe("p1", { ms: 150 }),
      probe("p2", { ms: 150 }),
      { id: "s", type: "sleep", params: { seconds: 0.3 } },
    ],
    expectTasks: { p1: S.SUCCEEDED, p2: S.SUCCEEDED, s: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ events: ev }) => {
      const [first, second] = ev[0] === "start:p1" ? ["p1", "p2"] : ["p2", "p1"];
      order(ev, `end:${first}`, `start:${second}`);
    },
  },
  {
    name: "retries with backoff until success",
    tasks: [probe("a", { failTimes: 2 }, { retry: { maxAttempts: 3, backoffS: 0.1, factor: 2 } })],
    expectTasks: { a: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ statuses }) => {
      const a = statuses.filter((s) => s.taskId === "a");
      expect(a.map((s) => `${S[s.state!]}#${s.attempt}`)).toEqual([
        "RUNNING#1",
        "WAITING#1",
        "RUNNING#2",
        "WAITING#2",
        "RUNNING#3",
        "SUCCEEDED#3",
      ]);
      expect(a[1]?.message).toMatch(/attempt 1\/3 FAILED: planned failure 1; retrying in 0.1s/);
      expect(a[3]?.message).toMatch(/retrying in 0.2s/);
    },
  },
  {
    name: "retries exhausted: FAILED with the last output",
    tasks: [probe("a", { failTimes: 5 }, { retry: { maxAttempts: 2, backoffS: 0 } })],
    expectTasks: { a: S.FAILED },
    expectJob: S.FAILED,
    check: ({ statuses }) =>
      expect(statuses.filter((s) => s.taskId === "a").at(-1)).toMatchObject({ attempt: 2, output: "out2" }),
  },
  {
    name: "timeout aborts the task",
    tasks: [probe("a", { ms: 10_000 }, { timeoutS: 1 })],
    expectTasks: { a: S.TIMED_OUT },
    expectJob: S.TIMED_OUT,
    check: ({ statuses }) => expect(statuses.at(-2)?.message).toBe("timed out after 1s"),
  },
  {
    name: "timeout ends a task that ignores its abort signal",
    tasks: [probe("a", { ms: 3000, ignoreAbort: true }, { timeoutS: 1 })],
    expectTasks: { a: S.TIMED_OUT },
    expectJob: S.TIMED_OUT,
  },
  {
    name: "timeout then retry",
    tasks: [probe("a", { ms: 10_000 }, { timeoutS: 1, retry: { maxAttempts: 2, backoffS: 0 } })],
    expectTasks: { a: S.TIMED_OUT },
    expectJob: S.TIMED_OUT,
    check: ({ statuses }) =>
      expect(statuses.filter((s) => s.taskId === "a" && s.state === S.RUNNING)).toHaveLength(2),
  },
  {
    name: "cancel stops the running task and cancels the queued ones",
    tasks: [probe("a", { ms: 10_000 }), probe("b", {}, { dependsOn: ["a"] })],
    act: async ({ deviceId, jobId }) => {
      await h.ctl.waitFor("a running", () => h.ctl.latest(deviceId, jobId, "a")?.state === S.RUNNING);
      await h.ctl.cancel(deviceId, jobId, "operator said stop");
    },
    expectTasks: { a: S.CANCELED, b: S.CANCELED },
    expectJob: S.CANCELED,
    check: ({ statuses }) =>
      expect(statuses.find((s) => s.taskId === "a" && s.state === S.CANCELED)?.message).toBe(
        "operator said stop",
      ),
  },
  {
    name: "precondition wait holds the task until the job expires",
    job: () => ({ expiresAtMs: soon(2500) }),
    facts: { "battery.percent": 10 },
    tasks: [
      probe(
        "a",
        {},
        { requires: [{ fact: "battery.percent", op: ">=", value: "30", onUnmet: OnUnmet.ON_UNMET_WAIT }] },
      ),
    ],
    expectTasks: { a: S.FAILED },
    expectJob: S.FAILED,
    check: ({ statuses }) => {
      const a = statuses.filter((s) => s.taskId === "a");
      expect(a[0]).toMatchObject({ state: S.WAITING, reason: "precondition" });
      expect(a[0]?.message).toContain("battery.percent >= 30 (is 10)");
      expect(a.at(-1)).toMatchObject({ state: S.FAILED, reason: "expired" });
    },
  },
  {
    name: "precondition fail and skip",
    facts: { "disk.free": 100 * 1024 ** 2 },
    tasks: [
      probe(
        "f",
        {},
        { requires: [{ fact: "disk.free", op: ">=", value: "500MB", onUnmet: OnUnmet.ON_UNMET_FAIL }] },
      ),
      probe(
        "s",
        {},
        { requires: [{ fact: "os.arch", op: "in", value: "sparc,mips", onUnmet: OnUnmet.ON_UNMET_SKIP }] },
      ),
      probe("ok", {}, { requires: [{ fact: "disk.free", op: ">=", value: "50MB" }] }),
    ],
    expectTasks: { f: S.FAILED, s: S.SKIPPED, ok: S.SUCCEEDED },
    expectJob: S.FAILED,
    check: ({ statuses }) =>
      expect(statuses.find((x) => x.taskId === "f")?.message).toContain("disk.free >= 500MB"),
  },
  {
    name: "outside the maintenance window: WAITING until expiry",
    job: () => ({
      expiresAtMs: soon(2500),
      window: { cron: `0 ${hourFromNow} * * *`, durationS: 60, timezone: "UTC" },
    }),
    tasks: [probe("a")],
    expectTasks: { a: S.FAILED },
    expectJob: S.FAILED,
    check: ({ statuses, events: ev }) => {
      expect(statuses.find((s) => s.taskId === "a")).toMatchObject({ state: S.WAITING, reason: "window" });
      expect(ev).toEqual([]);
    },
  },
  {
    name: "inside the maintenance window: runs",
    job: () => ({ window: { cron: "* * * * *", durationS: 120, timezone: "Europe/Berlin" } }),
    tasks: [probe("a")],
    expectTasks: { a: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
  },
  {
    name: "not_before holds the job",
    job: () => ({ notBeforeMs: soon(1500) }),
    tasks: [probe("a")],
    expectTasks: { a: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ statuses }) => {
      expect(statuses.find((s) => s.taskId === "a")).toMatchObject({
        state: S.WAITING,
        reason: "not_before",
      });
    },
  },
  {
    name: "shell: allowed command succeeds with its output",
    config: { allowShell: ["/bin/sh"] },
    tasks: [
      { id: "sh", type: "shell", params: { command: "/bin/sh", args: ["-c", "echo hello; echo err >&2"] } },
    ],
    expectTasks: { sh: S.SUCCEEDED },
    expectJob: S.SUCCEEDED,
    check: ({ statuses }) =>
      expect(statuses.find((s) => s.state === S.SUCCEEDED)?.output).toBe("hello\nerr\n"),
  },
  {
    name: "shell: non-zero exit fails, output truncated to the limit",
    config: { allowShell: ["/bin/sh"], outputLimitBytes: 1024 },
    tasks: [
      {
        id: "sh",
        type: "shell",
        params: {
          command: "/bin/sh",
          args: ["-c", "head -c 5000 /dev/zero | tr '\\0' x; echo; echo boom; exit 3"],
        },
      },
    ],
    expectTasks: { sh: S.FAILED },
    expectJob: S.FAILED,
    check: ({ statuses }) => {
      const s = statuses.find((x) => x.state === S.FAILED && x.taskId === "sh")!;
      expect(s.message).toBe("/bin/sh exit code 3");
      expect(s.reason).toBe("nonzero_exit");
      expect(s.output).toMatch(/^\[\.\.\. \d+ bytes truncated\]\nx+\nboom\n$/);
      expect(Buffer.byteLength(s.output!)).toBeLessThanOrEqual(1024);
    },
  },
  {
    name: "shell: timeout kills the whole process group",
    config: { allowShell: ["/bin/sh"] },
    tasks: [
      {
        id: "sh",
        type: "shell",
        timeoutS: 1,
        params: { command: "/bin/sh", args: ["-c", "sleep 47.5 & sleep 47.5; wait"] },
      },
    ],
    expectTasks: { sh: S.TIMED_OUT },
    expectJob: S.TIMED_OUT,
    check: () => {
      let left = "";
      try {
        left = execFileSync("pgrep", ["-f", "sleep 47.5"]).toString();
      } catch {
        left = "";
      }
      expect(left).toBe("");
    },
  },
];

describe("scheduler", () => {
  it.each(cases.map((c) => [c.name, c] as const))("%s", async (_name, c) => {
    const deviceId = `sched-${++n}`;
    // Every transition is sent (no flush window: these check the scheduler's transitions).
    await h.newAgent(
      deviceId,
      { statusFlushMs: 0, ...c.config },
      { handlers: testHandlers, extraFacts: c.facts },
    );
    events.length = 0;
    const spec = jobSpec(c.tasks, c.job?.());
    const jobId = await h.ctl.assign(deviceId, spec);
    await h.ctl.waitFor("accepted", () => h.ctl.latest(deviceId, jobId, ""));
    if (c.act) await c.act({ deviceId, jobId });
    const done = await h.ctl.waitJob(deviceId, jobId);
    const statuses = h.ctl.statuses(deviceId).filter((s) => s.jobId === jobId);
    const final = Object.fromEntries(
      Object.keys(c.expectTasks).map((t) => [t, S[h.ctl.latest(deviceId, jobId, t)?.state ?? 0]]),
    );
    expect(final).toEqual(Object.fromEntries(Object.entries(c.expectTasks).map(([t, s]) => [t, S[s]])));
    expect(S[done.state!]).toBe(S[c.expectJob]);
    c.check?.({ statuses, events: [...events] });
  });

  it("cross-job dependency waits for the other job and follows its result", async () => {
    const deviceId = `sched-${++n}`;
    await h.newAgent(deviceId, { maxConcurrency: 2, statusFlushMs: 0 }, { handlers: testHandlers });
    events.length = 0;
    const first = jobSpec([probe("first", { ms: 300 })]);
    const failing = jobSpec([probe("bad", { failTimes: 1 })]);
    await h.ctl.assign(deviceId, first);
    await h.ctl.assign(deviceId, failing);
    const after = await h.ctl.assign(
      deviceId,
      jobSpec([probe("after", {}, { dependsOn: [`job:${first.jobId}`] })]),
    );
    const afterBad = await h.ctl.assign(
      deviceId,
      jobSpec([probe("afterBad", {}, { dependsOn: [`job:${failing.jobId}`] })]),
    );
    expect((await h.ctl.waitJob(deviceId, after)).state).toBe(S.SUCCEEDED);
    expect((await h.ctl.waitJob(deviceId, afterBad)).state).toBe(S.SUCCEEDED);
    expect(h.ctl.latest(deviceId, afterBad, "afterBad")?.state).toBe(S.SKIPPED);
    order(events, "end:first", "start:after");
    expect(h.ctl.statuses(deviceId).find((s) => s.jobId === after && s.taskId === "after")).toMatchObject({
      state: S.WAITING,
      reason: "dependencies",
    });
  });

  it("a task's scratch directory is the agent's own and goes with the run; what a killed run left goes at the next start", async () => {
    const deviceId = `sched-${++n}`;
    let agent = await h.newAgent(deviceId, { allowShell: ["/bin/sh"], statusFlushMs: 0 });
    const shell = async (script: string) => {
      const jobId = await h.ctl.assign(
        deviceId,
        jobSpec([{ id: "sh", type: "shell", params: { command: "/bin/sh", args: ["-c", script] } }]),
      );
      await h.ctl.waitJob(deviceId, jobId);
      return h.ctl.latest(deviceId, jobId, "sh")!;
    };
    const ran = await shell("pwd; head -c 4096 /dev/zero > big.bin");
    expect(S[ran.state!]).toBe("SUCCEEDED");
    const dir = ran.output!.trim();
    expect(dir).toMatch(/\/var\/lib\/fleet-agent\/scratch\/task-[^/]+$/);
    expect(existsSync(dir)).toBe(false);
    // As a process killed mid-task leaves it: found and removed before the next start runs anything.
    const root = dirname(dir);
    const stale = join(root, "task-killed");
    mkdirSync(stale);
    writeFileSync(join(stale, "big.bin"), "x".repeat(4096));
    agent = await h.restartAgent(agent);
    expect(existsSync(stale)).toBe(false);
    // A scratch root that cannot be made is the task's failure, with the reason, not the agent's.
    rmSync(root, { recursive: true, force: true });
    writeFileSync(root, "not a directory");
    const refused = await shell("pwd");
    expect(S[refused.state!]).toBe("FAILED");
    expect(refused.message).toMatch(/cannot make a scratch directory under .*scratch: (ENOTDIR|EEXIST)/);
    rmSync(root);
    expect(S[(await shell("pwd")).state!]).toBe("SUCCEEDED");
    expect(agent.connected).toBe(true);
  });
});
