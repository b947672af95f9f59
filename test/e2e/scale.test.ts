// The operator API at fleet scale (DESIGN.md §10), with real processes: a server, thousands of
// simulated devices (`fleet simulate`), and the CLI reaching the server through its data
// directory alone (it listens on ephemeral ports; the context names 1883).
// FLEET_E2E_DEVICES sets the size (default 2,000; run it at 10,000 by hand).
import { type ChildProcess, spawn } from "node:child_process";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DeviceJson, JobJson, RolloutJson } from "../../proto/api.js";
import {
  cli,
  cliJson,
  FLEET,
  type ServerProcess,
  startFleet,
  startServer,
  stopAll,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const N = Number(process.env.FLEET_E2E_DEVICES ?? 2000);
const data = tempDir("fleet-scale-");
const env = { FLEET_CONTEXT: join(data.dir, "operator.json") };
const hello = join(import.meta.dirname, "..", "..", "examples", "hello.yaml");
let server: ServerProcess;
let sim: ChildProcess | undefined;

const timed = async <T>(what: string, fn: () => Promise<T>): Promise<T> => {
  const t0 = performance.now();
  const r = await fn();
  console.log(`${what}: ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  return r;
};

beforeAll(async () => {
  ({ server } = await startFleet(data.dir, {
    config: (cfg) => {
      cfg.limits.connectsPerSecondPerAddress = 100_000;
    },
  }));
  sim = spawn(
    process.execPath,
    [FLEET, "simulate", "--devices", String(N), "--connect-rate", "1000", "--label", "pool=scale"],
    { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] },
  );
  let simErr = "";
  sim.stderr!.on("data", (d: Buffer) => {
    simErr += d.toString();
  });
  await timed(
    `${N} simulated devices connected`,
    () =>
      new Promise<void>((resolve, reject) => {
        let out = "";
        sim!.stdout!.on("data", (d: Buffer) => {
          out += d.toString();
          if (out.includes("simulating")) resolve();
        });
        sim!.on("exit", (code) => reject(new Error(`simulate exited ${code}: ${simErr}`)));
      }),
  );
  // Not a terminal: no `\r` progress lines in its log.
  expect(simErr).not.toContain("\r");
}, 600_000);

afterAll(() => stopAll(sim, server, data.cleanup));

describe(`operator API with ${N} devices`, () => {
  let jobId = "";

  it("device ls gives the whole fleet (JSON, NDJSON) and --limit stops early", async () => {
    const all = cliJson<DeviceJson[]>(
      await timed("device ls --json", () => cli(["device", "ls", "--json"], env)),
    );
    expect(all).toHaveLength(N);
    expect(new Set(all.map((d) => d.id)).size).toBe(N);
    expect(all.every((d) => d.online)).toBe(true);
    const ten = cliJson<DeviceJson[]>(await cli(["device", "ls", "--limit", "10", "--json"], env));
    expect(ten.map((d) => d.id)).toEqual(all.slice(0, 10).map((d) => d.id));
    const nd = await cli(["device", "ls", "--ndjson", "--selector", "pool=scale"], env);
    expect(nd.code).toBe(0);
    expect(
      nd.stdout
        .trim()
        .split("\n")
        .map((l) => (JSON.parse(l) as DeviceJson).id),
    ).toEqual(all.map((d) => d.id));
  }, 120_000);

  it("a rollout to every device, and jobs show of it, answer", async () => {
    const r = await timed("rollout create --wait", () =>
      cli(["rollout", "create", "-f", hello, "--selector", "pool=scale", "--wait", "--json"], env, 300_000),
    );
    const ro = cliJson<RolloutJson>(r);
    expect(ro.state).toBe("SUCCEEDED");
    expect(ro.counts.total).toBe(N);
    jobId = ro.jobId;
    const job = cliJson<JobJson>(
      await timed("jobs show (all devices)", () => cli(["jobs", "show", jobId, "--json"], env)),
    );
    expect(job.devices).toHaveLength(N);
    expect(job.counts.succeeded).toBe(N);
    expect(job.devices.every((d) => d.state === "SUCCEEDED")).toBe(true);
    const ls = cliJson<Array<{ id: string; devices: number }>>(await cli(["jobs", "ls", "--json"], env));
    expect(ls.find((j) => j.id === jobId)?.devices).toBe(N);
    const one = await cli(["device", "show", "sim-0001", "--json"], env);
    expect(one.code).toBe(0);
    expect(cliJson<{ jobs: Array<{ jobId: string }> }>(one).jobs[0]?.jobId).toBe(jobId);
  }, 400_000);

  it("SIGTERM stops the server in time, and a restart (on other ports) loses nothing", async () => {
    const t0 = performance.now();
    server.proc.kill("SIGTERM");
    // Exit 0 is the graceful path; the server's own 10 s deadline would exit 1.
    expect(await server.exited).toBe(0);
    console.log(
      `SIGTERM with ${N} devices connected: stopped in ${((performance.now() - t0) / 1000).toFixed(2)} s`,
    );
    sim?.kill("SIGKILL");
    server = await startServer(data.dir);
    const job = cliJson<JobJson>(await cli(["jobs", "show", jobId, "--json"], env));
    expect(job.devices).toHaveLength(N);
    expect(job.state).toBe("SUCCEEDED");
    expect(cliJson<DeviceJson[]>(await cli(["device", "ls", "--json"], env))).toHaveLength(N);
  }, 120_000);
});
