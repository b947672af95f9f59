// Delivery and durability (DESIGN.md §4): sync after offline periods, the outbox across
// broker outages and agent restarts, idempotent application of statuses.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TaskState as S } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec } from "../helpers/keys.js";

let h: Harness;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

/** Every seq from 1 to the last applied exactly once: nothing lost, nothing applied twice. */
function expectContiguous(deviceId: string) {
  const seqs = h.ctl.statuses(deviceId).map((s) => s.seq!);
  expect(seqs).toEqual(seqs.map((_, i) => i + 1));
}

describe("delivery", () => {
  it("a job published while the agent is offline (and the broker lost its session) arrives through sync", async () => {
    const agent = await h.newAgent("dlv-offline");
    await agent.stop();
    h.agents.splice(h.agents.indexOf(agent), 1);
    await h.broker.restart(); // in-memory broker: the device's persistent session is gone
    await h.ctl.waitFor(
      "controller reconnected",
      () => (h.ctl as unknown as { client: { connected: boolean } }).client.connected,
    );
    const jobId = await h.ctl.assign("dlv-offline", jobSpec([{ id: "a", type: "noop" }]));
    const again = await h.restartAgent(agent);
    expect((await h.ctl.waitJob("dlv-offline", jobId)).state).toBe(S.SUCCEEDED);
    expect(again.counters.get("jobs_accepted")).toBe(1);
    expectContiguous("dlv-offline");
  });

  it("statuses produced while the broker is down arrive after it returns, across an agent restart, none twice", async () => {
    let agent = await h.newAgent("dlv-outage", { statusFlushMs: 0 }); // every status, to lose none of
    const tasks = Array.from({ length: 6 }, (_, i) => ({
      id: `t${i}`,
      type: "sleep",
      params: { seconds: 0.15 },
      dependsOn: i ? [`t${i - 1}`] : [],
    }));
    const jobId = await h.ctl.assign("dlv-outage", jobSpec(tasks));
    await h.ctl.waitFor("t0 running", () => h.ctl.latest("dlv-outage", jobId, "t0")?.state === S.RUNNING);
    await h.broker.stop();
    // The job goes on while the broker is down; restart the agent in the middle of it.
    await new Promise((r) => setTimeout(r, 400));
    agent = await h.restartAgent(agent, { waitSync: false });
    await new Promise((r) => setTimeout(r, 600));
    expect(await agent.store.outbox.pendingCount()).toBeGreaterThan(3);
    const syncs = h.ctl.syncs.get("dlv-outage") ?? 0;
    await h.broker.start();
    await h.waitSynced(agent, syncs);
    expect((await h.ctl.waitJob("dlv-outage", jobId)).state).toBe(S.SUCCEEDED);
    for (const t of tasks) expect(h.ctl.latest("dlv-outage", jobId, t.id)?.state).toBe(S.SUCCEEDED);
    expectContiguous("dlv-outage");
    await h.ctl.waitFor("outbox empty", async () => (await agent.store.outbox.pendingCount()) === 0);
  });

  it("re-sends a SyncRequest that nobody answered (e.g. the controller was not subscribed yet)", async () => {
    h.ctl.answerSync = false;
    const syncs = h.ctl.syncs.get("dlv-retry") ?? 0;
    let agent: Awaited<ReturnType<typeof h.newAgent>> | undefined;
    const starting = h.newAgent("dlv-retry").then((a) => {
      agent = a;
    });
    await h.ctl.waitFor("first sync", () => (h.ctl.syncs.get("dlv-retry") ?? 0) > syncs);
    h.ctl.answerSync = true;
    await starting; // newAgent waits for a sync after start; the retry comes ~3 s later
    await h.ctl.waitFor("answered retry", () => (h.ctl.syncs.get("dlv-retry") ?? 0) >= syncs + 2);
    expect(agent!.counters.get("sync_retries")).toBeGreaterThanOrEqual(1);
    const jobId = await h.ctl.assign("dlv-retry", jobSpec([{ id: "a", type: "noop" }]), { publish: false });
    const again = await h.restartAgent(agent!); // the job was never published: it comes with the sync
    expect((await h.ctl.waitJob(again.deviceId, jobId)).state).toBe(S.SUCCEEDED);
  }, 60_000);

  it("without acks the outbox keeps everything; a later ack releases it", async () => {
    const agent = await h.newAgent("dlv-noack", { statusFlushMs: 0 });
    h.ctl.ackStatuses = false;
    try {
      const jobId = await h.ctl.assign("dlv-noack", jobSpec([{ id: "a", type: "noop" }]));
      await h.ctl.waitJob("dlv-noack", jobId);
      const pending = await agent.store.outbox.pendingCount();
      expect(pending).toBe(4);
      // Restart: everything is re-sent on sync, and the controller ignores what it already applied.
      const dup = h.ctl.duplicatesIgnored;
      const again = await h.restartAgent(agent);
      await h.ctl.waitFor("re-sent", () => h.ctl.duplicatesIgnored >= dup + 4);
      h.ctl.ackStatuses = true;
      await h.ctl.ctl("dlv-noack", { statusAck: { upToSeq: h.ctl.lastSeq.get("dlv-noack")! } });
      await h.ctl.waitFor("released", async () => (await again.store.outbox.pendingCount()) === 0);
      expectContiguous("dlv-noack");
    } finally {
      h.ctl.ackStatuses = true;
    }
  });
});

describe("a task's start and result are written again until the disk takes them", () => {
  type Writer = { write: (ops: unknown[], sync: boolean) => Promise<void> };
  /** Refuses (as a full disk would) the next `times` writes that record `taskId` in `state`. */
  const refuse = (
    agent: { store: unknown },
    jobId: () => string,
    taskId: string,
    state: S,
    times: number,
  ) => {
    const w = (agent.store as { writer: Writer }).writer;
    const write = w.write.bind(w);
    let left = times;
    w.write = (ops, sync) => {
      const hit = ops.some((op) => {
        const v = (op as { value?: { jobId?: string; tasks?: Record<string, { state?: number }> } }).value;
        return v?.jobId === jobId() && v.tasks?.[taskId]?.state === state;
      });
      if (hit && left > 0) {
        left--;
        return Promise.reject(new Error("disk full"));
      }
      return write(ops, sync);
    };
    return () => left;
  };

  /** Every seq arrived once: applied, or as the lost-write record of a refused write. */
  const expectAllSeqs = (deviceId: string, lostBefore: number) => {
    const seqs = h.ctl.statuses(deviceId).map((s) => s.seq!);
    const lost = h.ctl.counters.get("statuses_lost_write") - lostBefore;
    expect(lost).toBeGreaterThan(0);
    expect(new Set(seqs).size).toBe(seqs.length);
    expect(seqs.length + lost).toBe(Math.max(...seqs));
  };

  it("a result the disk refused twice reaches the controller, and a restart does not take it for an interruption", async () => {
    const lostBefore = h.ctl.counters.get("statuses_lost_write");
    const agent = await h.newAgent("dlv-result");
    let jobId = "";
    const left = refuse(agent, () => jobId, "a", S.SUCCEEDED, 2);
    jobId = await h.ctl.assign("dlv-result", jobSpec([{ id: "a", type: "noop" }]));
    expect((await h.ctl.waitJob("dlv-result", jobId)).state).toBe(S.SUCCEEDED);
    expect(left()).toBe(0);
    expect(agent.counters.get("store_write_failed")).toBe(2);
    // The failed writes' seqs came as lost-write records; nothing is missing in between.
    expectAllSeqs("dlv-result", lostBefore);
    const again = await h.restartAgent(agent);
    await h.ctl.waitFor("outbox drained", async () => (await again.store.outbox.pendingCount()) === 0);
    const task = h.ctl.statuses("dlv-result").filter((s) => s.jobId === jobId && s.taskId === "a");
    expect(task.map((s) => S[s.state!])).not.toContain("FAILED");
    expect(h.ctl.latest("dlv-result", jobId, "a")?.state).toBe(S.SUCCEEDED);
  });

  it("a start the disk refused is written again, then the task runs", async () => {
    const lostBefore = h.ctl.counters.get("statuses_lost_write");
    const agent = await h.newAgent("dlv-start");
    let jobId = "";
    const left = refuse(agent, () => jobId, "b", S.RUNNING, 1);
    jobId = await h.ctl.assign(
      "dlv-start",
      jobSpec([
        { id: "a", type: "noop" },
        { id: "b", type: "noop", dependsOn: ["a"] },
      ]),
    );
    expect((await h.ctl.waitJob("dlv-start", jobId)).state).toBe(S.SUCCEEDED);
    expect(left()).toBe(0);
    expect(h.ctl.latest("dlv-start", jobId, "b")?.state).toBe(S.SUCCEEDED);
    expectAllSeqs("dlv-start", lostBefore);
  });
});
