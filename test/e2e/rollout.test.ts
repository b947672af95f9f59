// Rollouts, work-queue dispatch and watch with simulated devices (real `fleet simulate`
// processes running the real agent code) against a real `fleet server`.
import type { ChildProcess } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { JobJson, RolloutJson } from "../../proto/api.js";
import {
  cli,
  cliJson,
  type ServerProcess,
  simulate as simulateFleet,
  startFleet,
  startServer,
  startWatch,
  stopAll,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-rollout-");
let server: ServerProcess;
let env: Record<string, string>;
const sims: ChildProcess[] = [];
const noop = join(data.dir, "noop.yaml");
const nap = join(data.dir, "nap.yaml");
/** Long enough that a `rollout pause` from a second CLI process lands inside the first wave. */
const longNap = join(data.dir, "long-nap.yaml");

async function simulate(args: string[]): Promise<ChildProcess> {
  const p = await simulateFleet(env, args);
  sims.push(p);
  return p;
}

const show = async (id: string) => cliJson<RolloutJson>(await cli(["rollout", "show", id, "--json"], env));

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir, {
    // Simulated fleets connect from one address.
    config: (cfg) => {
      cfg.limits.connectsPerSecondPerAddress = 5000;
    },
  }));
  writeFileSync(noop, "name: noop-rollout\ntasks:\n  - { id: a, type: noop }\n");
  writeFileSync(nap, "name: nap-rollout\ntasks:\n  - { id: a, type: sleep, params: { seconds: 0.5 } }\n");
  writeFileSync(longNap, "name: long-nap\ntasks:\n  - { id: a, type: sleep, params: { seconds: 4 } }\n");
  await simulate(["--devices", "200", "--prefix", "ok-", "--label", "pool=ok"]);
  await simulate(["--devices", "100", "--prefix", "bad-", "--label", "pool=bad", "--fail-rate", "0.5"]);
  // Devices whose results come in over 3 s, not in one burst.
  await simulate(["--devices", "100", "--prefix", "slow-", "--label", "pool=slow", "--latency", "0-3000"]);
}, 120_000);

/** A server counter (fleet_events_total) from /metrics. */
async function counter(name: string): Promise<number> {
  const text = await (await fetch(`${server.urls.http}/metrics`)).text();
  return Number(new RegExp(`^fleet_events_total\\{name="${name}"\\} (\\d+)`, "m").exec(text)?.[1] ?? 0);
}

afterAll(() => stopAll(sims, server, data.cleanup));

describe("rollouts", () => {
  it("rolls out to 200 devices in waves 10%,50%,100%, in order, while watch --json streams NDJSON", async () => {
    const watch = await startWatch(env);
    const r = await cli(
      [
        "rollout",
        "create",
        "-f",
        noop,
        "--selector",
        "pool=ok",
        "--waves",
        "10%,50%,100%",
        "--wait",
        "--json",
      ],
      env,
    );
    expect(r.code).toBe(0);
    const done = cliJson<RolloutJson>(r);
    expect(done).toMatchObject({ state: "SUCCEEDED", counts: { total: 200, succeeded: 200, failed: 0 } });
    expect(done.waves.map((w) => [w.devices, w.state, w.succeeded])).toEqual([
      [20, "DONE", 20],
      [80, "DONE", 80],
      [100, "DONE", 100],
    ]);
    await watch.until("the rollout's end in watch", (es) =>
      es.some((e) => e.kind === "rollout.succeeded" && e.jobId === done.jobId),
    );
    const events = await watch.stop();
    const mine = events.filter((e) => e.jobId === done.jobId);
    const starts = mine.filter((e) => e.kind === "rollout.wave_started").map((e) => e.detail?.wave);
    expect(starts).toEqual([1, 2, 3]);
    // Every device of a wave finished before the next wave started.
    const at = (wave: number) =>
      mine.findIndex((e) => e.kind === "rollout.wave_started" && e.detail?.wave === wave);
    const succeededBefore = (i: number) =>
      mine.slice(0, i).filter((e) => e.kind === "task.status" && !e.taskId && e.state === "SUCCEEDED").length;
    expect(succeededBefore(at(2))).toBe(20);
    expect(succeededBefore(at(3))).toBe(100);
  }, 60_000);

  it("devices succeeding one by one do not each make the rollout go over all its assignments", async () => {
    // A step goes over every assignment of the rollout. Successes (but the last) cannot change
    // what it decides: the rollout steps on its 1 s tick and at its last device, not 20 times a
    // second while results come in — at 10,000 devices that was 12% of the server's CPU.
    const before = await counter("rollout_steps");
    const r = await cli(
      ["rollout", "create", "-f", noop, "--selector", "pool=slow", "--waves", "100%", "--wait", "--json"],
      env,
    );
    expect(r.code).toBe(0);
    const done = cliJson<RolloutJson & { durationMs: number }>(r);
    expect(done.counts).toMatchObject({ total: 100, succeeded: 100 });
    expect(done.durationMs).toBeGreaterThan(1500); // the results did come in over seconds
    const steps = (await counter("rollout_steps")) - before;
    // Its first step, one a second, its last device's.
    expect(steps).toBeLessThanOrEqual(Math.ceil(done.durationMs / 1000) + 3);
  }, 60_000);

  it("aborts on 50% failures with --max-failures 20%, touching at most the first two waves, with a reason", async () => {
    const r = await cli(
      [
        "rollout",
        "create",
        "-f",
        noop,
        "--selector",
        "pool=bad",
        "--waves",
        "10%,50%,100%",
        "--max-failures",
        "20%",
        "--min-finished",
        "5",
        "--wait",
        "--json",
      ],
      env,
    );
    expect(r.code).toBe(1);
    const ro = cliJson<RolloutJson>(r);
    expect(ro.state).toBe("ABORTED");
    expect(ro.reason).toMatch(/failure rate \d+(\.\d)?% \(\d+ of \d+ finished\) is above 20%/);
    expect(ro.waves[2]!.state).toBe("PENDING");
    expect(
      ro.counts.succeeded + ro.counts.failed + ro.counts.running + ro.counts.canceled,
    ).toBeLessThanOrEqual(50);
  }, 60_000);

  it("pause holds, resume completes", async () => {
    const created = cliJson<RolloutJson>(
      await cli(
        // A wave of 0.5 s naps could end before the pause (a CLI start away) arrived, and the
        // second wave start: seen once on a slow machine.
        ["rollout", "create", "-f", longNap, "--selector", "pool=ok", "--waves", "10%,100%", "--json"],
        env,
      ),
    );
    const paused = cliJson<RolloutJson>(await cli(["rollout", "pause", created.id, "--json"], env));
    expect(paused.state).toBe("PAUSED");
    await new Promise((r) => setTimeout(r, 3000));
    const held = await show(created.id);
    expect(held.state).toBe("PAUSED");
    expect(held.waves[1]!.state).toBe("PENDING");
    expect(held.counts.succeeded).toBeLessThanOrEqual(20);
    expect((await cli(["rollout", "resume", created.id], env)).code).toBe(0);
    const done = await waitUntil(
      "succeeded",
      async () => {
        const r = await show(created.id);
        return r.state === "SUCCEEDED" ? r : undefined;
      },
      60_000,
    );
    expect(done.counts).toMatchObject({ total: 200, succeeded: 200 });
  }, 90_000);

  it("an operator abort withdraws the waves not yet delivered", async () => {
    const created = cliJson<RolloutJson>(
      await cli(
        [
          "rollout",
          "create",
          "-f",
          nap,
          "--selector",
          "pool=ok",
          "--waves",
          "10%,100%",
          "--bake",
          "30s",
          "--json",
        ],
        env,
      ),
    );
    const r = await cli(
      ["rollout", "abort", created.id, "--force", "--reason", "changed my mind", "--json"],
      env,
    );
    expect(r.code).toBe(0);
    const aborted = cliJson<RolloutJson>(r);
    expect(aborted).toMatchObject({ state: "ABORTED", reason: "changed my mind" });
    await new Promise((res) => setTimeout(res, 1500));
    const later = await show(created.id);
    expect(later.waves[1]!.state).toBe("PENDING");
    expect(later.counts.succeeded + later.counts.failed + later.counts.canceled).toBeLessThanOrEqual(20);
    expect((await cli(["rollout", "resume", created.id], env)).code).toBe(2);
  }, 60_000);

  it("--timeout ends a silent device TIMED_OUT and counts it as failed", async () => {
    expect((await cli(["device", "add", "silent-1", "--label", "pool=silent"], env)).code).toBe(0);
    await simulate(["--devices", "2", "--prefix", "quiet-", "--label", "pool=silent"]);
    const r = cliJson<RolloutJson>(
      await cli(
        ["rollout", "create", "-f", noop, "--selector", "pool=silent", "--timeout", "3s", "--wait", "--json"],
        env,
      ),
    );
    expect(r.counts).toMatchObject({ total: 3, succeeded: 2, failed: 1, timedOut: 1 });
    const job = cliJson<JobJson>(await cli(["jobs", "show", r.jobId, "--json"], env));
    expect(job.devices.find((d) => d.deviceId === "silent-1")).toMatchObject({ state: "TIMED_OUT" });
  }, 60_000);

  it("--continuous reaches a device that joins afterwards", async () => {
    await simulate(["--devices", "1", "--prefix", "early-", "--label", "pool=late"]);
    const r = cliJson<RolloutJson>(
      await cli(
        ["rollout", "create", "-f", noop, "--selector", "pool=late", "--continuous", "--wait", "--json"],
        env,
      ),
    );
    expect(r.counts).toMatchObject({ total: 1, succeeded: 1 });
    await simulate(["--devices", "1", "--prefix", "late-", "--label", "pool=late"]);
    const later = await waitUntil("late device done", async () => {
      const x = await show(r.id);
      return x.counts.succeeded === 2 ? x : undefined;
    });
    expect(later.counts.total).toBe(2);
    // Ctrl-C stops a simulator cleanly.
    const last = sims.at(-1)!;
    last.kill("SIGINT");
    expect(await new Promise((res) => last.on("exit", (code) => res(code)))).toBe(0);
  }, 60_000);

  it("health gates: telemetry within bounds passes, out of bounds aborts naming the devices", async () => {
    await simulate(["--devices", "3", "--prefix", "tele-", "--label", "pool=tele", "--telemetry", "1"]);
    const args = [
      "rollout",
      "create",
      "-f",
      noop,
      "--selector",
      "pool=tele",
      "--bake",
      "2s",
      "--wait",
      "--json",
    ];
    const ok = cliJson<RolloutJson>(await cli([...args, "--gate", "telemetry:cpu.load<0.9"], env));
    expect(ok.state).toBe("SUCCEEDED");
    const bad = await cli([...args, "--gate", "telemetry:cpu.load<0.05"], env);
    expect(bad.code).toBe(1);
    const r = cliJson<RolloutJson>(bad);
    expect(r.state).toBe("ABORTED");
    expect(r.reason).toMatch(/gate telemetry:cpu\.load<0\.05: violated by tele-000\d \(cpu\.load=0\.\d+/);
    const usage = await cli(
      ["rollout", "create", "-f", noop, "--selector", "pool=tele", "--gate", "cpu<1"],
      env,
    );
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain("--gate");
  }, 60_000);

  it("health gate online: a device going offline during the bake aborts the rollout", async () => {
    const sim = await simulate(["--devices", "2", "--prefix", "flaky-", "--label", "pool=flaky"]);
    const created = cliJson<RolloutJson>(
      await cli(
        [
          "rollout",
          "create",
          "-f",
          noop,
          "--selector",
          "pool=flaky",
          "--bake",
          "20s",
          "--gate",
          "online",
          "--json",
        ],
        env,
      ),
    );
    await waitUntil("baking", async () => (await show(created.id)).waves[0]!.state === "BAKING" || undefined);
    sim.kill("SIGKILL"); // the broker publishes the devices' last will: offline
    const r = await waitUntil("aborted", async () => {
      const x = await show(created.id);
      return x.state === "ABORTED" ? x : undefined;
    });
    expect(r.reason).toMatch(/gate online: device\(s\) went offline during the bake: flaky-000[12]/);
  }, 60_000);

  it("--any 5 over devices of which several fail: exactly 5 successes", async () => {
    const r = await cli(["run", "noop", "--selector", "pool=bad", "--any", "5", "--wait", "--json"], env);
    expect(r.code).toBe(0);
    const j = cliJson<JobJson>(r);
    expect(j.state).toBe("SUCCEEDED");
    expect(j.devices.filter((d) => d.state === "SUCCEEDED")).toHaveLength(5);
    expect(j.devices.length).toBeGreaterThanOrEqual(5);
  }, 60_000);

  it("the server SIGKILLed mid-rollout and restarted: the rollout completes, every device exactly once", async () => {
    const created = cliJson<RolloutJson>(
      await cli(
        [
          "rollout",
          "create",
          "-f",
          nap,
          "--selector",
          "pool=ok",
          "--waves",
          "10%,50%,100%",
          "--bake",
          "2s",
          "--json",
        ],
        env,
      ),
    );
    await waitUntil(
      "wave 1 done",
      async () => (await show(created.id)).waves[0]!.state !== "RUNNING" || undefined,
    );
    server.proc.kill("SIGKILL");
    await server.exited;
    server = await startServer(data.dir, server.ports);
    const done = await waitUntil(
      "rollout done",
      async () => {
        const r = await show(created.id);
        return r.state === "SUCCEEDED" ? r : undefined;
      },
      90_000,
    );
    expect(done.counts).toMatchObject({ total: 200, succeeded: 200, failed: 0 });
    const job = cliJson<JobJson>(await cli(["jobs", "show", done.jobId, "--json"], env));
    expect(new Set(job.devices.map((d) => d.deviceId)).size).toBe(200);
    expect(job.devices.every((d) => d.tasks[0]!.attempt === 1 && d.tasks[0]!.state === "SUCCEEDED")).toBe(
      true,
    );
  }, 120_000);
});
