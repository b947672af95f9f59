// A session whose SUBSCRIBE is never answered (a broker that lost it, a connection half-dead
// after a restart) must neither keep the device from syncing nor leave it deaf for good.
import { afterAll, beforeAll, expect, it } from "vitest";
import { TaskState as S } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec } from "../helpers/keys.js";

const ID = "resync-1";
let swallowed = 0;
let h: Harness;
beforeAll(async () => {
  h = await harness({
    // The device's first SUBSCRIBE gets no SUBACK, ever.
    authorizeSubscribe: (client, sub, done) => {
      if (client?.id === ID && swallowed++ === 0) return;
      done(null, sub);
    },
  });
});
afterAll(() => h.close());

it("an unanswered SUBSCRIBE delays neither the SyncRequest nor, after a reconnect, the jobs", async () => {
  const agent = await h.newAgent(ID, {}, { subackTimeoutMs: 1500 });
  // The SyncRequest went out although the first SUBSCRIBE hangs (the harness waited for it).
  expect(h.ctl.syncs.get(ID)).toBeGreaterThanOrEqual(1);
  // The agent gave that session up and subscribed again on a new one: a job gets through.
  const jobId = await h.ctl.assign(ID, jobSpec([{ id: "a", type: "noop" }]));
  expect((await h.ctl.waitJob(ID, jobId, S.SUCCEEDED, 30_000)).state).toBe(S.SUCCEEDED);
  expect(swallowed).toBeGreaterThanOrEqual(2);
  expect(agent.counters.get("suback_timeouts")).toBe(1);
});
