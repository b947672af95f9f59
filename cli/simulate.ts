// `fleet simulate`: N instances of the real agent code in one process, each with its own MQTT
// connection, all sharing one LevelDB (a sublevel per device, not N databases), to load-test a
// fleet server with thousands of devices from one laptop.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as delay } from "node:timers/promises";
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

const BATCH = 500;

/** Built-in handlers that take `latencyMs` longer and fail a share `failRate` of runs. */
export function simulatedHandlers(failRate: number, latencyMs: number): TaskHandler[] {
  return builtinHandlers.map((h) => ({
    ...h,
    async run(ctx, params, signal) {
      if (latencyMs) await delay(latencyMs, undefined, { signal });
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
}

export function registerSimulate(program: Command): void {
  operatorOptions(program.command("simulate"))
    .description("run N simulated devices (the real agent code) against a fleet server until interrupted")
    .requiredOption("--devices <n>", "how many devices")
    .option("--prefix <p>", "device ids are <prefix>0001, <prefix>0002, ...", "sim-")
    .option("--label <k=v>", "a label for every device (repeatable)", collect, [])
    .option("--fail-rate <p>", "share of task runs that fail (0..1)", "0")
    .option("--latency <ms>", "extra time every task run takes", "0")
    .option("--connect-rate <n>", "connections opened per second", "40")
    .option("--telemetry <s>", "telemetry interval in seconds (synthetic values; 0 = off)", "0")
    .option("--broker <url>", "broker URL for the devices (default: the context's server)")
    .option("--via <gateway>", "put the devices behind this site gateway (they connect to it over TLS)")
    .action(async (o: SimOptions) => {
      const n = Number.parseInt(o.devices, 10);
      const failRate = Number(o.failRate);
      const latency = Number(o.latency);
      const rate = Number(o.connectRate);
      if (!(n >= 1) || !(failRate >= 0 && failRate <= 1) || !(latency >= 0) || !(rate > 0)) {
        throw new CliError("--devices >= 1, --fail-rate in 0..1, --latency >= 0, --connect-rate > 0");
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
      const db = new ClassicLevel<string, unknown>(join(dir, "db"));
      await db.open();
      const writer = new GroupCommit<unknown>(db as never);
      const log = pino({ level: process.env.FLEET_LOG_LEVEL ?? "warn" });
      const handlers = simulatedHandlers(failRate, latency);
      const telemetryS = Number(o.telemetry);
      const agents: Agent[] = [];
      const verifiedSignatures = new VerifiedSignatures();
      const started = Date.now();
      for (const id of ids) {
        const config = parseAgentConfig(
          {
            deviceId: id,
            brokers: [broker],
            ...(gateway ? { caCert: "ca.pem" } : {}),
            password: secrets.get(id),
            trustedKeys,
            labels,
            topicPrefix: info.prefix,
            telemetryIntervalS: telemetryS,
          },
          dir,
        );
        const agent = new Agent({
          config,
          log,
          db: db.sublevel(id) as never,
          writer,
          handlers,
          measureFacts: false,
          verifiedSignatures,
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
        if (agents.length % Math.max(1, Math.round(rate / 10)) === 0) await delay(100);
        const up = agents.filter((a) => a.connected).length;
        progress(`connecting: ${up}/${n} connected, ${agents.length} started`);
      }
      for (;;) {
        const up = agents.filter((a) => a.connected).length;
        progress(`connecting: ${up}/${n} connected`);
        if (up === n) break;
        await delay(200);
      }
      progress("\n");
      process.stdout.write(
        `simulating ${n} devices (${ids[0]}..${ids.at(-1)}), all connected in ${((Date.now() - started) / 1000).toFixed(1)}s; Ctrl-C stops\n`,
      );
      await new Promise<void>((resolve) => {
        process.once("SIGINT", () => resolve());
        process.once("SIGTERM", () => resolve());
      });
      process.stderr.write(`stopping ${n} devices\n`);
      await Promise.all(agents.map((a) => a.stop().catch(() => {})));
      await db.close();
      rmSync(dir, { recursive: true, force: true });
    });
}
