// B7 reconnect storm: DEVICES simulated devices connected to one server; the server is
// SIGKILLed and restarted on the same ports. Measured from the server's own /metrics: time
// until every device is back, peak connection attempts per second, and the server's CPU over
// the recovery. Baseline: the time the same devices took to connect at first, in the same run.
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { it } from "vitest";
import { cli, FLEET, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const DEVICES = Number(process.env.BENCH_STORM_DEVICES ?? 5000);
const DOWN_MS = 3000;

async function metrics(url: string): Promise<{ connected: number; attempts: number; cpu: number }> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const num = (re: RegExp) => Number(re.exec(text)?.[1] ?? 0);
  return {
    connected: num(/^fleet_connected_clients (\S+)/m),
    attempts: num(/^fleet_events_total\{name="connect_attempts"\} (\S+)/m),
    cpu: num(/^process_cpu_seconds_total (\S+)/m),
  };
}

it(`B7: ${DEVICES} devices reconnect after the server is SIGKILLed`, async () => {
  const data = tempDir("fleet-b7-");
  await cli(["init", "--dir", data.dir]);
  const f = join(data.dir, "server.json");
  const cfg = JSON.parse(readFileSync(f, "utf8"));
  // All simulated devices share one address: lift the per-address rate limit, not the storm.
  cfg.limits = { ...cfg.limits, connectsPerSecondPerAddress: 1_000_000 };
  writeFileSync(f, JSON.stringify(cfg), { mode: 0o600 });
  let server = await startServer(data.dir);
  const ports = server.ports;
  const env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
  const sim = spawn(
    process.execPath,
    [FLEET, "simulate", "--devices", String(DEVICES), "--prefix", "st-", "--connect-rate", "5000"],
    { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "ignore"] },
  );
  try {
    const firstS = await new Promise<number>((res, rej) => {
      let out = "";
      sim.stdout!.on("data", (d: Buffer) => {
        out += d.toString();
        const m = /all connected in ([\d.]+)s/.exec(out);
        if (m) res(Number(m[1]));
      });
      sim.once("exit", (code) => rej(new Error(`simulate exited ${code}`)));
    });
    server.proc.kill("SIGKILL");
    await server.exited;
    await new Promise((r) => setTimeout(r, DOWN_MS));
    const t0 = performance.now();
    server = await startServer(data.dir, ports);
    let prev = await metrics(server.urls.http);
    const start = prev;
    let peak = 0;
    let back = 0;
    for (;;) {
      await new Promise((r) => setTimeout(r, 250));
      const m = await metrics(server.urls.http);
      peak = Math.max(peak, (m.attempts - prev.attempts) * 4);
      prev = m;
      // Every device plus the controller's own connection.
      if (m.connected >= DEVICES + 1) {
        back = performance.now() - t0;
        break;
      }
      if (performance.now() - t0 > 600_000) throw new Error(`only ${m.connected} back after 10 min`);
    }
    const cpuPct = ((prev.cpu - start.cpu) / (back / 1000)) * 100;
    report("B7-reconnect-storm", [
      {
        name: `${DEVICES} devices back after a SIGKILL + restart (${prev.attempts} attempts, peak ${peak}/s, server CPU ${cpuPct.toFixed(0)}% of a core)`,
        value: back,
        unit: "ms",
        baseline: firstS * 1000,
        ratio: back / (firstS * 1000),
        goal: "(reported) vs their first connection at 5,000/s",
      },
    ]);
  } finally {
    sim.kill("SIGTERM");
    server.proc.kill("SIGTERM");
    await server.exited;
    await new Promise((r) => sim.once("exit", r));
    data.cleanup();
  }
});
