// `fleet simulate`: N instances of the real agent code in one process, each with its own MQTT
// connection, sharing one LevelDB per thread (sublevels per device, not N databases), to
// load-test a fleet server with thousands of devices from one laptop. The devices run in worker
// threads (`--workers`, default one) so that the simulator is not what a benchmark measures.
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";
import { ClassicLevel } from "classic-level";
import type { Command } from "commander";
import pino from "pino";
import { Agent } from "../agent/agent.js";
import { parseAgentConfig } from "../agent/config.js";
import { GroupCommit } from "../common/group-commit.js";
import { TaskFailedError } from "../firmware-tasks/errors.js";
import { builtinHandlers } from "../firmware-tasks/index.js";
import type { TaskHandler } from "../firmware-tasks/types.js";
import { VerifiedSignatures } from "../proto/signing.js";
import { contextTrust, loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { CliError } from "./exit.js";
import { collect, parseKv } from "./format.js";
import { withRpc } from "./rpc.js";
import { YOUNG_GENERATION_MB } from "./young-generation.js";

const BATCH = 500;

/** Extra time a task run takes: `min` ms, or uniformly between `min` and `max`. */
export interface Latency {
  min: number;
  max: number;
}

const MAX_TIMER_MS = 2 ** 31 - 1;

/** `--latency`: "ms" or "min-max" (ms). */
export function parseLatency(s: string): Latency | undefined {
  const m = /^(\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?$/.exec(s.trim());
  if (!m) return undefined;
  const min = Number(m[1]);
  const max = m[2] === undefined ? min : Number(m[2]);
  // Beyond a timer's longest delay (about 24.8 days) Node fires it after 1 ms instead.
  return max >= min && max <= MAX_TIMER_MS ? { min, max } : undefined;
}

/** Built-in handlers that take `latency` longer and fail a share `failRate` of runs. */
export function simulatedHandlers(failRate: number, latency: Latency): TaskHandler[] {
  return builtinHandlers.map((h) => ({
    ...h,
    async run(ctx, params, signal) {
      const ms = latency.min + Math.random() * (latency.max - latency.min);
      if (ms) await delay(ms, undefined, { signal });
      if (Math.random() < failRate) throw new TaskFailedError("simulated failure", { reason: "simulated" });
      return h.run(ctx, params, signal);
    },
  }));
}

interface SimOptions extends OperatorOptions {
  devices: string;
  prefix: string;
  label: string[];
  failRate: string;
  latency: string;
  connectRate: string;
  telemetry: string;
  broker?: string;
  via?: string;
  workers: string;
  stats?: string;
  packetKinds?: boolean;
}

export function registerSimulate(program: Command): void {
  operatorOptions(program.command("simulate"))
    .description("run N simulated devices (the real agent code) against a fleet server until interrupted")
    .requiredOption("--devices <n>", "how many devices")
    .option("--prefix <p>", "device ids are <prefix>0001, <prefix>0002, ...", "sim-")
    .option("--label <k=v>", "a label for every device (repeatable)", collect, [])
    .option("--fail-rate <p>", "share of task runs that fail (0..1)", "0")
    .option("--latency <ms>", 'extra time every task run takes: "ms", or "min-max" (uniform)', "0")
    .option("--connect-rate <n>", "connections opened per second", "40")
    .option("--telemetry <s>", "telemetry interval in seconds (synthetic values; 0 = off)", "0")
    .option("--broker <url>", "broker URL for the devices (default: the context's server)")
    .option("--via <gateway>", "put the devices behind this site gateway (they connect to it over TLS)")
    .option("--workers <n>", "threads to spread the devices over (one LevelDB each)", "1")
    .option("--stats <file>", "on SIGUSR2, write the devices' MQTT packets/bytes and LevelDB writes so far")
    .option("--packet-kinds", "with --stats: count packets by kind and channel too (a string per packet)")
    .action(async (o: SimOptions) => {
      const n = Number.parseInt(o.devices, 10);
      const failRate = Number(o.failRate);
      const latency = parseLatency(o.latency);
      const rate = Number(o.connectRate);
      if (!(n >= 1) || !(failRate >= 0 && failRate <= 1) || !latency || !(rate > 0)) {
        throw new CliError(
          "--devices >= 1, --fail-rate in 0..1, --latency ms or min-max (ms, min <= max), --connect-rate > 0",
        );
      }
      const labels = parseKv(o.label, "--label") as Record<string, string>;
      // `\r` progress only on a terminal; a log file gets the final lines only.
      const progress = (line: string) => {
        if (process.stderr.isTTY) process.stderr.write(`\r${line}`);
      };
      const ctx = loadContext(o);
      const ids = Array.from({ length: n }, (_, i) => `${o.prefix}${String(i + 1).padStart(4, "0")}`);
      if (o.via && o.broker) throw new CliError("--via or --broker, not both");
      const { info, secrets, gateway } = await withRpc(ctx, async (rpc) => {
        const info = await rpc.call("server.info", {});
        const gateway = o.via ? (await rpc.call("device.show", { id: o.via })).gateway : undefined;
        if (o.via && !gateway) throw new CliError(`${o.via} is not a gateway (flash it with --gateway)`);
        const secrets = new Map<string, string>();
        for (let i = 0; i < ids.length; i += BATCH) {
          const made = await rpc.call("device.addMany", {
            devices: ids.slice(i, i + BATCH).map((id) => ({ id, labels, ...(o.via ? { via: o.via } : {}) })),
          });
          for (const d of made) secrets.set(d.id, d.password);
          progress(`registered ${Math.min(i + BATCH, n)}/${n}`);
        }
        progress("\n");
        return { info, secrets, gateway };
      });
      const { trustedKeys, caCert } = contextTrust(ctx, info.caCert);
      const dir = mkdtempSync(join(tmpdir(), "fleet-sim-"));
      // Behind a gateway: its TLS URL, checked against the fleet CA.
      if (gateway) writeFileSync(join(dir, "ca.pem"), caCert);
      const broker = gateway ? `mqtts://${gateway.hosts[0]}:${gateway.port}` : (o.broker ?? ctx.server);
      const workers = Number(o.workers);
      if (!(workers >= 1 && workers <= 64)) throw new CliError("--workers: 1..64");
      const shared = {
        broker,
        caCert: gateway ? "ca.pem" : undefined,
        trustedKeys,
        labels,
        prefix: info.prefix,
        failRate,
        latency,
        telemetryS: Number(o.telemetry),
        rate: rate / workers,
        packetKinds: Boolean(o.packetKinds),
      };
      const groups = split(ids, workers).map((part, i) => ({
        ...shared,
        dir: join(dir, `w${i}`),
        caDir: dir,
        devices: part.map((id) => ({ id, password: secrets.get(id)! })),
      }));
      const started = Date.now();
      const parts = groups.map((g) => inWorker(g));
      for (;;) {
        const up = parts.reduce((n, p) => n + p.connected(), 0);
        progress(`connecting: ${up}/${n} connected`);
        if (up === n) break;
        await delay(200);
      }
      progress("\n");
      process.stdout.write(
        `simulating ${n} devices (${ids[0]}..${ids.at(-1)}) in ${workers} thread(s), all connected in ${((Date.now() - started) / 1000).toFixed(1)}s; Ctrl-C stops\n`,
      );
      // `--stats FILE`: on SIGUSR2, what the devices sent and received and wrote so far (benchmarks).
      const onStats = async () => {
        const all = await Promise.all(parts.map((p) => p.stats()));
        const sum: Record<string, number> = {};
        for (const st of all) for (const [k, v] of Object.entries(st)) sum[k] = (sum[k] ?? 0) + v;
        if (o.stats) writeFileSync(o.stats, JSON.stringify(sum));
      };
      if (o.stats) process.on("SIGUSR2", () => void onStats());
      await new Promise<void>((resolve) => {
        process.once("SIGINT", () => resolve());
        process.once("SIGTERM", () => resolve());
      });
      process.stderr.write(`stopping ${n} devices\n`);
      await Promise.all(parts.map((p) => p.stop()));
      rmSync(dir, { recursive: true, force: true });
    });
}

/** What one thread of the simulator runs: its share of the devices. */
interface Group {
  broker: string;
  caCert?: string;
  caDir: string;
  dir: string;
  trustedKeys: Array<{ keyId: string; publicKey: string }>;
  labels: Record<string, string>;
  prefix: string;
  failRate: number;
  latency: Latency;
  telemetryS: number;
  rate: number;
  packetKinds: boolean;
  devices: Array<{ id: string; password: string }>;
}

interface Part {
  connected(): number;
  stats(): Promise<Record<string, number>>;
  stop(): Promise<void>;
}

function split<T>(xs: readonly T[], k: number): T[][] {
  const out: T[][] = Array.from({ length: Math.min(k, xs.length) }, () => []);
  for (let i = 0; i < xs.length; i++) out[i % out.length]!.push(xs[i]!);
  return out;
}

/**
 * One simulated device's part of the shared LevelDB: its stores are sublevels of the shared
 * database named `<device>:<store>` — one level, not a sublevel of a per-device sublevel, which
 * costs each write a second prefixing pass and each device one more sublevel object.
 */
function deviceSpace(db: ClassicLevel<string, unknown>, id: string) {
  return {
    sublevel: (name: string, o: object) => db.sublevel(`${id}:${name}`, o as never),
    open: async () => {}, // the shared database is opened and closed by the group
    close: async () => {},
  };
}

/**
 * The devices of one group: the real agent code, one MQTT connection each, one LevelDB for
 * the group (`deviceSpace`) with one group commit, and signatures verified once.
 */
async function runGroup(g: Group, onConnected: (n: number) => void): Promise<Part> {
  mkdirSync(g.dir, { recursive: true });
  const db = new ClassicLevel<string, unknown>(join(g.dir, "db"));
  await db.open();
  const writer = new GroupCommit<unknown>(db as never);
  const log = pino({ level: process.env.FLEET_LOG_LEVEL ?? "warn" });
  const handlers = simulatedHandlers(g.failRate, g.latency);
  const verifiedSignatures = new VerifiedSignatures();
  const agents: Agent[] = [];
  let stopping = false;
  const connected = () => agents.filter((a) => a.connected).length;
  const starting = (async () => {
    for (const { id, password } of g.devices) {
      if (stopping) return;
      const config = parseAgentConfig(
        {
          deviceId: id,
          brokers: [g.broker],
          ...(g.caCert ? { caCert: g.caCert } : {}),
          password,
          trustedKeys: g.trustedKeys,
          labels: g.labels,
          topicPrefix: g.prefix,
          telemetryIntervalS: g.telemetryS,
        },
        g.caDir,
      );
      const agent = new Agent({
        config,
        log,
        db: deviceSpace(db, id) as never,
        writer,
        handlers,
        measureFacts: false,
        verifiedSignatures,
        countPacketKinds: g.packetKinds,
        telemetry: async () => ({
          cpuLoad: 0.1 + Math.random() * 0.2,
          memTotal: 1 << 30,
          memUsed: 1 << 28,
          diskFree: 1 << 32,
          uptimeS: 1,
          atMs: Date.now(),
        }),
      });
      agents.push(agent);
      await agent.start();
      if (agents.length % Math.max(1, Math.round(g.rate / 10)) === 0) await delay(100);
    }
  })();
  // Progress until every device is up (nobody asks later: 10,000 agents are not polled for nothing).
  const timer = setInterval(() => {
    const up = connected();
    onConnected(up);
    if (up === g.devices.length) clearInterval(timer);
  }, 200);
  return {
    connected,
    stats: async () => {
      const sum: Record<string, number> = {};
      for (const a of agents) for (const [k, v] of Object.entries(a.wireStats())) sum[k] = (sum[k] ?? 0) + v;
      const lv = writer.stats;
      return {
        ...sum,
        writes: lv.writes,
        syncWrites: lv.syncWrites,
        batches: lv.batches,
        syncs: lv.syncs,
        ops: lv.ops,
      };
    },
    stop: async () => {
      stopping = true;
      clearInterval(timer);
      await starting;
      await Promise.all(agents.map((a) => a.stop().catch(() => {})));
      await db.close();
    },
  };
}

/**
 * A group in a worker thread: this same module, started with the group as data. Even one group
 * runs in a thread: there its young generation can be larger than the main thread's default
 * (16 MiB semi-spaces). Thousands of agents keep each job's messages and records alive for the
 * few hundred ms it is in flight, so with the default most of what a scavenge meets survives and
 * is copied, twice; 10,000 simulated devices spent a third of their CPU in scavenges.
 */
function inWorker(g: Group): Part {
  const worker = new Worker(new URL(import.meta.url), {
    workerData: { fleetSimulate: g },
    resourceLimits: { maxYoungGenerationSizeMb: YOUNG_GENERATION_MB },
  });
  let up = 0;
  let asked: ((s: Record<string, number>) => void) | undefined;
  let stopped: (() => void) | undefined;
  worker.on("message", (m: { connected?: number; stats?: Record<string, number>; stopped?: true }) => {
    if (m.connected !== undefined) up = m.connected;
    if (m.stats) asked?.(m.stats);
    if (m.stopped) stopped?.();
  });
  worker.on("error", (err) => {
    process.stderr.write(`simulator thread failed: ${err.message}\n`);
    process.exit(1);
  });
  return {
    connected: () => up,
    stats: () =>
      new Promise((r) => {
        asked = r;
        worker.postMessage("stats");
      }),
    stop: () =>
      new Promise<void>((r) => {
        stopped = r;
        worker.postMessage("stop");
      }).then(() => worker.terminate().then(() => {})),
  };
}

// A simulator thread: runs its group and answers the main thread.
if (!isMainThread && (workerData as { fleetSimulate?: Group } | null)?.fleetSimulate) {
  const g = (workerData as { fleetSimulate: Group }).fleetSimulate;
  void runGroup(g, (connected) => parentPort!.postMessage({ connected })).then((part) => {
    parentPort!.on("message", async (m: string) => {
      if (m === "stats") parentPort!.postMessage({ stats: await part.stats() });
      if (m === "stop") {
        await part.stop();
        parentPort!.postMessage({ stopped: true });
      }
    });
  });
}
