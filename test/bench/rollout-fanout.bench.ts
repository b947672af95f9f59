// B1 rollout fan-out: a noop job rolled out in one wave to N simulated devices through the full
// stack (auth, ACL, signature check, device store, controller LevelDB), against a bare MQTT.js
// QoS 1 echo round trip to N clients through a bare aedes (in its own process, as the fleet
// server is; warmed by BENCH_ECHO_WARMUP fan-outs first, as the server is by a warm-up round),
// measured in the same run, alternating, BENCH_ROUNDS times (median).
//
// Besides the time, where each delivered job's cost goes (issue 17): CPU of the server and of
// the simulated agents, MQTT packets and bytes each way (counted at the devices' sockets),
// LevelDB writes, batches and fsyncs on each side — against the echo's figures.
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import mqtt, { type MqttClient } from "mqtt";
import { it } from "vitest";
import { cli, cliJson, FLEET, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { bareAedes, cpuMsOf } from "./bare.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_DEVICES ?? 2000);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 5);
/** Rounds run first and not counted (JIT warm-up of the server, the simulator and the echo). */
const WARMUP = Number(process.env.BENCH_WARMUP ?? 1);
/** Fan-outs through the bare broker before the ones measured (its code warm, as the server's is). */
const ECHO_WARMUP = Number(process.env.BENCH_ECHO_WARMUP ?? 2);
/**
 * Fan-outs measured per round: the round's echo time is their median, its costs their mean. One
 * fan-out alone swung by 2x between rounds on a noisy machine, and the ratio with it.
 */
const ECHO_SAMPLES = Number(process.env.BENCH_ECHO_SAMPLES ?? 3);
/**
 * Simulator threads (`fleet simulate --workers`): at least two, so that the simulated agents can
 * use whichever core the server leaves idle (up to four, one core left to the server). Measured
 * on 2 cores at 2,000 devices once agents' writes went through the native batch, two alternating
 * pairs of runs: two threads 3.95x and 4.42x, one thread 4.73x and 5.20x (medians of 5 rounds).
 * (Before it, a second thread cost more CPU than it saved: 597 against 362 µs per job.)
 */
const WORKERS = Number(process.env.BENCH_SIM_WORKERS ?? Math.max(2, Math.min(4, cpus().length - 1)));

type Costs = Record<string, number>;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

interface Echo {
  /** One round's echo: its time and, per round trip, its broker's and clients' CPU and wire. */
  measure(): Promise<{ ms: number; costs: Costs }>;
  close(): Promise<void>;
}

/**
 * The bare echo, set up once for the whole run as the fleet is: a bare aedes process and N
 * MQTT.js clients, warmed by ECHO_WARMUP fan-outs. (Set up afresh every round, as it was, a
 * round took about 30 s — the simulated devices' keepalive: each round's rollout met the
 * PINGREQs of all 10,000 devices, 30 s after their previous rollout, in the same second.)
 */
async function openEcho(n: number): Promise<Echo> {
  const broker = await bareAedes();
  const clients: MqttClient[] = [];
  let ctl: MqttClient | undefined;
  const wire = { packetsIn: 0, packetsOut: 0 };
  const close = async () => {
    await Promise.all([...clients, ...(ctl ? [ctl] : [])].map((c) => c.endAsync(true)));
    broker.stop();
  };
  try {
    for (let i = 0; i < n; i++) {
      const c = await mqtt.connectAsync(broker.url, { clientId: `echo-${i}`, reconnectPeriod: 0 });
      c.on("message", (_t, p) => c.publish(`echo/${i}/out`, p, { qos: 1 }));
      c.on("packetreceive", () => wire.packetsIn++);
      c.on("packetsend", () => wire.packetsOut++);
      await c.subscribeAsync(`echo/${i}/in`, { qos: 1 });
      clients.push(c);
    }
    const socketBytes = () => {
      let bytesIn = 0;
      let bytesOut = 0;
      for (const c of clients) {
        const s = c.stream as unknown as { bytesRead: number; bytesWritten: number };
        bytesIn += s.bytesRead;
        bytesOut += s.bytesWritten;
      }
      return { bytesIn, bytesOut };
    };
    const control = await mqtt.connectAsync(broker.url, { clientId: "echo-ctl", reconnectPeriod: 0 });
    ctl = control;
    await control.subscribeAsync("echo/+/out", { qos: 1 });
    /** One fan-out: a QoS 1 publish to every client, each echoes it back. */
    const fanOut = () => {
      let got = 0;
      const done = new Promise<void>((r) => {
        const onMessage = () => {
          if (++got < n) return;
          control.off("message", onMessage);
          r();
        };
        control.on("message", onMessage);
      });
      for (let i = 0; i < n; i++) control.publish(`echo/${i}/in`, Buffer.alloc(200), { qos: 1 });
      return done;
    };
    // Warm, as the fleet server is (it ran the warm-up round): the first fan-out of a fresh
    // broker process runs aedes' code cold and takes about twice as long as the next ones.
    for (let k = 0; k < ECHO_WARMUP; k++) await fanOut();
    const measure = async () => {
      const before = { ...wire, ...socketBytes() };
      const brokerBefore = cpuMsOf(broker.pid);
      const clientBefore = process.cpuUsage();
      const times: number[] = [];
      for (let k = 0; k < ECHO_SAMPLES; k++) {
        const t = performance.now();
        await fanOut();
        times.push(performance.now() - t);
      }
      const client = process.cpuUsage(clientBefore);
      const brokerCpuMs = cpuMsOf(broker.pid) - brokerBefore;
      await delay(200); // the last PUBACKs
      const after = { ...wire, ...socketBytes() };
      const trips = n * ECHO_SAMPLES; // the costs below: per round trip
      return {
        ms: median(times),
        costs: {
          serverCpuUs: (brokerCpuMs * 1000) / trips,
          deviceCpuUs: (client.user + client.system) / trips, // µs per round trip
          packetsUp: (after.packetsOut - before.packetsOut) / trips,
          packetsDown: (after.packetsIn - before.packetsIn) / trips,
          pings: 0,
          bytesUp: (after.bytesOut - before.bytesOut) / trips,
          bytesDown: (after.bytesIn - before.bytesIn) / trips,
          serverWrites: 0,
          serverBatches: 0,
          serverFsyncs: 0,
          deviceWrites: 0,
          deviceFsyncWrites: 0,
        },
      };
    };
    return { measure, close };
  } catch (err) {
    await close();
    throw err;
  }
}

/** The server's LevelDB counters from /metrics. */
async function serverLevelDb(httpUrl: string): Promise<Costs> {
  const text = await (await fetch(`${httpUrl}/metrics`)).text();
  const out: Costs = {};
  for (const m of text.matchAll(/^fleet_leveldb_total\{what="(\w+)"\} (\d+)/gm)) out[m[1]!] = Number(m[2]);
  return out;
}

/** The simulator's stats file, fresh (SIGUSR2, then wait for the file to change). */
async function simStats(sim: ChildProcess, file: string): Promise<Costs> {
  writeFileSync(file, "");
  sim.kill("SIGUSR2");
  for (;;) {
    await delay(50);
    const s = readFileSync(file, "utf8");
    if (s) return JSON.parse(s) as Costs;
  }
}

it(`B1: rollout of a noop job to ${N} simulated devices vs ${N} bare MQTT round trips`, async () => {
  const data = tempDir("fleet-bench-");
  let sim: ChildProcess | undefined;
  await cli(["init", "--dir", data.dir]);
  const f = join(data.dir, "server.json");
  const cfg = JSON.parse(readFileSync(f, "utf8"));
  cfg.limits = { ...cfg.limits, connectsPerSecondPerAddress: 100_000 };
  writeFileSync(f, JSON.stringify(cfg), { mode: 0o600 });
  const server = await startServer(data.dir);
  const statsFile = join(data.dir, "sim-stats.json");
  const rounds: Array<{ ms: number; echoMs: number; costs: Costs; echo: Costs }> = [];
  let bare: Echo | undefined;
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
        "--workers",
        String(WORKERS),
        "--stats",
        statsFile,
        ...(process.env.BENCH_PACKETS ? ["--packet-kinds"] : []),
      ],
      { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "inherit"] },
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
    bare = await openEcho(N);
    for (let round = 0; round < WARMUP + ROUNDS; round++) {
      const echo = await bare.measure();
      await delay(2500); // the devices' state reports of the previous round are out
      // What the idle fleet costs per ms (agents' timers, keepalives): subtracted below.
      const idle0 = {
        at: performance.now(),
        server: cpuMsOf(server.proc.pid!),
        sim: cpuMsOf(simulated.pid!),
      };
      await delay(1000);
      const simBefore = await simStats(simulated, statsFile);
      const dbBefore = await serverLevelDb(server.urls.http);
      const t0 = performance.now();
      const serverBefore = cpuMsOf(server.proc.pid!);
      const simCpuBefore = cpuMsOf(simulated.pid!);
      const idleMs = t0 - idle0.at;
      const idleRate = {
        server: (serverBefore - idle0.server) / idleMs,
        sim: (simCpuBefore - idle0.sim) / idleMs,
      };
      const w0 = process.hrtime.bigint() / 1000n;
      const r = cliJson<{ durationMs: number; counts: { succeeded: number } }>(
        await cli(
          ["rollout", "create", "-f", job, "--selector", "pool=bench", "--waves", "100%", "--wait", "--json"],
          env,
          600_000,
        ),
      );
      if (r.counts.succeeded !== N) throw new Error(`only ${r.counts.succeeded} of ${N} succeeded`);
      if (process.env.BENCH_WINDOW)
        writeFileSync(process.env.BENCH_WINDOW, `${w0} ${process.hrtime.bigint() / 1000n}`);
      // Everything a job causes, also what follows the last SUCCEEDED (acks, state reports),
      // less what the idle fleet would have used meanwhile.
      await delay(2500);
      const elapsed = performance.now() - t0;
      const serverCpu = cpuMsOf(server.proc.pid!) - serverBefore - idleRate.server * elapsed;
      const simCpu = cpuMsOf(simulated.pid!) - simCpuBefore - idleRate.sim * elapsed;
      const simAfter = await simStats(simulated, statsFile);
      if (process.env.BENCH_PACKETS)
        console.log(
          Object.entries(simAfter)
            .filter(([k]) => k.startsWith("in ") || k.startsWith("out "))
            .map(([k, v]) => `${k}: ${((v - (simBefore[k] ?? 0)) / N).toFixed(2)}`)
            .join("\n"),
        );
      const dbAfter = await serverLevelDb(server.urls.http);
      const per = (a: Costs, b: Costs, k: string) => ((a[k] ?? 0) - (b[k] ?? 0)) / N;
      // Each round's figures as it ends (the table below has the medians).
      console.log(
        `round ${round + 1}${round < WARMUP ? " (warm-up)" : ""}: ${r.durationMs} / ${echo.ms.toFixed(0)} ms = ${(r.durationMs / echo.ms).toFixed(2)}x; ` +
          `µs a job: server ${((serverCpu * 1000) / N).toFixed(0)}, devices ${((simCpu * 1000) / N).toFixed(0)}; ` +
          `echo: server ${echo.costs.serverCpuUs!.toFixed(0)}, clients ${echo.costs.deviceCpuUs!.toFixed(0)}`,
      );
      if (round < WARMUP) continue;
      rounds.push({
        ms: r.durationMs,
        echoMs: echo.ms,
        echo: echo.costs,
        costs: {
          serverCpuUs: (serverCpu * 1000) / N,
          deviceCpuUs: (simCpu * 1000) / N,
          // Keepalive pings are the idle fleet's (every 30 s a device; all in phase, as they
          // connected together): a round that met them had 2.7 packets a job instead of 2.0.
          packetsUp: per(simAfter, simBefore, "packetsOut") - per(simAfter, simBefore, "pingsOut"),
          packetsDown: per(simAfter, simBefore, "packetsIn") - per(simAfter, simBefore, "pingsIn"),
          pings: per(simAfter, simBefore, "pingsOut"),
          bytesUp: per(simAfter, simBefore, "bytesOut"),
          bytesDown: per(simAfter, simBefore, "bytesIn"),
          serverWrites: per(dbAfter, dbBefore, "writes") * 1000,
          serverBatches: per(dbAfter, dbBefore, "batches") * 1000,
          serverFsyncs: per(dbAfter, dbBefore, "syncs") * 1000,
          deviceWrites: per(simAfter, simBefore, "writes"),
          deviceFsyncWrites: per(simAfter, simBefore, "syncWrites"),
        },
      });
    }
  } catch (err) {
    console.error(`server log (tail):\n${server.stderr().slice(-4000)}`);
    throw err;
  } finally {
    await bare?.close();
    // Graceful stops, so that FLEET_SERVER_NODE_ARGS="--cpu-prof ..." leaves profiles behind.
    sim?.kill("SIGTERM");
    if (sim && sim.exitCode === null) await new Promise((r) => sim!.once("exit", r));
    server.proc.kill("SIGTERM");
    await server.exited;
    data.cleanup();
  }
  const ratio = median(rounds.map((r) => r.ms / r.echoMs));
  const mid = rounds.find((r) => r.ms / r.echoMs === ratio)!;
  const cost = (key: string, name: string, unit: string) => {
    const value = median(rounds.map((r) => r.costs[key]!));
    const baseline = median(rounds.map((r) => r.echo[key]!));
    return {
      name: `per job: ${name}`,
      value,
      unit,
      baseline,
      ratio: baseline ? value / baseline : 0,
      goal: baseline ? "(reported)" : "(the echo has none)",
    };
  };
  report("B1-rollout-fanout", [
    {
      name: `${N} devices, one wave: created -> every device SUCCEEDED (median of ${ROUNDS}; ${rounds.map((r) => `${(r.ms / r.echoMs).toFixed(2)} = ${r.ms.toFixed(0)}/${r.echoMs.toFixed(0)}`).join(", ")})`,
      value: mid.ms,
      unit: "ms",
      baseline: mid.echoMs,
      ratio,
      goal: "<= 3x bare aedes round trips",
    },
    cost("serverCpuUs", "server CPU (broker + controller) vs bare broker", "µs"),
    cost("deviceCpuUs", `simulated-agent CPU (${WORKERS} thread(s)) vs echo clients`, "µs"),
    cost("packetsUp", "MQTT packets device -> server", ""),
    cost("packetsDown", "MQTT packets server -> device", ""),
    cost("pings", "keepalive pings a device (idle cost: not in the packets above)", ""),
    cost("bytesUp", "bytes device -> server", "B"),
    cost("bytesDown", "bytes server -> device", "B"),
    cost("serverWrites", "controller LevelDB writes asked (per 1,000 jobs)", ""),
    cost("serverBatches", "controller LevelDB batches written (per 1,000 jobs)", ""),
    cost("serverFsyncs", "controller LevelDB fsyncs (per 1,000 jobs)", ""),
    cost("deviceWrites", "agent durable writes (group-committed in the simulator)", ""),
    cost("deviceFsyncWrites", "agent synced writes", ""),
  ]);
});
