import mqtt from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { decodeEnvelope } from "../../proto/envelope.js";
import { TaskState } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec } from "../helpers/keys.js";

let h: Harness;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

describe("agent", () => {
  it("tries its broker URLs in turn", async () => {
    const agent = await h.newAgent("multi-broker", { brokers: ["mqtt://127.0.0.1:1", h.broker.url] });
    expect(agent.connected).toBe(true);
    expect(agent.counters.get("connect_attempts")).toBeGreaterThanOrEqual(2);
  });

  it("publishes a retained DeviceState with measured facts, telemetry, and an offline state when it stops", async () => {
    const watcher = await mqtt.connectAsync(h.broker.url, { clientId: "watcher" });
    const states: Array<{ online: boolean; facts: Record<string, unknown> }> = [];
    let telemetry = 0;
    watcher.on("message", (topic, payload) => {
      const env = decodeEnvelope(payload);
      if (env.deviceState)
        states.push({
          online: Boolean(env.deviceState.online),
          facts: env.deviceState.factsJson ? JSON.parse(env.deviceState.factsJson) : {},
        });
      if (env.telemetry) {
        telemetry++;
        expect(env.telemetry.memTotal).toBeGreaterThan(0);
        expect(env.telemetry.atMs).toBeGreaterThan(0);
      }
      void topic;
    });
    await watcher.subscribeAsync(["fleet/v1/d/facts-1/state", "fleet/v1/d/facts-1/telemetry"]);
    const agent = await h.newAgent(
      "facts-1",
      { telemetryIntervalS: 1, labels: { site: "berlin" } },
      { measureFacts: true },
    );
    await h.ctl.waitFor("telemetry", () => telemetry >= 2);
    const online = states.find((s) => s.online)!;
    expect(online.facts["labels.site"]).toBe("berlin");
    expect(online.facts["os.arch"]).toBe(process.arch);
    expect(typeof online.facts["disk.free"]).toBe("number");
    await h.restartAgent(agent);
    await h.ctl.waitFor("offline then online", () => states.some((s) => !s.online) && states.at(-1)?.online);
    await watcher.endAsync();
  });

  it("compacts jobs once they expired and finished (the seen-id record)", async () => {
    const agent = await h.newAgent("compact-1");
    const jobId = await h.ctl.assign(
      "compact-1",
      jobSpec([{ id: "a", type: "noop" }], { expiresAtMs: Date.now() + 60_000 }),
    );
    await h.ctl.waitJob("compact-1", jobId, TaskState.SUCCEEDED);
    expect(await agent.scheduler.compact(Date.now())).toBe(0);
    expect(await agent.scheduler.compact(Date.now() + 2 * 3600_000)).toBe(1);
    expect(agent.scheduler.job(jobId)).toBeUndefined();
    expect(await agent.store.loadJobs()).toHaveLength(0);
    expect(await agent.store.loadExecutions()).toHaveLength(0);
  });
});
