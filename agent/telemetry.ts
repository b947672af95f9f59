// Device facts (for preconditions and DeviceState) and telemetry, from systeminformation.
import si from "systeminformation";
import type { Telemetry } from "../proto/index.js";
import type { Facts } from "./facts.js";

/** The file system holding `path` (the longest mount prefix). */
async function fsFor(path: string) {
  const all = await si.fsSize().catch(() => []);
  return all.filter((f) => path.startsWith(f.mount)).sort((a, b) => b.mount.length - a.mount.length)[0];
}

export async function collectFacts(o: {
  dataDir: string;
  agentVersion: string;
  labels: Readonly<Record<string, string>>;
  extra?: Facts;
}): Promise<Facts> {
  const [os, mem, cpu, battery, fs] = await Promise.all([
    si.osInfo().catch(() => undefined),
    si.mem().catch(() => undefined),
    si.cpu().catch(() => undefined),
    si.battery().catch(() => undefined),
    fsFor(o.dataDir),
  ]);
  const facts: Facts = {
    "agent.version": o.agentVersion,
    "os.arch": process.arch,
    "os.platform": process.platform,
  };
  if (os) {
    facts["os.distro"] = os.distro;
    facts["os.release"] = os.release;
    facts["os.kernel"] = os.kernel;
    facts["os.hostname"] = os.hostname;
  }
  if (mem) {
    facts["mem.total"] = mem.total;
    facts["mem.available"] = mem.available;
  }
  if (cpu) facts["cpu.cores"] = cpu.cores;
  if (fs) {
    facts["disk.free"] = fs.available;
    facts["disk.total"] = fs.size;
  }
  if (battery?.hasBattery) {
    facts["battery.percent"] = battery.percent;
    facts["battery.charging"] = battery.isCharging;
  }
  for (const [k, v] of Object.entries(o.labels)) facts[`labels.${k}`] = v;
  return { ...facts, ...o.extra };
}

export async function collectTelemetry(dataDir: string, now: number): Promise<Telemetry> {
  const [load, mem, fs, temp, net] = await Promise.all([
    si.currentLoad().catch(() => undefined),
    si.mem().catch(() => undefined),
    fsFor(dataDir),
    si.cpuTemperature().catch(() => undefined),
    si.networkStats("*").catch(() => []),
  ]);
  return {
    cpuLoad: load ? load.currentLoad / 100 : 0,
    memTotal: mem?.total ?? 0,
    memUsed: mem ? mem.total - mem.available : 0,
    diskTotal: fs?.size ?? 0,
    diskFree: fs?.available ?? 0,
    temperatureC: temp?.main ?? Number.NaN,
    uptimeS: Math.round(si.time().uptime),
    netRxBytes: net.reduce((a, n) => a + (n.rx_bytes || 0), 0),
    netTxBytes: net.reduce((a, n) => a + (n.tx_bytes || 0), 0),
    atMs: now,
  };
}
