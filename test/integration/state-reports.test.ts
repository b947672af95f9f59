// What calls for a DeviceState (retained, QoS 1, one per device): the queue, the chunks held,
// the facts that do not change at every reading, and counters that tell of trouble. A job that
// comes and goes, a changed `mem.available`, a counter of ordinary work do not: they ride along
// with the next report. Otherwise a rollout to 10,000 devices is followed by 10,000 reports
// saying nothing the controller does not know.
import mqtt, { type MqttClient } from "mqtt";
import { afterAll, beforeAll, expect, it } from "vitest";
import { decodeEnvelope } from "../../proto/envelope.js";
import { TaskState as S } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec } from "../helpers/keys.js";

const ID = "reports-1";
const LONG = "reports-2";
const REFRESH_MS = 300;
type Report = { counters: Record<string, number>; facts: Record<string, unknown>; running: number };
let h: Harness;
let watcher: MqttClient;
const reports: Report[] = [];
const longReports: Report[] = [];
beforeAll(async () => {
  h = await harness();
  watcher = await mqtt.connectAsync(h.broker.url, { clientId: "reports-watcher" });
  watcher.on("message", (topic, payload) => {
    const s = decodeEnvelope(payload).deviceState;
    if (s?.online)
      (topic.includes(LONG) ? longReports : reports).push({
        counters: Object.fromEntries(Object.entries(s.counters ?? {}).map(([k, v]) => [k, Number(v)])),
        facts: JSON.parse(s.factsJson || "{}"),
        running: s.running ?? 0,
      });
  });
  await watcher.subscribeAsync([`fleet/v1/d/${ID}/state`, `fleet/v1/d/${LONG}/state`], { qos: 1 });
});
afterAll(async () => {
  await watcher.endAsync(true);
  await h.close();
});

const settle = () => new Promise((r) => setTimeout(r, 3000 + 4 * REFRESH_MS));

it("a job that came and went, on a device whose memory readings change, calls for no report", async () => {
  // Measured facts (systeminformation), read again every 300 ms instead of every minute.
  const agent = await h.newAgent(ID, {}, { measureFacts: true, refreshMs: REFRESH_MS });
  await h.ctl.waitFor("the first report", () => reports.length >= 1);
  await settle();
  const before = reports.length;
  const spec = jobSpec([{ id: "a", type: "noop" }]);
  await h.ctl.assign(ID, spec);
  expect((await h.ctl.waitJob(ID, spec.jobId!, S.SUCCEEDED)).state).toBe(S.SUCCEEDED);
  await settle();
  expect(agent.counters.get("jobs_accepted")).toBe(1);
  expect(reports.length).toBe(before);

  // A counter of trouble goes out with the next refresh, and the work done rides along.
  await h.ctl.publishRaw(ID, "job", Buffer.from([0xff, 0xff, 0xff]));
  const report = await h.ctl.waitFor("a report", () => reports.length > before && reports.at(-1));
  expect(Object.keys(report.counters).some((k) => k.startsWith("dropped_"))).toBe(true);
  expect(report.counters.jobs_accepted).toBe(1);
  expect(report.facts["mem.available"]).toBeGreaterThan(0);
});

it("a task that runs past the settle interval is no report while it is short; a long one is reported", async () => {
  await h.newAgent(LONG);
  await h.ctl.waitFor("the first report", () => longReports.length >= 1);
  await settle();
  const before = longReports.length;
  // 3 s: past the 1 s settle interval (a report of running: 1, then one of running: 0, before).
  const short = jobSpec([{ id: "a", type: "sleep", params: { seconds: 3 } }]);
  await h.ctl.assign(LONG, short);
  await h.ctl.waitJob(LONG, short.jobId!, S.SUCCEEDED);
  await settle();
  expect(longReports.length).toBe(before);

  // A task that runs on and on: its running gauge is reported after ten settle intervals.
  const long = jobSpec([{ id: "a", type: "sleep", params: { seconds: 30 } }]);
  await h.ctl.assign(LONG, long);
  const r = await h.ctl.waitFor(
    "a report while it runs",
    () => longReports.length > before && longReports.at(-1),
  );
  expect(r.running).toBe(1);
});
