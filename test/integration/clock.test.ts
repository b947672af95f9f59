// Device clocks lie: a 1970 clock, and jumps of years during a recurring job (DESIGN.md §5).
import { mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { TimeSource } from "../../agent/clock.js";
import { TaskState as S, TERMINAL_STATES } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec } from "../helpers/keys.js";

let h: Harness;
beforeAll(async () => {
  h = await harness();
});
afterAll(() => h.close());

const YEAR = 365 * 86_400_000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("device clock", () => {
  it("a device whose clock says 1970 accepts a job signed now, and remembers the time floor", async () => {
    const t0 = performance.now();
    const time: TimeSource = { wall: () => performance.now() - t0, mono: () => performance.now() };
    const agent = await h.newAgent("clock-1970", {}, { time });
    const spec = jobSpec([{ id: "a", type: "noop" }]);
    const jobId = await h.ctl.assign("clock-1970", spec);
    expect((await h.ctl.waitJob("clock-1970", jobId)).state).toBe(S.SUCCEEDED);
    expect(agent.clock.floor).toBeGreaterThanOrEqual(spec.issuedAtMs!);
    // The floor is durable: after a restart, still at 1970, the agent's time is not before it.
    const again = await h.restartAgent(agent);
    expect(again.clock.now()).toBeGreaterThanOrEqual(spec.issuedAtMs!);
  });

  it("an unsigned TimeHint ten years ahead does not make later jobs expire, not even after a restart (H5)", async () => {
    const id = "clock-hint";
    const agent = await h.newAgent(id);
    await h.ctl.ctl(id, { timeHint: { nowMs: Date.now() + 10 * YEAR } });
    await h.ctl.waitFor("hint applied", () => agent.clock.now() > Date.now() + 9 * YEAR);
    expect(agent.clock.floor).toBeLessThan(Date.now() + YEAR);
    const again = await h.restartAgent(agent);
    const jobId = await h.ctl.assign(id, jobSpec([{ id: "a", type: "noop" }]));
    expect((await h.ctl.waitJob(id, jobId)).state).toBe(S.SUCCEEDED);
    expect(again.clock.floor).toBeLessThan(Date.now() + YEAR);
  });

  it("a 1970 clock names backups by the agent's trusted time, not the wall clock", async () => {
    const t0 = performance.now();
    const time: TimeSource = { wall: () => performance.now() - t0, mono: () => performance.now() };
    const agent = await h.newAgent("clock-backup", {}, { time });
    mkdirSync(join(agent.config.root, "etc/app"), { recursive: true });
    const jobId = await h.ctl.assign(
      "clock-backup",
      jobSpec([{ id: "b", type: "backup", params: { paths: ["etc/app"], name: "app" } }]),
    );
    expect((await h.ctl.waitJob("clock-backup", jobId)).state).toBe(S.SUCCEEDED);
    const files = readdirSync(join(agent.config.root, agent.config.dataDir, "backups"));
    expect(files.some((f) => f.startsWith(`app-${new Date().getUTCFullYear()}-`))).toBe(true);
  });

  it("a recurring job neither bursts nor stops when the clock jumps by years, and survives a restart", async () => {
    let offset = 0;
    const time: TimeSource = { wall: () => Date.now() + offset, mono: () => performance.now() };
    const id = "clock-jump";
    let agent = await h.newAgent(id, {}, { time });
    const jobId = await h.ctl.assign(
      id,
      jobSpec([{ id: "a", type: "noop" }], { schedule: { cron: "* * * * * *", timezone: "UTC" } }),
    );
    const runs = () => {
      const ids = new Set(
        h.ctl
          .statuses(id)
          .filter(
            (s) => s.jobId === jobId && s.taskId === "" && s.executionId && TERMINAL_STATES.has(s.state!),
          )
          .map((s) => s.executionId),
      );
      return ids.size;
    };
    await h.ctl.waitFor("3 occurrences", () => runs() >= 3);
    const window = async (label: string, change: () => void | Promise<void>) => {
      await change();
      const before = runs();
      await sleep(4000);
      const n = runs() - before;
      console.log(`${label}: ${n} occurrences in 4 s`);
      expect(n, label).toBeGreaterThanOrEqual(2);
      expect(n, label).toBeLessThanOrEqual(5);
    };
    await window("clock +3 years", () => {
      offset = 3 * YEAR;
    });
    await window("clock -5 years", () => {
      offset = -5 * YEAR;
    });
    await window("controller TimeHint one day back", () =>
      h.ctl.ctl(id, { timeHint: { nowMs: Date.now() - 86_400_000 } }),
    );
    await window("agent restarted", async () => {
      agent = await h.restartAgent(agent);
    });
    // Each occurrence is its own execution with its own statuses.
    const occ = h.ctl
      .statuses(id)
      .filter((s) => s.jobId === jobId && s.taskId === "a" && s.state === S.SUCCEEDED);
    expect(new Set(occ.map((s) => s.executionId)).size).toBe(occ.length);
    expect(agent.counters.get("occurrence_skipped_overlap")).toBe(0);
  }, 60_000);
});
