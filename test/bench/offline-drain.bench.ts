// B5 offline drain: an agent completes JOBS noop jobs while the server is down (each leaves
// RUNNING, SUCCEEDED and the job's SUCCEEDED in its outbox: >= 3 records a job), then
// reconnects: time from its reconnect until the controller has applied every record (seen as
// the controller's task.status events), vs publishing as many QoS 1 messages raw through a
// bare aedes to one subscriber, in the same run.
import mqtt from "mqtt";
import { it } from "vitest";
import { loadContext } from "../../cli/context.js";
import { buildSpec, parseJob } from "../../cli/jobfile.js";
import { withRpc } from "../../cli/rpc.js";
import { decodeEnvelope } from "../../proto/envelope.js";
import { pb, TaskState } from "../../proto/index.js";
import { signJob } from "../../proto/signing.js";
import { startBroker } from "../helpers/broker.js";
import {
  cli,
  flashMoved,
  setContextServer,
  startAgent,
  startServer,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const JOBS = Number(process.env.BENCH_OFFLINE_JOBS ?? 1000);
const ID = "drain-1";

async function rawPublish(n: number): Promise<number> {
  const broker = await startBroker();
  try {
    const sub = await mqtt.connectAsync(broker.url, { clientId: "raw-sub" });
    await sub.subscribeAsync("raw/status", { qos: 1 });
    let got = 0;
    const all = new Promise<void>((r) => sub.on("message", () => ++got === n && r()));
    const pub = await mqtt.connectAsync(broker.url, { clientId: "raw-pub" });
    const body = Buffer.alloc(120);
    const t = performance.now();
    await Promise.all(Array.from({ length: n }, () => pub.publishAsync("raw/status", body, { qos: 1 })));
    await all;
    const ms = performance.now() - t;
    await pub.endAsync();
    await sub.endAsync();
    return ms;
  } finally {
    await broker.close();
  }
}

it(`B5: ${JOBS} jobs completed offline, then drained`, async () => {
  const data = tempDir("fleet-b5-");
  await cli(["init", "--dir", data.dir]);
  let server = await startServer(data.dir);
  const ports = server.ports;
  const env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
  const { root, cleanup } = await flashMoved(ID, env);
  const agent = startAgent(root);
  try {
    await waitOnline(env, ID);
    const ctx = loadContext({ context: env.FLEET_CONTEXT });
    // Every job waits (not before) until the server is gone, so all of them run offline.
    const notBefore = new Date(Date.now() + 15_000 + JOBS * 10).toISOString();
    const ids = await withRpc(ctx, async (rpc) => {
      const out: string[] = [];
      for (let i = 0; i < JOBS; i += 50) {
        const chunk = Array.from({ length: Math.min(50, JOBS - i) }, () => {
          const spec = buildSpec(
            parseJob({ name: "offline", notBefore, tasks: [{ id: "a", type: "noop" }] }),
            {
              deviceIds: [ID],
              selector: "",
            },
          );
          const signed = Buffer.from(
            pb.SignedJob.encode(signJob(spec, ctx.signingKeyPem, ctx.keyId)).finish(),
          );
          return rpc.call("job.submit", {
            signedJob: signed.toString("base64"),
            deviceIds: [ID],
            selector: "",
          });
        });
        for (const r of await Promise.all(chunk)) out.push(r.id);
      }
      return out;
    });
    // All accepted by the agent (its QUEUED statuses applied), then the server goes away.
    await waitUntil(
      "every job acknowledged",
      async () => {
        // Every job of the device, paged (device show lists only the newest 100).
        const r = await cli(["jobs", "ls", "--device", ID, "--json"], env);
        const jobs = JSON.parse(r.stdout) as Array<{ state: string }>;
        return jobs.filter((j) => j.state !== "PENDING").length >= ids.length;
      },
      120_000,
    );
    server.proc.kill("SIGKILL");
    await server.exited;
    await waitUntil(
      "every job done offline",
      () => (agent.stderr().match(/"msg":"task succeeded"/g)?.length ?? 0) >= JOBS,
      600_000,
    );
    const connectedBefore = agent.stderr().match(/"msg":"connected"/g)?.length ?? 0;
    server = await startServer(data.dir, ports);
    // The controller's events say what it applied.
    const watcher = await mqtt.connectAsync(server.urls.mqtt, {
      clientId: `op-${ctx.username}-b5`,
      username: ctx.username,
      password: ctx.password,
    });
    let applied = 0;
    let jobsDone = 0;
    let lastAt = 0;
    watcher.on("message", (_t, payload) => {
      const ev = decodeEnvelope(payload).fleetEvent;
      if (ev?.kind !== "task.status" || ev.deviceId !== ID) return;
      applied++;
      if (!ev.status?.taskId && ev.status?.state === TaskState.SUCCEEDED) jobsDone++;
      lastAt = Date.now();
    });
    await watcher.subscribeAsync(`${ctx.prefix}/events`, { qos: 0 });
    // When the agent reconnected, by its own log line's time.
    const reconnected = await waitUntil(
      "the agent reconnects",
      () => {
        const lines = agent
          .stderr()
          .split("\n")
          .filter((l) => l.includes('"msg":"connected"'));
        return lines.length > connectedBefore && (JSON.parse(lines.at(-1)!) as { time: number }).time;
      },
      120_000,
    );
    await waitUntil("every record applied", () => jobsDone >= JOBS, 300_000);
    await new Promise((r) => setTimeout(r, 500)); // stragglers
    const drainMs = lastAt - reconnected;
    await watcher.endAsync();
    const rawMs = await rawPublish(applied);
    report("B5-offline-drain", [
      {
        name: `${JOBS} jobs done offline: ${applied} status records applied after the reconnect`,
        value: drainMs,
        unit: "ms",
        baseline: rawMs,
        ratio: drainMs / rawMs,
        goal: "(reported) vs raw QoS 1 publish of as many messages",
      },
    ]);
  } finally {
    agent.proc.kill("SIGTERM");
    server.proc.kill("SIGTERM");
    await server.exited;
    cleanup();
    data.cleanup();
  }
});
