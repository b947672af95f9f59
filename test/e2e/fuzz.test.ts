// Fuzz campaign (issue 16): mutated and random payloads against a real server's device and
// operator topics and its HTTP routes, and against a real agent's job and ctl topics. Nothing
// may crash or wedge: afterwards the server and the agent still do real work, and what they
// dropped they counted. FLEET_FUZZ_N inputs in all (default 2,000 here; `npm run fuzz` runs
// 100,000), FLEET_FUZZ_SEED to reproduce a run.
import { readFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import mqtt, { type MqttClient } from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Counters } from "../../common/counters.js";
import { encodeEnvelope } from "../../proto/envelope.js";
import { pb, TaskState } from "../../proto/index.js";
import { signRpcCall } from "../../proto/rpc.js";
import { generateSigningKey } from "../../proto/signing.js";
import { mutate, type Rng, rng, savedCorpus } from "../fuzz/mutate.js";
import { cli, cliJson, type ServerProcess, startFleet, stopAll } from "../helpers/fleet.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec, sign, tempDir } from "../helpers/keys.js";

const N = Number(process.env.FLEET_FUZZ_N ?? 2000);
const SEED = Number(process.env.FLEET_FUZZ_SEED ?? Date.now() % 2 ** 31);
const data = tempDir("fleet-fuzz-");
let server: ServerProcess;
let env: Record<string, string>;
let ctx: { username: string; password: string; keyId: string; signingKey: string };
let devicePassword = "";

/** Valid messages of every kind: what the mutations start from. */
function seeds(): Uint8Array[] {
  const spec = jobSpec([
    { id: "a", type: "noop" },
    { id: "b", type: "shell", params: { command: "/bin/true", args: ["x"] }, dependsOn: ["a"] },
  ]);
  const job = sign(spec);
  const status = {
    seq: 1,
    jobId: spec.jobId,
    taskId: "a",
    state: TaskState.RUNNING,
    message: "m",
    output: "o",
  };
  const key = generateSigningKey();
  return [
    encodeEnvelope({ jobAssignment: { job, deviceId: "fz-dev" } }),
    encodeEnvelope({ cancel: { jobId: spec.jobId, reason: "r" } }),
    encodeEnvelope({ statusAck: { upToSeq: 3, epoch: "e" } }),
    encodeEnvelope({
      syncResponse: { assignments: [{ job, deviceId: "fz-dev" }], cancels: [], nowMs: Date.now() },
    }),
    encodeEnvelope({ timeHint: { nowMs: Date.now() } }),
    encodeEnvelope({ statusBatch: { statuses: [status, { ...status, seq: 2, taskId: "" }], epoch: "e" } }),
    encodeEnvelope({
      deviceState: { online: true, agentVersion: "1", queueDepth: 2, factsJson: '{"a":{"b":1}}' },
    }),
    encodeEnvelope({ telemetry: { cpuLoad: 0.5, memTotal: 100, memUsed: 50, diskFree: 10, atMs: 1 } }),
    encodeEnvelope({ syncRequest: { lastAckedSeq: 1, knownJobCount: 1, agentVersion: "1" } }),
    encodeEnvelope({
      rpcRequest: signRpcCall(
        { requestId: "r", clientId: "op-admin-1", method: "device.ls", params: { limit: 2 } },
        key.privateKeyPem,
        key.keyId,
      ),
    }),
    pb.SignedJob.encode(job).finish(),
    ...savedCorpus(),
  ];
}

async function metrics(): Promise<Record<string, number>> {
  const text = await (await fetch(`${server.urls.http}/metrics`)).text();
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^fleet_events_total\{name="([^"]+)"\} (\d+)/gm)) out[m[1]!] = Number(m[2]);
  return out;
}

beforeAll(async () => {
  console.log(`fuzz: ${N} inputs, FLEET_FUZZ_SEED=${SEED}`);
  ({ server, env } = await startFleet(data.dir));
  devicePassword = cliJson<{ password: string }>(
    await cli(["device", "add", "fz-dev", "--json"], env),
  ).password;
  ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
}, 60_000);

afterAll(() => stopAll(server, data.cleanup));

const pick = <T>(r: Rng, xs: readonly T[]): T => xs[Math.floor(r() * xs.length)]!;

/** Random JSON-ish values for signed RPC params: the controller must answer, not crash. */
function randomValue(r: Rng, depth = 0): unknown {
  switch (Math.floor(r() * (depth > 3 ? 5 : 7))) {
    case 0:
      return null;
    case 1:
      return r() < 0.5;
    case 2:
      return pick(r, [0, -1, 1e308, 5000, 2 ** 53, Number.NaN, 0.5]);
    case 3:
      return pick(r, ["", "x", "#", "../..", "%", "a".repeat(300), "env=prod,!beta", "in (", "\u0000"]);
    case 4:
      return pick(r, ["sim-0001", "fz-dev", "01JOBAAAAAAAAAAAAAAAAAAAAA"]);
    case 5:
      return Array.from({ length: Math.floor(r() * 4) }, () => randomValue(r, depth + 1));
    default:
      return Object.fromEntries(
        Array.from({ length: Math.floor(r() * 4) }, () => [
          pick(r, [
            "id",
            "limit",
            "cursor",
            "selector",
            "devices",
            "signedJob",
            "labels",
            "reason",
            "force",
            "any",
          ]),
          randomValue(r, depth + 1),
        ]),
      );
  }
}

const unanswered: string[] = [];

function httpFuzz(r: Rng): Promise<number> {
  const { hostname, port } = new URL(server.urls.http);
  const seg = () =>
    pick(r, [
      "v1",
      "artifacts",
      "blobs",
      "uploads",
      "manifest",
      "%",
      "%zz",
      "..",
      "",
      "a".repeat(200),
      "app",
      "1.0",
    ]);
  const path = `/${Array.from({ length: Math.floor(r() * 6) }, seg).join("/")}${r() < 0.2 ? "?limit=0&cursor=%" : ""}`;
  const headers: Record<string, string> = {};
  if (r() < 0.5)
    headers.authorization = `Basic ${Buffer.from(pick(r, ["admin:x", "fz-dev:y", ":", "a"])).toString("base64")}`;
  if (r() < 0.2) headers.range = pick(r, ["bytes=0-", "bytes=-5", "bytes=9999999999-", "lines=1"]);
  if (r() < 0.2) headers["x-fleet-manifest"] = Buffer.from(mutate(r, seeds())).toString("base64");
  return new Promise((resolve) => {
    const req = request(
      // A connection per request (agent: false): Node 20's keep-alive agent can reuse a socket the
      // server is closing as idle (keepAliveTimeout), a client-side race that reads as a hang-up.
      {
        host: hostname,
        port,
        path,
        method: pick(r, ["GET", "PUT", "DELETE", "POST", "HEAD"]),
        headers,
        agent: false,
      },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode ?? 0));
      },
    );
    req.on("error", (err) => {
      unanswered.push(`${req.method} ${path} ${JSON.stringify(headers)}: ${err.message}`);
      resolve(-1);
    });
    req.setTimeout(30_000, () => req.destroy(new Error("no answer within 30 s")));
    if (r() < 0.3) req.write(mutate(r, seeds()));
    req.end();
  });
}

describe("fuzz", () => {
  it(`server: ${N} mutated device, operator and HTTP inputs; it keeps serving and counts what it drops`, async () => {
    const r = rng(SEED);
    const corpus = seeds();
    const device: MqttClient = await mqtt.connectAsync(server.urls.mqtt, {
      clientId: "fz-dev",
      username: "fz-dev",
      password: devicePassword,
      reconnectPeriod: 500,
    });
    const operator: MqttClient = await mqtt.connectAsync(server.urls.mqtt, {
      clientId: `op-${ctx.username}-fuzz`,
      username: ctx.username,
      password: ctx.password,
      reconnectPeriod: 500,
    });
    const signingKey = readFileSync(ctx.signingKey, "utf8");
    const statuses: Record<number, number> = {};
    const total = Math.floor(N * 0.8);
    for (let i = 0; i < total; i += 50) {
      const batch: Array<Promise<unknown>> = [];
      for (let k = i; k < Math.min(total, i + 50); k++) {
        const kind = r();
        if (kind < 0.5) {
          const channel = pick(r, ["status", "state", "telemetry", "sync"]);
          batch.push(device.publishAsync(`fleet/v1/d/fz-dev/${channel}`, mutate(r, corpus), { qos: 1 }));
        } else if (kind < 0.6) {
          batch.push(operator.publishAsync("fleet/v1/rpc/req", mutate(r, corpus), { qos: 1 }));
        } else if (kind < 0.75) {
          // Validly signed, with a method and params from anywhere.
          const req = signRpcCall(
            {
              requestId: `f${k}`,
              clientId: `op-${ctx.username}-fuzz`,
              method: pick(r, [
                "device.ls",
                "device.show",
                "jobs.show",
                "jobs.ls",
                "rollout.ls",
                "rollout.abort",
                "device.add",
                "x",
              ]),
              params: randomValue(r),
            },
            signingKey,
            ctx.keyId,
          );
          batch.push(
            operator.publishAsync("fleet/v1/rpc/req", Buffer.from(encodeEnvelope({ rpcRequest: req })), {
              qos: 1,
            }),
          );
        } else {
          batch.push(
            httpFuzz(r).then((s) => {
              statuses[s] = (statuses[s] ?? 0) + 1;
            }),
          );
        }
      }
      await Promise.all(batch);
    }
    await device.endAsync();
    await operator.endAsync();
    console.log(`HTTP answers by status: ${JSON.stringify(statuses)}`);
    if (unanswered.length) console.log(`unanswered:\n${unanswered.join("\n")}`);
    expect(server.proc.exitCode).toBeNull();
    expect(statuses[-1] ?? 0).toBe(0); // every request was answered
    expect(statuses[500] ?? 0).toBe(0);
    const health = await fetch(`${server.urls.http}/healthz`);
    expect(health.status).toBe(200);
    const m = await metrics();
    const dropped = Object.entries(m).filter(([k]) => k.startsWith("dropped_"));
    console.log(`server counters: ${JSON.stringify(m)}`);
    expect(dropped.reduce((a, [, v]) => a + v, 0)).toBeGreaterThan(0);
    // Still doing real work.
    const ls = await cli(["device", "ls", "--json"], env);
    expect(ls.code, ls.stderr).toBe(0);
    expect(cliJson<Array<{ id: string }>>(ls).map((d) => d.id)).toContain("fz-dev");
  }, 1_800_000);

  it(`agent: ${Math.ceil(N * 0.2)} mutated job and ctl messages; it keeps running jobs`, async () => {
    const h: Harness = await harness();
    try {
      const agent = await h.newAgent("fz-agent", { allowShell: ["/bin/true"] });
      const r = rng(SEED + 1);
      const corpus = seeds();
      const total = Math.ceil(N * 0.2);
      for (let i = 0; i < total; i += 50) {
        await Promise.all(
          Array.from({ length: Math.min(50, total - i) }, () =>
            h.ctl.publishRaw("fz-agent", r() < 0.5 ? "job" : "ctl", mutate(r, corpus)),
          ),
        );
      }
      await h.ctl.ctl("fz-agent", { timeHint: { nowMs: Date.now() } }); // undo any fuzzed hint
      const jobId = await h.ctl.assign("fz-agent", jobSpec([{ id: "a", type: "noop" }]));
      expect((await h.ctl.waitJob("fz-agent", jobId, TaskState.SUCCEEDED, 30_000)).state).toBe(
        TaskState.SUCCEEDED,
      );
      expect(agent.connected).toBe(true);
      const c = (agent.counters as Counters).toObject();
      console.log(`agent counters: ${JSON.stringify(c)}`);
      expect(Object.entries(c).filter(([k]) => k.startsWith("dropped_")).length).toBeGreaterThan(0);
    } finally {
      await h.close();
    }
  }, 1_800_000);
});
