// C2 (issue 16): nothing the controller publishes may exceed the payload limit, whatever the
// devices and operators send. Real LevelDB, the real Delivery; publishes are captured.
import { generateKeyPairSync } from "node:crypto";
import pino from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Delivery } from "../../broker/controller/delivery.js";
import { JobStore, type NewJob } from "../../broker/controller/job-store.js";
import { boundedFacts, Registry } from "../../broker/controller/registry.js";
import { asgKey, ControllerStore, type JobRecord } from "../../broker/controller/store.js";
import { Counters } from "../../common/counters.js";
import { decodeEnvelope, encodeEnvelope } from "../../proto/envelope.js";
import { LOST_WRITE, pb, TaskState } from "../../proto/index.js";
import { signRpcCall, verifyRpcRequest } from "../../proto/rpc.js";
import { specDigest } from "../../proto/signing.js";
import { tempDir } from "../helpers/keys.js";

const LIMIT = 256 * 1024;
const tmp = tempDir("fleet-limits-int-");
const store = new ControllerStore(tmp.dir);
const registry = new Registry(store);
const sent: Array<{ topic: string; payload: Uint8Array }> = [];
const counters = new Counters();
const jobs = new JobStore(store);
/** onFinished's calls: job id and whether it was the job's last device. */
const finished: Array<[string, boolean]> = [];
const delivery = new Delivery({
  store,
  jobs,
  registry,
  prefix: "fleet/v1",
  log: pino({ level: "silent" }),
  counters,
  publish: (topic, payload) => {
    sent.push({ topic, payload });
  },
  maxPayloadBytes: LIMIT,
  now: () => Date.now(),
  onFinished: (jobId, f) => finished.push([jobId, f.last]),
});

beforeAll(async () => {
  await store.open();
  await registry.add("dev-1", {});
});
afterAll(async () => {
  await store.close();
  tmp.cleanup();
});

/** dev-1's statuses must come in seq order (the controller applies them go-back-N). */
let seq = 0;
const nextSeq = () => ++seq;

function bigJob(id: string, bytes: number, devices = ["dev-1"]): NewJob {
  const signed = pb.SignedJob.encode({
    spec: Buffer.alloc(bytes, 7),
    signature: Buffer.alloc(64),
    keyId: "k",
  }).finish();
  const record: JobRecord = {
    id,
    name: id,
    createdAt: Date.now(),
    expiresAt: Date.now() + 3600_000,
    recurring: false,
    tasks: [{ id: "t", type: "shell" }],
    target: { deviceIds: devices, selector: "" },
    devices,
    createdBy: "admin",
  };
  return { record, signed };
}

describe("payload limits", () => {
  it("an offline device returning to two 150 KB jobs gets them in messages that each fit", async () => {
    await delivery.submit(bigJob("01JOBAAAAAAAAAAAAAAAAAAAAA", 150_000));
    await delivery.submit(bigJob("01JOBBBBBBBBBBBBBBBBBBBBBB", 150_000));
    sent.length = 0;
    await delivery.onSync("dev-1");
    expect(sent.length).toBe(2);
    for (const m of sent) expect(m.payload.length).toBeLessThanOrEqual(LIMIT);
    const bodies = sent.map((m) => decodeEnvelope(m.payload));
    const inSync = bodies[0]!.syncResponse!.assignments ?? [];
    const separate = bodies.slice(1).map((b) => b.jobAssignment);
    expect(inSync.length + separate.length).toBe(2);
    expect(sent[1]!.topic).toBe("fleet/v1/d/dev-1/job");
  });

  it("task output full of NUL and control characters (6 bytes each in JSON) still gives a page that fits", async () => {
    const { record: job, signed } = bigJob("01JOBCCCCCCCCCCCCCCCCCCCCC", 100);
    await delivery.submit({ record: job, signed });
    const a = (await store.assignments.get(asgKey("dev-1", job.id)))!;
    a.acked = true;
    a.state = TaskState.FAILED;
    a.tasks.t = {
      type: "shell",
      state: TaskState.FAILED,
      attempt: 1,
      message: "exit 1",
      reason: "",
      output: "\0\x01\x1b".repeat(22_000),
    };
    await store.batch([jobs.putAssignment(a)]);
    const v = (await delivery.view(job.id, { limit: 500, budget: LIMIT - 16 * 1024 }))!;
    const reply = encodeEnvelope({
      rpcResponse: { requestId: "r", ok: true, resultJson: JSON.stringify(v) },
    });
    expect(reply.length).toBeLessThanOrEqual(LIMIT);
    expect(v.devices[0]).toMatchObject({ deviceId: "dev-1", state: "FAILED", outputOmitted: true });
    expect(v.devices[0]!.tasks[0]!.output).toBeUndefined();
  });

  it("a signed request whose reply client id is not one topic level is refused", () => {
    const { privateKey, publicKey } = generateKeyPairSync("ed25519");
    const keys = new Map([["k", publicKey]]);
    for (const clientId of ["#", "op-admin-+", "a/b", "op-admin-\0"]) {
      const req = signRpcCall({ requestId: "r", clientId, method: "device.ls", params: {} }, privateKey, "k");
      const check = verifyRpcRequest(req, keys, Date.now(), 60_000);
      expect(check.ok).toBe(false);
    }
    const ok = signRpcCall(
      { requestId: "r", clientId: "op-admin-1a2b", method: "device.ls", params: {} },
      privateKey,
      "k",
    );
    expect(verifyRpcRequest(ok, keys, Date.now(), 60_000).ok).toBe(true);
  });

  it("a device cannot grow an assignment with tasks the job does not have (M3)", async () => {
    const { record: job, signed } = bigJob("01JOBDDDDDDDDDDDDDDDDDDDDD", 100);
    await delivery.submit({ record: job, signed });
    const statuses = Array.from({ length: 1000 }, (_, i) => ({
      seq: nextSeq(),
      jobId: job.id,
      taskId: `made-up-${i}`,
      state: TaskState.RUNNING,
      message: "x".repeat(1000),
    }));
    await delivery.onStatusBatch("dev-1", [
      ...statuses,
      { seq: nextSeq(), jobId: job.id, taskId: "t", state: TaskState.RUNNING },
    ]);
    const a = (await store.assignments.get(asgKey("dev-1", job.id)))!;
    expect(Object.keys(a.tasks)).toEqual(["t"]);
    expect(counters.get("statuses_unknown_task")).toBe(1000);
  });

  it("device facts are kept only when small and shallow (M2)", () => {
    expect(boundedFacts(JSON.stringify({ os: { arch: "arm64" }, disk: { free: 1 } }))).toEqual({
      os: { arch: "arm64" },
      disk: { free: 1 },
    });
    let deep: unknown = 1;
    for (let i = 0; i < 100; i++) deep = { d: deep };
    expect(boundedFacts(JSON.stringify(deep))).toBeUndefined();
    expect(boundedFacts(JSON.stringify({ big: "x".repeat(40_000) }))).toBeUndefined();
    expect(boundedFacts("[1,2]")).toBeUndefined();
    expect(boundedFacts("not json")).toBeUndefined();
  });

  it("a rejection applies only to the job whose bytes were rejected, not to an id an unverified job claims", async () => {
    const { record: job, signed } = bigJob("01JOBEEEEEEEEEEEEEEEEEEEEE", 100);
    await delivery.submit({ record: job, signed });
    const mine = specDigest(pb.SignedJob.decode(signed));
    const reject = (digest: string) =>
      delivery.onStatusBatch("dev-1", [
        {
          seq: nextSeq(),
          jobId: job.id,
          taskId: "",
          state: TaskState.REJECTED,
          reason: "bad_signature",
          specDigest: digest,
        },
      ]);
    await reject("0".repeat(64)); // a forged job claiming this id
    expect((await store.assignments.get(asgKey("dev-1", job.id)))!.state).not.toBe(TaskState.REJECTED);
    expect(counters.get("rejections_of_other_bytes")).toBe(1);
    await reject(mine);
    expect((await store.assignments.get(asgKey("dev-1", job.id)))!.state).toBe(TaskState.REJECTED);
  });

  it("a withdrawn job that reaches the device anyway (a copy the broker kept) is cancelled at once (M14)", async () => {
    const { record: job, signed } = bigJob("01JOBFFFFFFFFFFFFFFFFFFFFF", 100);
    await delivery.submit({ record: job, signed });
    const a = (await store.assignments.get(asgKey("dev-1", job.id)))!;
    await delivery.close(job, [a], TaskState.CANCELED, "aborted", "rollout aborted");
    sent.length = 0;
    await delivery.onStatusBatch("dev-1", [
      { seq: nextSeq(), jobId: job.id, taskId: "", state: TaskState.QUEUED },
    ]);
    const cancels = sent.map((m) => decodeEnvelope(m.payload).cancel).filter(Boolean);
    expect(cancels).toEqual([expect.objectContaining({ jobId: job.id, reason: "rollout aborted" })]);
    expect(counters.get("late_deliveries_canceled")).toBe(1);
  });

  it("applies statuses only in seq order: at a gap the rest waits, and the ack stays before it", async () => {
    const { record: job, signed } = bigJob("01JOBGGGGGGGGGGGGGGGGGGGGG", 100);
    await delivery.submit({ record: job, signed });
    const s1 = nextSeq();
    const s2 = nextSeq();
    const s3 = nextSeq();
    sent.length = 0;
    // s1 was lost with a connection; s2 and s3 arrive: nothing applied, ack stays at s1 - 1.
    await delivery.onStatusBatch("dev-1", [
      { seq: s2, jobId: job.id, taskId: "t", state: TaskState.RUNNING },
      { seq: s3, jobId: job.id, taskId: "t", state: TaskState.SUCCEEDED },
    ]);
    const ack = () =>
      sent
        .map((m) => decodeEnvelope(m.payload).statusAck)
        .filter(Boolean)
        .at(-1)!;
    expect(Number(ack().upToSeq)).toBe(s1 - 1);
    expect((await store.assignments.get(asgKey("dev-1", job.id)))!.tasks.t).toBeUndefined();
    expect(counters.get("statuses_out_of_order")).toBeGreaterThanOrEqual(1);
    // The agent goes back and sends all three: applied in order.
    await delivery.onStatusBatch("dev-1", [
      { seq: s1, jobId: job.id, taskId: "", state: TaskState.QUEUED },
      { seq: s2, jobId: job.id, taskId: "t", state: TaskState.RUNNING },
      { seq: s3, jobId: job.id, taskId: "t", state: TaskState.SUCCEEDED },
    ]);
    expect(Number(ack().upToSeq)).toBe(s3);
    expect((await store.assignments.get(asgKey("dev-1", job.id)))!.tasks.t?.state).toBe(TaskState.SUCCEEDED);
  });

  it("a lost-write record fills its seq: counted, not applied to the job, and the statuses after it are", async () => {
    const { record: job, signed } = bigJob("01JOBKKKKKKKKKKKKKKKKKKKKK", 100);
    await delivery.submit({ record: job, signed });
    sent.length = 0;
    const s1 = nextSeq();
    const s2 = nextSeq();
    const s3 = nextSeq();
    await delivery.onStatusBatch("dev-1", [
      { seq: s1, jobId: job.id, taskId: "t", state: TaskState.RUNNING },
      // the agent could not write this one (disk full): only its seq reaches the controller
      { seq: s2, jobId: job.id, taskId: "t", state: 0, reason: LOST_WRITE },
      { seq: s3, jobId: job.id, taskId: "", state: TaskState.QUEUED },
    ]);
    expect(counters.get("statuses_lost_write")).toBe(1);
    const a = (await store.assignments.get(asgKey("dev-1", job.id)))!;
    expect(a.tasks.t?.state).toBe(TaskState.RUNNING); // not overwritten by the filler
    const acks = sent.map((m) => decodeEnvelope(m.payload).statusAck).filter(Boolean);
    expect(Number(acks.at(-1)!.upToSeq)).toBe(s3);
  });

  it("fast-forwards to what the agent says it no longer has (its acked seq)", async () => {
    const { record: job, signed } = bigJob("01JOBHHHHHHHHHHHHHHHHHHHHH", 100);
    await delivery.submit({ record: job, signed });
    seq += 50; // statuses the agent had acknowledged by a controller whose state was lost
    await delivery.onStatusBatch(
      "dev-1",
      [{ seq: nextSeq(), jobId: job.id, taskId: "", state: TaskState.QUEUED }],
      "",
      seq - 1,
    );
    expect((await store.assignments.get(asgKey("dev-1", job.id)))!.acked).toBe(true);
    expect(counters.get("seq_fast_forward")).toBe(1);
  });
});

describe("a job's last device", () => {
  const devices = ["last-1", "last-2", "last-3"];
  const seqs = new Map<string, number>();
  const end = (deviceId: string, jobId: string, state: TaskState) => {
    const seq = (seqs.get(deviceId) ?? 0) + 1;
    seqs.set(deviceId, seq);
    return delivery.onStatusBatch(deviceId, [{ seq, jobId, state }]);
  };
  beforeAll(async () => {
    for (const d of devices) await registry.add(d, {});
  });

  it("is told to onFinished (a rollout steps then, not at its next rate-limited step)", async () => {
    const { record: job, signed } = bigJob("01JOBLASTAAAAAAAAAAAAAAAAA", 100, devices);
    await delivery.submit({ record: job, signed });
    finished.length = 0;
    await end("last-1", job.id, TaskState.SUCCEEDED);
    await end("last-2", job.id, TaskState.FAILED);
    // The same status again (a re-send after a lost ack): not applied twice, not counted twice.
    await delivery.onStatusBatch("last-2", [
      { seq: seqs.get("last-2")!, jobId: job.id, state: TaskState.FAILED },
    ]);
    await end("last-3", job.id, TaskState.SUCCEEDED);
    expect(finished).toEqual([
      [job.id, false],
      [job.id, false],
      [job.id, true],
    ]);
  });

  it("is not claimed once the controller ended assignments itself (the rollout's timer steps it)", async () => {
    const { record: job, signed } = bigJob("01JOBLASTBBBBBBBBBBBBBBBBB", 100, devices);
    await delivery.submit({ record: job, signed });
    finished.length = 0;
    const late = (await jobs.ofJob(job)).filter((a) => a.deviceId === "last-3");
    await delivery.close(job, late, TaskState.TIMED_OUT, "timeout", "no result");
    await end("last-1", job.id, TaskState.SUCCEEDED);
    await end("last-2", job.id, TaskState.SUCCEEDED);
    expect(finished).toEqual([
      [job.id, false],
      [job.id, false],
    ]);
  });
});
