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
});
