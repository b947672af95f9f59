// B6 registry: 100,000 registered devices (labels rack=r0..r99, so a selector picks 1,000):
// the controller's memory per device (heap and resident growth over the registration, vs the
// size of a device's record as stored), and the time of `fleet device ls --selector` over them
// (vs `fleet device show` of one device: the same CLI start, login and round trip).
import { it } from "vitest";
import { loadContext } from "../../cli/context.js";
import { withRpc } from "../../cli/rpc.js";
import { cli, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_REGISTRY ?? 100_000);
const BATCH = 1000;

async function metrics(url: string): Promise<Record<string, number>> {
  const text = await (await fetch(`${url}/metrics`)).text();
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^(nodejs_heap_size_used_bytes|process_resident_memory_bytes) (\S+)/gm))
    out[m[1]!] = Number(m[2]);
  return out;
}

async function timed(
  args: string[],
  env: Record<string, string>,
  runs = 3,
): Promise<{ ms: number; out: string }> {
  const times: number[] = [];
  let out = "";
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    const r = await cli(args, env, 120_000);
    times.push(performance.now() - t);
    if (r.code !== 0) throw new Error(`fleet ${args.join(" ")}: ${r.stderr}`);
    out = r.stdout;
  }
  return { ms: times.sort((a, b) => a - b)[Math.floor(runs / 2)]!, out };
}

it(`B6: ${N} registered devices`, async () => {
  const data = tempDir("fleet-b6-");
  await cli(["init", "--dir", data.dir]);
  const server = await startServer(data.dir);
  try {
    const env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
    const before = await metrics(server.urls.http);
    const ctx = loadContext({ context: env.FLEET_CONTEXT });
    const t = performance.now();
    await withRpc(ctx, async (rpc) => {
      for (let i = 0; i < N; i += BATCH) {
        const devices = Array.from({ length: Math.min(BATCH, N - i) }, (_, k) => {
          const n = i + k;
          return { id: `reg-${String(n).padStart(6, "0")}`, labels: { rack: `r${n % 100}`, env: "bench" } };
        });
        await rpc.call("device.addMany", { devices });
      }
    });
    const registerMs = performance.now() - t;
    await new Promise((r) => setTimeout(r, 6000)); // the registry flush and GC settle
    const after = await metrics(server.urls.http);
    const ls = await timed(["device", "ls", "--selector", "rack=r7,env=bench", "--json"], env);
    const rows = (JSON.parse(ls.out) as unknown[]).length;
    const show = await timed(["device", "show", "reg-000007", "--json"], env);
    // Paged (DESIGN.md §10): a tenth of the fleet, and all of it, through the CLI.
    const tenth = Array.from({ length: 10 }, (_, i) => `r${i}`).join(",");
    const ls10k = await timed(["device", "ls", "--selector", `rack in (${tenth})`, "--json"], env);
    const rows10k = (JSON.parse(ls10k.out) as unknown[]).length;
    const lsAll = await timed(["device", "ls", "--json"], env, 1);
    const rowsAll = (JSON.parse(lsAll.out) as unknown[]).length;
    const record = JSON.stringify({
      id: "reg-000007",
      labels: { rack: "r7", env: "bench" },
      tokenHash: "0".repeat(64),
      brokerHash: `$7$101$${"A".repeat(16)}$${"A".repeat(88)}`,
      createdAt: Date.now(),
      lastSeen: 0,
      online: false,
      agentVersion: "",
      queueDepth: 0,
    }).length;
    const heapPer = (after.nodejs_heap_size_used_bytes! - before.nodejs_heap_size_used_bytes!) / N;
    const rssPer = (after.process_resident_memory_bytes! - before.process_resident_memory_bytes!) / N;
    report("B6-registry", [
      {
        name: `controller heap per device (${N} registered in ${(registerMs / 1000).toFixed(1)}s)`,
        value: heapPer,
        unit: "bytes",
        baseline: record,
        ratio: heapPer / record,
        goal: "(reported) vs the device record's stored size",
      },
      {
        name: "controller resident memory per device",
        value: rssPer,
        unit: "bytes",
        baseline: record,
        ratio: rssPer / record,
        goal: "(reported) vs the device record's stored size",
      },
      {
        name: `fleet device ls --selector over ${N} (${rows} rows), whole command`,
        value: ls.ms,
        unit: "ms",
        baseline: show.ms,
        ratio: ls.ms / show.ms,
        goal: "(reported) vs fleet device show of one device",
      },
      {
        name: `fleet device ls of ${rows10k} devices (paged), whole command`,
        value: ls10k.ms,
        unit: "ms",
        baseline: show.ms,
        ratio: ls10k.ms / show.ms,
        goal: "seconds, not minutes (reported) vs fleet device show of one device",
      },
      {
        name: `fleet device ls of the whole fleet (${rowsAll} devices, paged), whole command`,
        value: lsAll.ms,
        unit: "ms",
        baseline: show.ms,
        ratio: lsAll.ms / show.ms,
        goal: "(reported) vs fleet device show of one device",
      },
    ]);
  } finally {
    server.proc.kill("SIGTERM");
    await server.exited;
    data.cleanup();
  }
});
