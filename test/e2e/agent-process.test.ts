// Real agent processes killed with SIGKILL at the worst moments (DESIGN.md §4.2, §4.5).
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TaskState as S } from "../../proto/index.js";
import { startBroker, type TestBroker } from "../helpers/broker.js";
import { TestController } from "../helpers/controller.js";
import { jobSpec } from "../helpers/keys.js";
import { type AgentProcess, flashRoot, spawnAgent } from "../helpers/process.js";

let broker: TestBroker;
let ctl: TestController;
const cleanups: Array<() => void> = [];
const procs: AgentProcess[] = [];

beforeAll(async () => {
  broker = await startBroker();
  ctl = new TestController(broker.url);
  await ctl.start();
});
afterAll(async () => {
  for (const p of procs) p.child.kill("SIGKILL");
  await ctl.stop();
  await broker.close();
  for (const c of cleanups) c();
});

async function start(root: string, deviceId: string): Promise<AgentProcess> {
  const syncs = ctl.syncs.get(deviceId) ?? 0;
  const p = spawnAgent(root);
  procs.push(p);
  await ctl.waitFor(`${deviceId} synced`, () => (ctl.syncs.get(deviceId) ?? 0) > syncs, 30_000);
  return p;
}

async function kill9(p: AgentProcess) {
  p.child.kill("SIGKILL");
  await p.exited;
}

describe("agent process crash recovery", () => {
  it("SIGKILL mid-task: the non-idempotent task ends FAILED(interrupted), the idempotent one re-runs", async () => {
    const id = "proc-crash";
    // Every transition is sent (statusFlushMs 0): this checks the recovery's sequence of states.
    const { root, cleanup } = flashRoot(id, [broker.url], {
      allowShell: ["/bin/sleep"],
      maxConcurrency: 4,
      statusFlushMs: 0,
    });
    cleanups.push(cleanup);
    let p = await start(root, id);
    const shell = await ctl.assign(
      id,
      jobSpec([{ id: "sh", type: "shell", params: { command: "/bin/sleep", args: ["30"] } }]),
    );
    const retried = await ctl.assign(
      id,
      jobSpec([
        {
          id: "sh",
          type: "shell",
          params: { command: "/bin/sleep", args: ["1"] },
          retry: { maxAttempts: 2, backoffS: 0 },
        },
      ]),
    );
    const idem = await ctl.assign(id, jobSpec([{ id: "nap", type: "sleep", params: { seconds: 1.5 } }]));
    await ctl.waitFor("all running", () =>
      [shell, retried, idem].every((j) =>
        ctl.statuses(id).some((s) => s.jobId === j && s.state === S.RUNNING),
      ),
    );
    await kill9(p);
    p = await start(root, id);
    const sh = await ctl.waitJob(id, shell);
    expect(sh.state).toBe(S.FAILED);
    expect(ctl.latest(id, shell, "sh")).toMatchObject({ state: S.FAILED, reason: "interrupted", attempt: 1 });
    // With a retry policy the interrupted attempt is followed by a second one, visibly.
    expect((await ctl.waitJob(id, retried)).state).toBe(S.SUCCEEDED);
    expect(
      ctl
        .statuses(id)
        .filter((s) => s.jobId === retried && s.taskId === "sh")
        .map((s) => `${S[s.state!]}#${s.attempt}`),
    ).toEqual(["RUNNING#1", "WAITING#1", "RUNNING#2", "SUCCEEDED#2"]);
    expect(ctl.statuses(id).find((s) => s.jobId === retried && s.state === S.WAITING)?.reason).toBe(
      "retry_backoff",
    );
    // The idempotent task ran again and succeeded.
    expect((await ctl.waitJob(id, idem)).state).toBe(S.SUCCEEDED);
    const nap = ctl.statuses(id).filter((s) => s.jobId === idem && s.taskId === "nap");
    expect(nap.filter((s) => s.state === S.RUNNING).length).toBeGreaterThanOrEqual(2);
    expect(nap.some((s) => s.reason === "interrupted" && s.state === S.QUEUED)).toBe(true);
    const seqs = ctl.statuses(id).map((s) => s.seq!);
    expect(seqs).toEqual(seqs.map((_, i) => i + 1));
    p.child.kill("SIGTERM");
    expect(await p.exited).toBe(0);
  });

  it("SIGKILL right after the PUBACK of a job loses nothing", async () => {
    const id = "proc-puback";
    const { root, cleanup } = flashRoot(id, [broker.url]);
    cleanups.push(cleanup);
    let p = await start(root, id);
    // Kill the agent the moment the broker sees its PUBACK for the job.
    broker.aedes.on("ack", (_packet, client) => {
      if (client?.id === id && !p.child.killed) p.child.kill("SIGKILL");
    });
    const spec = jobSpec([{ id: "a", type: "noop" }]);
    const jobId = await ctl.assign(id, spec);
    await p.exited;
    broker.aedes.removeAllListeners("ack");
    // The controller side forgets the assignment, so only the agent's own disk can bring it back.
    ctl.assignments.get(id)!.delete(jobId);
    p = await start(root, id);
    expect((await ctl.waitJob(id, jobId)).state).toBe(S.SUCCEEDED);
    expect(
      ctl.statuses(id).filter((s) => s.jobId === jobId && s.taskId === "a" && s.state === S.SUCCEEDED),
    ).toHaveLength(1);
    p.child.kill("SIGTERM");
    await p.exited;
  });

  it("a bad config is reported with every problem and exit code 2", async () => {
    const { root, cleanup } = flashRoot("bad id", ["http://nope"], { trustedKeys: [] });
    cleanups.push(cleanup);
    const p = spawnAgent(root);
    expect(await p.exited).toBe(2);
    expect(p.stderr()).toContain("deviceId: must match");
    expect(p.stderr()).toContain("brokers.0: must be an mqtt://");
    expect(p.stderr()).toContain("trustedKeys: needs at least one operator public key");
  });
});
