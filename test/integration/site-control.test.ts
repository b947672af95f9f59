// Local control at a site gateway (agent/site-control.ts, DESIGN.md §11) on real LevelDB: the
// controller's checks hold there too — an unknown key gets no answer, a replayed request is
// refused (also after a restart), a job for a device of another site or one sent while the
// center is reachable is refused — and the statuses passing through make the job's view; the
// jobs go to the center at the next sync and are forgotten as pending once it has them.
import { createPublicKey, randomBytes } from "node:crypto";
import { ClassicLevel } from "classic-level";
import { afterEach, describe, expect, it } from "vitest";
import { SiteControl } from "../../agent/site-control.js";
import type { Db } from "../../agent/store.js";
import { Counters } from "../../common/counters.js";
import { decodeEnvelope, encodeEnvelope } from "../../proto/envelope.js";
import { pb, TaskState } from "../../proto/index.js";
import { signRpcCall } from "../../proto/rpc.js";
import { generateSigningKey } from "../../proto/signing.js";
import { quietLog } from "../helpers/harness.js";
import { jobSpec, operator, sign, tempDir } from "../helpers/keys.js";

const dirs: Array<{ cleanup(): void }> = [];
const dbs: Db[] = [];
afterEach(async () => {
  for (const db of dbs.splice(0)) await db.close();
  for (const d of dirs.splice(0)) d.cleanup();
});

async function gateway(dir: string, opts: { reachable?: boolean } = {}) {
  const db = new ClassicLevel<string, unknown>(dir, { valueEncoding: "json" }) as unknown as Db;
  await db.open();
  dbs.push(db);
  const published: Array<{ topic: string; env: ReturnType<typeof decodeEnvelope> }> = [];
  const control = new SiteControl({
    gatewayId: "gw-1",
    prefix: "fleet/v1",
    maxPayloadBytes: 256 * 1024,
    db,
    log: quietLog,
    counters: new Counters(),
    trustedKeys: new Map([[operator.keyId, createPublicKey(operator.publicKeyPem)]]),
    centerReachable: () => Boolean(opts.reachable),
    devices: () => [
      { id: "dev-1", labels: { site: "hall" }, online: true, agentVersion: "1" },
      { id: "dev-2", labels: { site: "hall" }, online: true, agentVersion: "1" },
    ],
    publish: (topic, payload) => published.push({ topic, env: decodeEnvelope(Buffer.from(payload)) }),
  });
  await control.load();
  await control.setOperators([
    { username: "alice", passwordHash: "x", keyId: operator.keyId, publicKey: "" },
  ]);
  return { db, control, published };
}

function request(method: string, params: unknown, key = operator) {
  const req = signRpcCall(
    { requestId: randomBytes(4).toString("hex"), clientId: "op-alice-1", method, params },
    key.privateKeyPem,
    key.keyId,
  );
  return Buffer.from(encodeEnvelope({ rpcRequest: req }));
}

const replies = (published: Array<{ topic: string; env: ReturnType<typeof decodeEnvelope> }>) =>
  published.filter((p) => p.topic === "fleet/v1/rpc/res/alice/op-alice-1").map((p) => p.env.rpcResponse!);

const signedB64 = (deviceIds: string[]) => {
  const spec = jobSpec([{ id: "a", type: "noop" }], { target: { deviceIds, selector: "" } });
  return { spec, b64: Buffer.from(pb.SignedJob.encode(sign(spec)).finish()).toString("base64") };
};

describe("local control at a gateway", () => {
  it("runs a signed job on its devices, refuses others, replays and unknown keys", async () => {
    const d = tempDir("fleet-sc-");
    dirs.push(d);
    const { control, published } = await gateway(d.dir);
    const { spec, b64 } = signedB64(["dev-1"]);
    const submit = request("job.submit", { signedJob: b64, deviceIds: ["dev-1"] });
    await control.onRpc(submit);
    const [ok] = replies(published);
    expect(ok).toMatchObject({ ok: true });
    expect(JSON.parse(ok!.resultJson!)).toMatchObject({
      id: spec.jobId,
      origin: "site",
      counts: { total: 1 },
    });
    // Handed to the device on its job topic, as the center would.
    expect(published.some((p) => p.topic === "fleet/v1/d/dev-1/job" && p.env.jobAssignment)).toBe(true);
    // The same signed request again: refused as a replay.
    await control.onRpc(submit);
    expect(replies(published)[1]).toMatchObject({ ok: false, error: "replayed request" });
    // A device not of this site.
    const other = signedB64(["dev-9"]);
    await control.onRpc(request("job.submit", { signedJob: other.b64, deviceIds: ["dev-9"] }));
    expect(replies(published)[2]?.error).toMatch(/not a device of this gateway's site: dev-9/);
    // A key the agent does not trust: no answer at all.
    const stranger = generateSigningKey();
    const n = published.length;
    await control.onRpc(request("jobs.ls", {}, stranger));
    expect(published.length).toBe(n);
    // Statuses passing through make the view; nothing is acknowledged.
    control.observe("dev-1", {
      statuses: [
        { seq: 1, jobId: spec.jobId, taskId: "a", state: TaskState.SUCCEEDED, attempt: 1 },
        { seq: 2, jobId: spec.jobId, state: TaskState.SUCCEEDED },
      ],
    });
    await control.onRpc(request("jobs.show", { id: spec.jobId }));
    expect(JSON.parse(replies(published)[3]!.resultJson!)).toMatchObject({
      state: "SUCCEEDED",
      devices: [{ deviceId: "dev-1", state: "SUCCEEDED" }],
    });
    expect(published.some((p) => p.env.statusAck)).toBe(false);
    // Cancelled at the gateway: each device is told, and the center will be.
    const running = signedB64(["dev-1", "dev-2"]);
    await control.onRpc(request("job.submit", { signedJob: running.b64, deviceIds: ["dev-1", "dev-2"] }));
    await control.onRpc(request("jobs.cancel", { id: running.spec.jobId, reason: "wrong batch" }));
    expect(JSON.parse(replies(published)[5]!.resultJson!)).toMatchObject({ cancelled: "wrong batch" });
    expect(published.filter((p) => p.env.cancel?.jobId === running.spec.jobId).map((p) => p.topic)).toEqual([
      "fleet/v1/d/dev-1/ctl",
      "fleet/v1/d/dev-2/ctl",
    ]);
    expect(control.toRegister().find((j) => j.deviceIds?.length === 2)?.cancelled).toBe("wrong batch");
    await control.registered([running.spec.jobId!]);
    // Pending for the center until it has recorded it.
    expect(control.toRegister().map((j) => j.deviceIds)).toEqual([["dev-1"]]);
    await control.registered([spec.jobId!]);
    expect(control.toRegister()).toEqual([]);
  });

  it("a replay after a restart is still refused; nothing is taken while the center is reachable", async () => {
    const d = tempDir("fleet-sc-");
    dirs.push(d);
    const first = await gateway(d.dir);
    const { b64 } = signedB64(["dev-2"]);
    const submit = request("job.submit", { signedJob: b64, deviceIds: ["dev-2"] });
    await first.control.onRpc(submit);
    expect(replies(first.published)[0]).toMatchObject({ ok: true });
    await first.db.close();
    dbs.splice(dbs.indexOf(first.db), 1);
    const again = await gateway(d.dir, { reachable: true });
    // The job run before the restart is still pending for the center.
    expect(again.control.toRegister()).toHaveLength(1);
    await again.control.onRpc(submit);
    expect(replies(again.published)[0]).toMatchObject({ ok: false, error: "replayed request" });
    const fresh = signedB64(["dev-2"]);
    await again.control.onRpc(request("job.submit", { signedJob: fresh.b64, deviceIds: ["dev-2"] }));
    expect(replies(again.published)[1]?.error).toMatch(/the center is reachable: run jobs there/);
  });
});
