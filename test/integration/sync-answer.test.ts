// A SyncResponse is the answer only to a SyncRequest of the agent's current session. The
// broker can hand over late the answer to the last session's request — the controller's QoS 1
// publish held over a broker restart and sent again once it reconnects — and an agent that took
// it for the answer stopped re-sending a request the controller never saw (found as a rare
// timeout of reconnect.test.ts: the agent reconnected before the controller had subscribed).
import { afterAll, beforeAll, expect, it } from "vitest";
import { TaskState as S } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec, sign } from "../helpers/keys.js";

const ID = "sync-answer-1";
let h: Harness;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

const syncsSeen = () => h.ctl.syncs.get(ID) ?? 0;

it("a late answer to the last session's SyncRequest does not stop this session's re-sends", async () => {
  const agent = await h.newAgent(ID);
  const [firstId] = h.ctl.syncRequestIds.get(ID)!;
  expect(firstId).toBeGreaterThan(0);
  h.ctl.answerSync = false;
  const before = syncsSeen();
  await h.broker.restart();
  await h.ctl.waitFor("the new session's SyncRequest", () => syncsSeen() > before);
  const newId = h.ctl.syncRequestIds.get(ID)!.at(-1)!;
  expect(newId).toBeGreaterThan(firstId!);
  // The late answer to the first session's request: not the answer to this one.
  await h.ctl.ctl(ID, { syncResponse: { requestId: firstId, nowMs: Date.now() } });
  await h.ctl.waitFor("the stale answer counted", () => agent.counters.get("sync_responses_stale") === 1);
  // So the agent sends its request again (3 s later), and that one is answered.
  const seen = syncsSeen();
  h.ctl.answerSync = true;
  await h.ctl.waitFor("the SyncRequest sent again", () => syncsSeen() > seen, 20_000);
  expect(agent.counters.get("sync_retries")).toBeGreaterThanOrEqual(1);
});

it("an unasked SyncResponse (request id 0) applies what it carries, and the request stays open", async () => {
  const agent = h.agents[0]!;
  h.ctl.answerSync = false;
  const before = syncsSeen();
  await h.broker.restart();
  await h.ctl.waitFor("the new session's SyncRequest", () => syncsSeen() > before);
  const spec = jobSpec([{ id: "a", type: "noop" }]);
  await h.ctl.assign(ID, spec, { publish: false });
  await h.ctl.ctl(ID, { syncResponse: { assignments: [{ job: sign(spec), deviceId: ID }] } });
  expect((await h.ctl.waitJob(ID, spec.jobId!, S.SUCCEEDED)).state).toBe(S.SUCCEEDED);
  expect(agent.counters.get("sync_responses_unasked")).toBe(1);
  const seen = syncsSeen();
  h.ctl.answerSync = true;
  await h.ctl.waitFor("the SyncRequest sent again", () => syncsSeen() > seen, 20_000);
});
