// Reconnect behaviour during a broker outage: exponential backoff with full jitter.
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Harness, harness } from "../helpers/harness.js";

let h: Harness;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

describe("reconnect storm", () => {
  it("during a 10 s outage agents back off exponentially, out of step with each other", async () => {
    const agents = await Promise.all(
      ["storm-1", "storm-2", "storm-3", "storm-4"].map((id) =>
        h.newAgent(id, { reconnect: { minMs: 1000, maxMs: 8000 } }),
      ),
    );
    const before = agents.map((a) => a.connectAttemptTimes.length);
    const down = Date.now();
    await h.broker.stop();
    await new Promise((r) => setTimeout(r, 10_000));
    const during = agents.map((a, i) => a.connectAttemptTimes.slice(before[i]).filter((t) => t >= down));
    const syncs = agents.map((a) => h.ctl.syncs.get(a.deviceId) ?? 0);
    await h.broker.start();
    await Promise.all(agents.map((a, i) => h.waitSynced(a, syncs[i]!)));
    const counts = during.map((d) => d.length);
    console.log(
      `connection attempts per agent during a 10 s outage: ${counts.join(", ")} (a fixed 1 s retry makes 10)`,
    );
    // 1 s doubling to 8 s with full jitter: about 5 attempts each (a fixed 1 s retry makes 10).
    // Bounds chosen from a simulation of the backoff: P(any agent >= 11) < 4e-4.
    for (const d of during) {
      expect(d.length).toBeGreaterThanOrEqual(2);
      expect(d.length).toBeLessThan(11);
    }
    expect(counts.reduce((a, b) => a + b, 0)).toBeLessThan(36);
    // Jitter: the agents do not retry in lockstep.
    const offsets = during.map((d) => d.map((t) => t - down));
    const lockstep = offsets.every(
      (o) => o.length === offsets[0]!.length && o.every((t, i) => Math.abs(t - offsets[0]![i]!) < 20),
    );
    expect(lockstep).toBe(false);
  }, 120_000);
});
