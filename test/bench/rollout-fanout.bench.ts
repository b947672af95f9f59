// B1 rollout fan-out: a noop job rolled out in one wave to N simulated devices through the full
// stack (auth, ACL, signature check, device store, controller LevelDB), against a bare MQTT.js
// QoS 1 echo round trip to N clients through a bare aedes (in its own process, as the fleet
// server is), measured in the same run.
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import mqtt, { type MqttClient } from "mqtt";
import { it } from "vitest";
import { cli, cliJson, FLEET, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { bareAedes, cpuMsOf } from "./bare.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_DEVICES ?? 2000);

/** The echo's time, and the CPU its broker process and its clients (this process) used. */
async function bareEcho(n: number): Promise<{ ms: number; brokerCpuMs: number; clientCpuMs: number }> {
  const broker = await bareAedes();
  const clients: MqttClient[] = [];
  try {
    for (let i = 0; i < n; i++) {
      const c = await mqtt.connectAsync(broker.url, { clientId: `echo-${i}`, reconnectPeriod: 0 });
      c.on("message", (_t, p) => c.publish(`echo/${i}/out`, p, { qos: 1 }));
      await c.subscribeAsync(`echo/${i}/in`, { qos: 1 });
      clients.push(c);
    }
    const ctl = await mqtt.connectAsync(broker.url, { clientId: "echo-ctl" });
    await ctl.subscribeAsync("echo/+/out", { qos: 1 });
    let got = 0;
    const done = new Promise<void>((r) => ctl.on("message", () => ++got === n && r()));
    const brokerBefore = cpuMsOf(broker.pid);
    const clientBefore = process.cpuUsage();
    const t = performance.now();
    for (let i = 0; i < n; i++) ctl.publish(`echo/${i}/in`, Buffer.alloc(200), { qos: 1 });
    await done;
    const ms = performance.now() - t;
    const client = process.cpuUsage(clientBefore);
    const brokerCpuMs = cpuMsOf(broker.pid) - brokerBefore;
    await ctl.endAsync();
    return { ms, brokerCpuMs, clientCpuMs: (client.user + client.system) / 1000 };
  } finally {
    await Promise.all(clients.map((c) => c.endAsync(true)));
    broker.stop();
  }
}

it(`B1: rollout of a noop job to ${N} simulated devices vs ${N} bare MQTT round trips`, async () => {
  const echo = await bareEcho(N);
  const rawMs = echo.ms;
  const data = tempDir("fleet-bench-");
  let sim: ChildProcess | undefined;
  const server = await (async () => {
    await cli(["init", "--dir", data.dir]);
    const f = join(data.dir, "server.json");
    const cfg = JSON.parse(readFileSync(f, "utf8"));
    cfg.limits = { ...cfg.limits, connectsPerSecondPerAddress: 100_000 };
    writeFileSync(f, JSON.stringify(cfg), { mode: 0o600 });
    return startServer(data.dir);
  })();
  try {
    const env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
    const simulated = spawn(
      process.execPath,
      [
        // FLEET_SERVER_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles this one too
        ...(process.env.FLEET_SERVER_NODE_ARGS?.split(" ").filter(Boolean) ?? []),
        FLEET,
        "simulate",
        "--devices",
        String(N),
        "--prefix",
        "b-",
        "--label",
        "pool=bench",
        "--connect-rate",
        "2000",
      ],
      {
        env: { ...process.env, ...env },
        stdio: ["ignore", "pipe", "ignore"],
      },
    );
    sim = simulated;
    await new Promise<void>((res) => {
      let out = "";
      simulated.stdout!.on("data", (d: Buffer) => {
        out += d.toString();
        if (out.includes("simulating")) res();
      });
    });
    const job = join(data.dir, "noop.yaml");
    writeFileSync(job, "name: bench\ntasks:\n  - { id: a, type: noop }\n");
    const w0 = process.hrtime.bigint() / 1000n;
    const serverBefore = cpuMsOf(server.proc.pid!);
    const simBefore = cpuMsOf(simulated.pid!);
    const r = cliJson<{ durationMs: number; counts: { succeeded: number } }>(
      await cli(
        ["rollout", "create", "-f", job, "--selector", "pool=bench", "--waves", "100%", "--wait", "--json"],
        env,
        600_000,
      ),
    );
    // Where each delivered job's cost goes (issue 17): CPU per job in the server (broker and
    // controller together) and in the simulated agents, against the bare echo's broker and
    // clients per round trip. 10 ms clock ticks: meaningful over thousands of devices.
    if (process.env.BENCH_WINDOW) writeFileSync(process.env.BENCH_WINDOW, `${w0} ${process.hrtime.bigint() / 1000n}`);
    const perJob = (ms: number) => (ms * 1000) / N;
    const serverCpu = cpuMsOf(server.proc.pid!) - serverBefore;
    const simCpu = cpuMsOf(simulated.pid!) - simBefore;
    report("B1-rollout-fanout", [
      {
        name: `${N} devices, one wave: created -> every device SUCCEEDED (${r.counts.succeeded} ok)`,
        value: r.durationMs,
        unit: "ms",
        baseline: rawMs,
        ratio: r.durationMs / rawMs,
        goal: "<= 2x bare aedes round trips",
      },
      {
        name: "server CPU per delivered job (broker + controller) vs bare broker CPU per round trip",
        value: perJob(serverCpu),
        unit: "µs",
        baseline: perJob(echo.brokerCpuMs),
        ratio: serverCpu / Math.max(1, echo.brokerCpuMs),
        goal: "(reported)",
      },
      {
        name: "simulated-agent CPU per delivered job vs echo-client CPU per round trip",
        value: perJob(simCpu),
        unit: "µs",
        baseline: perJob(echo.clientCpuMs),
        ratio: simCpu / Math.max(1, echo.clientCpuMs),
        goal: "(reported)",
      },
    ]);
  } finally {
    // Graceful stops, so that FLEET_SERVER_NODE_ARGS="--cpu-prof ..." leaves profiles behind.
    sim?.kill("SIGTERM");
    if (sim?.exitCode === null) await new Promise((r) => sim!.once("exit", r));
    server.proc.kill("SIGTERM");
    await server.exited;
    data.cleanup();
  }
});
