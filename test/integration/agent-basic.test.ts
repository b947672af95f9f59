import { afterAll, beforeAll, describe, expect, it } from "vitest";
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
    const a = await h.newAgent("dev-window", { statusFlushMs: 200 });
    const jobId = await h.ctl.assign(
      "dev-window",
      jobSpec([
        { id: "a", type: "noop" },
        { id: "b", type: "noop", dependsOn: ["a"] },
      ]),
    );
    const done = await h.ctl.waitJob("dev-window", jobId);
    expect(done.state).toBe(TaskState.SUCCEEDED);
    const mine = h.ctl.statuses("dev-window").filter((s) => s.jobId === jobId);
    // b waited for a (WAITING, then a RUNNING after it): b's later statuses do not jump ahead of
    // a's; a's RUNNING and b's RUNNING are each replaced by their SUCCEEDED.
    expect(mine.map((s) => `${s.taskId}:${TaskState[s.state!]}`)).toEqual([
      ":QUEUED",
      "b:WAITING",
      "a:SUCCEEDED",
      "b:SUCCEEDED",
      ":SUCCEEDED",
    ]);
    // The seq protocol is unchanged: contiguous from 1.
    expect(mine.map((s) => s.seq)).toEqual([1, 2, 3, 4, 5]);
    await h.ctl.waitFor("outbox drained", async () => (await a.store.outbox.pendingCount()) === 0);
  });
});
