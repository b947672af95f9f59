import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import type { Agent } from "../../agent/agent.js";
import { aedesClient, destroyConnection } from "../../common/internals.js";
import { TaskState } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec } from "../helpers/keys.js";

let h: Harness;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

describe("agent basics", () => {
  it("runs a noop job and reports QUEUED, RUNNING, SUCCEEDED (every change, without a flush window)", async () => {
    const a = await h.newAgent("dev-basic", { statusFlushMs: 0 });
    const jobId = await h.ctl.assign("dev-basic", jobSpec([{ id: "a", type: "noop" }]));
    const done = await h.ctl.waitJob("dev-basic", jobId);
    expect(done.state).toBe(TaskState.SUCCEEDED);
    const states = h.ctl
      .statuses("dev-basic")
      .filter((s) => s.jobId === jobId)
      .map((s) => `${s.taskId}:${TaskState[s.state!]}`);
    expect(states).toEqual([":QUEUED", "a:RUNNING", "a:SUCCEEDED", ":SUCCEEDED"]);
    expect(a.counters.get("jobs_accepted")).toBe(1);
    // Every status was acknowledged, so the outbox is empty.
    await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);
  });

  it("with the flush window, a job's transitions reach the controller as one batch: one record per task, every terminal state", async () => {
    const { a, mine } = await twoTaskJob("dev-window", 200);
    // The seq protocol is unchanged: contiguous from 1.
    expect(mine.map((s) => s.seq)).toEqual([1, 2, 3, 4, 5]);
    await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);
  });
});

/**
 * Runs a job of two noop tasks, b after a, with the given flush window; checks that its
 * statuses came one record per task: b waited for a (WAITING, then a RUNNING after it), b's
 * later statuses do not jump ahead of a's, a's and b's RUNNING are replaced by their SUCCEEDED.
 */
async function twoTaskJob(deviceId: string, statusFlushMs: number, before?: (a: Agent) => void) {
  const a = await h.newAgent(deviceId, { statusFlushMs });
  before?.(a);
  const jobId = await h.ctl.assign(
    deviceId,
    jobSpec([
      { id: "a", type: "noop" },
      { id: "b", type: "noop", dependsOn: ["a"] },
    ]),
  );
  expect((await h.ctl.waitJob(deviceId, jobId)).state).toBe(TaskState.SUCCEEDED);
  const mine = h.ctl.statuses(deviceId).filter((s) => s.jobId === jobId);
  expect(mine.map((s) => `${s.taskId}:${TaskState[s.state!]}`)).toEqual([
    ":QUEUED",
    "b:WAITING",
    "a:SUCCEEDED",
    "b:SUCCEEDED",
    ":SUCCEEDED",
  ]);
  return { a, mine };
}

describe("the flush window ends when the agent goes idle", () => {
  it("a job's statuses go out together as soon as nothing is left running, not a window after the last commit", async () => {
    // The longest window there is (1 s, up to 50 of them while busy): the idle flush ends it,
    // and still one record per task (b's pass started before the agent was idle).
    let idle: { mock: { calls: unknown[] } } | undefined;
    await twoTaskJob("dev-idle", 1000, (a) => {
      idle = vi.spyOn(a.store.outbox, "onIdle");
    });
    expect(idle!.mock.calls.length).toBeGreaterThan(0); // by the scheduler, after a pass that found nothing to do
  });
});

describe("the QoS of the status topic follows the StatusAck's", () => {
  /** The QoS of each status batch the device published, as the broker got them. */
  const statusQos = (deviceId: string) => {
    const seen: number[] = [];
    h.broker.aedes.on("publish", (packet, client) => {
      if (client?.id === deviceId && packet.topic.endsWith("/status")) seen.push(packet.qos);
    });
    return seen;
  };
  const runJob = async (deviceId: string) => {
    const jobId = await h.ctl.assign(deviceId, jobSpec([{ id: "a", type: "noop" }]));
    expect((await h.ctl.waitJob(deviceId, jobId)).state).toBe(TaskState.SUCCEEDED);
  };

  it("QoS 1 while the controller acknowledges at QoS 1 (an external or clustered broker)", async () => {
    const seen = statusQos("dev-qos1");
    const a = await h.newAgent("dev-qos1", { statusFlushMs: 0 });
    for (let i = 0; i < 2; i++) await runJob("dev-qos1");
    await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);
    expect(seen.length).toBeGreaterThanOrEqual(2);
    expect(new Set(seen)).toEqual(new Set([1]));
  });

  it("QoS 0 once acknowledged at QoS 0 (the embedded broker); QoS 1 again on a new connection until the next ack", async () => {
    h.ctl.ackQos = 0;
    try {
      const seen = statusQos("dev-qos0");
      const a = await h.newAgent("dev-qos0", { statusFlushMs: 0 });
      await runJob("dev-qos0");
      await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);
      // Before the first ack of the connection: QoS 1; once acknowledged at QoS 0: QoS 0.
      expect(seen[0]).toBe(1);
      const first = seen.length;
      await runJob("dev-qos0");
      expect(seen.length).toBeGreaterThan(first);
      expect(new Set(seen.slice(first))).toEqual(new Set([0]));
      // No ack in flight (one handed over after the reconnect would rightly switch to QoS 0).
      await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);

      // A new connection: its first status batch goes at QoS 1 again.
      const syncs = h.ctl.syncs.get("dev-qos0") ?? 0;
      h.ctl.ackStatuses = false; // hold the acks: the batch after the reconnect stays QoS 1
      destroyConnection(aedesClient(h.broker.aedes, "dev-qos0")!);
      await h.waitSynced(a, syncs);
      seen.length = 0;
      await h.ctl.assign("dev-qos0", jobSpec([{ id: "a", type: "noop" }]));
      await h.ctl.waitFor("the job's statuses", () => seen.length >= 2 && seen);
      expect(new Set(seen)).toEqual(new Set([1]));
      // Acknowledged at QoS 0 again (cumulatively, with the next job's): QoS 0 from then on.
      h.ctl.ackStatuses = true;
      await runJob("dev-qos0");
      await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);
      seen.length = 0;
      await runJob("dev-qos0");
      expect(new Set(seen)).toEqual(new Set([0]));
    } finally {
      h.ctl.ackQos = 1;
      h.ctl.ackStatuses = true;
    }
  });
});
