// Crash campaign (issue 16): jobs of non-idempotent shell tasks on a few real agents while
// random SIGKILLs hit the agents and the server. Each task appends its own marker to a log on
// its device, so afterwards: nothing lost (every job terminal on its device, every SUCCEEDED
// task's marker there), nothing run twice (no marker twice). A task killed mid-run ends FAILED
// (interrupted) and is not run again (DESIGN.md §4.5).
// FLEET_CHAOS_TASKS tasks in all (default 200 here; `npm run chaos`: 10,000) and
// FLEET_CHAOS_KILLS SIGKILLs (default 20; `npm run chaos`: 1,000).
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { loadContext } from "../../cli/context.js";
import { buildSpec, parseJob } from "../../cli/jobfile.js";
import { RpcClient } from "../../cli/rpc.js";
import { pb } from "../../proto/index.js";
import { signJob } from "../../proto/signing.js";
import {
  type AgentProc,
  flashMoved,
  type ServerProcess,
  setContextServer,
  startAgent,
  startFleet,
  startServer,
  stopAll,
  waitOnline,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const TASKS = Number(process.env.FLEET_CHAOS_TASKS ?? 200);
const KILLS = Number(process.env.FLEET_CHAOS_KILLS ?? 20);
const PER_JOB = 10;
const DEVICES = ["chaos-1", "chaos-2", "chaos-3"];
const data = tempDir("fleet-chaos-");
let server: ServerProcess;
let ports: number[];
let env: Record<string, string>;
const roots = new Map<string, string>();
const agents = new Map<string, AgentProc>();
const cleanups: Array<() => void> = [];

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  ({ server } = await startFleet(data.dir));
  ports = server.ports;
  env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
  for (const id of DEVICES) {
    const { root, cleanup } = await flashMoved(id, env, ["--allow-shell", "/bin/sh"]);
    roots.set(id, root);
    cleanups.push(cleanup);
    agents.set(id, startAgent(root));
  }
  for (const id of DEVICES) await waitOnline(env, id);
}, 120_000);

afterAll(() => stopAll(agents.values(), server, cleanups, data.cleanup));

/** Calls the server, riding out its restarts (a submit that did land answers "already exists"). */
async function call<T>(fn: (rpc: RpcClient) => Promise<T>): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    let rpc: RpcClient | undefined;
    try {
      rpc = await RpcClient.open(loadContext({ context: env.FLEET_CONTEXT }));
      return await fn(rpc);
    } catch (err) {
      if (attempt > 200) throw err;
      await sleep(250);
    } finally {
      await rpc?.close();
    }
  }
}

it(`${TASKS} non-idempotent tasks on ${DEVICES.length} agents through ${KILLS} SIGKILLs: none lost, none run twice`, async () => {
  const ctx = loadContext({ context: env.FLEET_CONTEXT });
  const jobs: Array<{ id: string; device: string; name: string }> = [];
  let kills = 0;
  let serverKills = 0;
  let submitting = true;
  const chaos = (async () => {
    while (kills < KILLS || submitting) {
      await sleep(100 + Math.random() * 300);
      if (kills >= KILLS) continue;
      kills++;
      if (Math.random() < 0.15) {
        serverKills++;
        server.proc.kill("SIGKILL");
        await server.exited;
        await sleep(Math.random() * 500);
        server = await startServer(data.dir, ports);
      } else {
        const id = DEVICES[Math.floor(Math.random() * DEVICES.length)]!;
        const a = agents.get(id)!;
        a.proc.kill("SIGKILL");
        await a.exited;
        await sleep(Math.random() * 300);
        agents.set(id, startAgent(roots.get(id)!));
      }
    }
  })();
  for (let j = 0; j * PER_JOB < TASKS; j++) {
    const device = DEVICES[j % DEVICES.length]!;
    const name = `c${j}`;
    const tasks = Array.from({ length: Math.min(PER_JOB, TASKS - j * PER_JOB) }, (_, t) => ({
      id: `t${t}`,
      type: "shell",
      params: { command: "/bin/sh", args: ["-c", `echo ${name}/t${t} >> "$FLEET_ROOT/runs.log"`] },
    }));
    const spec = buildSpec(parseJob({ name, tasks }), { deviceIds: [device], selector: "" });
    const signedJob = Buffer.from(
      pb.SignedJob.encode(signJob(spec, ctx.signingKeyPem, ctx.keyId)).finish(),
    ).toString("base64");
    await call(async (rpc) => {
      try {
        await rpc.call("job.submit", { signedJob, deviceIds: [device], selector: "" });
      } catch (err) {
        if (!/already exists/.test((err as Error).message)) throw err;
      }
    });
    jobs.push({ id: spec.jobId!, device, name });
  }
  submitting = false;
  await chaos;
  console.log(
    `chaos: ${jobs.length} jobs, ${TASKS} tasks submitted; ${kills} SIGKILLs (${serverKills} of the server)`,
  );
  // Everything converges once the killing stops.
  const terminal = new Set(["SUCCEEDED", "FAILED", "CANCELED"]);
  const deadline = Date.now() + 15 * 60_000;
  let views: Array<{
    id: string;
    state: string;
    devices: Array<{ tasks: Array<{ id: string; state: string; reason?: string }> }>;
  }> = [];
  for (;;) {
    const states = await call(async (rpc) => {
      const out = new Map<string, string>();
      for await (const j of rpc.pages("jobs.ls", {})) out.set(j.id, j.state);
      return out;
    });
    const open = jobs.filter((j) => !terminal.has(states.get(j.id) ?? ""));
    if (!open.length) break;
    if (Date.now() > deadline) throw new Error(`not terminal: ${open.length} jobs`);
    await sleep(1000);
  }
  views = await call(async (rpc) => {
    const out = [];
    for (const j of jobs) out.push(await rpc.call("jobs.show", { id: j.id }));
    return out;
  });
  const outcomes: Record<string, number> = {};
  const markers = new Map<string, Map<string, number>>();
  for (const id of DEVICES) {
    const log = join(roots.get(id)!, "runs.log");
    const m = new Map<string, number>();
    for (const l of existsSync(log) ? readFileSync(log, "utf8").split("\n").filter(Boolean) : [])
      m.set(l, (m.get(l) ?? 0) + 1);
    markers.set(id, m);
  }
  const twice = [...markers.values()].flatMap((m) => [...m].filter(([, n]) => n > 1).map(([k]) => k));
  expect(twice).toEqual([]);
  let lost = 0;
  jobs.forEach((j, i) => {
    for (const t of views[i]!.devices[0]!.tasks) {
      const key = `${t.state}${t.reason ? `(${t.reason})` : ""}`;
      outcomes[key] = (outcomes[key] ?? 0) + 1;
      if (t.state === "SUCCEEDED" && !markers.get(j.device)!.has(`${j.name}/${t.id}`)) lost++;
    }
  });
  console.log(`chaos: task outcomes ${JSON.stringify(outcomes)}; run twice: ${twice.length}; lost: ${lost}`);
  expect(lost).toBe(0);
  expect(Object.values(outcomes).reduce((a, b) => a + b, 0)).toBe(TASKS);
  expect(Object.keys(outcomes).every((k) => k === "SUCCEEDED" || k.startsWith("FAILED(interrupted"))).toBe(
    true,
  );
}, 3_600_000);
