import { execFileSync } from "node:child_process";
import { createPublicKey } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import {
  decodeEnvelope,
  delimitedSize,
  encodeEnvelope,
  encodeStatusBatch,
  PayloadError,
  PROTOCOL_VERSION,
} from "../../proto/envelope.js";
import { pb, TaskState } from "../../proto/index.js";
import {
  generateSigningKey,
  signJob,
  specDigest,
  VerifiedSignatures,
  verifySignedJob,
} from "../../proto/signing.js";
import { tempDir } from "../helpers/keys.js";

const status = {
  seq: 7,
  jobId: "01J",
  taskId: "t",
  executionId: "2026-01-01T00:00:00.000Z",
  state: TaskState.FAILED,
  attempt: 2,
  progress: 50,
  message: "m",
  reason: "r",
  output: "o",
  atMs: 1,
  startedAtMs: 2,
  finishedAtMs: 3,
  taskType: "shell",
};
const job = { spec: new Uint8Array([1, 2, 3]), signature: new Uint8Array([4]), keyId: "k" };

/** One sample per Envelope body: every message DESIGN.md §3-5 names is reachable from here. */
const bodies: Record<string, object> = {
  jobAssignment: { job, deviceId: "d", rolloutId: "r" },
  cancel: { jobId: "j", reason: "x" },
  statusAck: { upToSeq: 9 },
  syncResponse: { assignments: [{ job, deviceId: "d" }], cancels: [{ jobId: "j" }], nowMs: 5 },
  timeHint: { nowMs: 1_800_000_000_000 },
  statusBatch: { statuses: [status] },
  deviceState: {
    online: true,
    agentVersion: "1",
    labels: { a: "b" },
    queueDepth: 1,
    running: 1,
    startedAtMs: 4,
    factsJson: "{}",
    counters: { x: 3 },
  },
  telemetry: {
    cpuLoad: 0.5,
    memTotal: 10,
    memUsed: 5,
    diskTotal: 9,
    diskFree: 1,
    temperatureC: 40,
    uptimeS: 3,
    netRxBytes: 1,
    netTxBytes: 2,
    atMs: 8,
  },
  syncRequest: { lastAckedSeq: 3, knownJobsDigest: new Uint8Array([9]), knownJobCount: 1, agentVersion: "1" },
  rpcRequest: { call: new Uint8Array([1]), signature: new Uint8Array([2]), keyId: "k" },
  rpcResponse: { requestId: "r", ok: true, resultJson: "{}", error: "", errorCode: 0 },
  fleetEvent: {
    kind: "task.status",
    deviceId: "d",
    jobId: "j",
    rolloutId: "r",
    status,
    detailJson: "{}",
    atMs: 1,
  },
};

describe("wire schema", () => {
  it.each(Object.entries(bodies))("round-trips %s in an Envelope", (name, body) => {
    const bytes = encodeEnvelope({ [name]: body } as never, 42);
    const env = decodeEnvelope(bytes);
    expect(env.body).toBe(name);
    expect(env.protocolVersion).toBe(PROTOCOL_VERSION);
    expect(env.sentAtMs).toBe(42);
    const back = pb.Envelope.toObject(env, { defaults: false, bytes: Array })[name];
    const expected = pb.Envelope.toObject(pb.Envelope.fromObject({ [name]: body }), {
      defaults: false,
      bytes: Array,
    })[name];
    expect(back).toEqual(expected);
  });

  it("round-trips a full JobSpec with tasks, requirements, window and schedule", () => {
    const spec = {
      jobId: "01HZ",
      name: "n",
      issuedAtMs: 1,
      expiresAtMs: 2,
      notBeforeMs: 3,
      allowDowngrade: true,
      target: { deviceIds: ["a"], selector: "env=prod" },
      tasks: [
        {
          id: "t",
          type: "shell",
          paramsJson: "{}",
          dependsOn: ["job:x"],
          trigger: 2,
          priority: -3,
          timeoutS: 4,
          retry: { maxAttempts: 3, backoffS: 1.5, factor: 2 },
          requires: [{ fact: "disk.free", op: ">=", value: "1MB", onUnmet: 1 }],
        },
      ],
      window: { cron: "0 2 * * *", durationS: 7200, timezone: "Europe/Berlin" },
      schedule: { cron: "*/5 * * * *", timezone: "UTC" },
    };
    const back = pb.JobSpec.toObject(pb.JobSpec.decode(pb.JobSpec.encode(spec).finish()));
    expect(back).toEqual(spec);
    const signed = pb.SignedJob.decode(pb.SignedJob.encode(job).finish());
    expect(Buffer.from(signed.signature).toString("hex")).toBe("04");
    const call = { requestId: "r", clientId: "c", method: "m", paramsJson: "{}", issuedAtMs: 1, nonce: "n" };
    expect(pb.RpcCall.toObject(pb.RpcCall.decode(pb.RpcCall.encode(call).finish()))).toEqual(call);
  });

  it("rejects oversized, undecodable, wrong-version and empty payloads with a reason", () => {
    const reasons = (p: Uint8Array, max?: number) => {
      try {
        decodeEnvelope(p, max);
        return "ok";
      } catch (err) {
        expect(err).toBeInstanceOf(PayloadError);
        return (err as PayloadError).reason;
      }
    };
    expect(reasons(new Uint8Array(300 * 1024))).toBe("oversized");
    expect(reasons(Buffer.from("\xff\xff\xff\xff\xff garbage"))).toBe("undecodable");
    expect(reasons(pb.Envelope.encode({ protocolVersion: 99, timeHint: { nowMs: 1 } }).finish())).toBe(
      "wrong_version",
    );
    expect(reasons(pb.Envelope.encode({ protocolVersion: 1 }).finish())).toBe("empty_body");
    expect(reasons(encodeEnvelope({ timeHint: { nowMs: 1 } }).subarray(0, 5))).toBe("undecodable");
  });

  it("a StatusBatch from statuses already encoded is the envelope protobufjs makes", () => {
    const statuses = [status, { ...status, seq: 8, message: "x".repeat(300), output: "" }];
    const encoded = statuses.map((s) => pb.TaskStatus.encode(s).finish());
    for (const [epoch, ackedSeq] of [
      ["e1", 6],
      ["", 0],
      ["e2", 2 ** 40],
    ] as const) {
      const bytes = encodeStatusBatch(encoded, epoch, ackedSeq, 1234);
      const env = decodeEnvelope(bytes);
      expect(env.body).toBe("statusBatch");
      expect(env.sentAtMs).toBe(1234);
      expect(env.statusBatch!.epoch).toBe(epoch);
      expect(Number(env.statusBatch!.ackedSeq)).toBe(ackedSeq);
      expect(env.statusBatch!.statuses!.map((s) => pb.TaskStatus.toObject(s as never))).toEqual(
        encoded.map((e) => pb.TaskStatus.toObject(pb.TaskStatus.decode(e))),
      );
      // Byte for byte what the generic encoder makes of the same message.
      const generic = encodeEnvelope({ statusBatch: { statuses, epoch, ackedSeq } }, 1234);
      expect(Buffer.from(bytes).subarray(env.msgId!.length + 4)).toEqual(
        Buffer.from(generic).subarray(env.msgId!.length + 4),
      );
    }
    for (const e of encoded)
      expect(delimitedSize(e.length)).toBe(
        pb.TaskStatus.encodeDelimited(pb.TaskStatus.decode(e)).finish().length,
      );
  });

  it("generated code is up to date with fleet.proto", () => {
    const { dir, cleanup } = tempDir();
    try {
      execFileSync(process.execPath, ["scripts/gen-proto.mjs", "--out", dir]);
      for (const f of ["fleet.js", "fleet.d.ts"]) {
        const fresh = readFileSync(join(dir, f), "utf8");
        const built = readFileSync(join("proto", "gen", f), "utf8");
        expect(built === fresh, `proto/gen/${f} is stale: run npm run build`).toBe(true);
      }
    } finally {
      cleanup();
    }
  });
});

describe("VerifiedSignatures (the simulator's devices verify a job once)", () => {
  it("knows a signature only for the identical bytes, wherever they lie, and keeps its own copy", () => {
    const k = generateSigningKey();
    const keys = new Map([[k.keyId, createPublicKey(k.publicKeyPem)]]);
    const signed = signJob({ jobId: "01JQ", name: "n", issuedAtMs: 1 }, k.privateKeyPem, k.keyId);
    const verified = new VerifiedSignatures();
    // The spec as a view into a larger packet buffer, as protobufjs decodes it.
    const packet = Buffer.concat([Buffer.from("head"), Buffer.from(signed.spec!), Buffer.from("tail")]);
    const view = new Uint8Array(packet.buffer, packet.byteOffset + 4, signed.spec!.length);
    const digest = specDigest(signed);
    expect(verifySignedJob({ ...signed, spec: view }, keys, verified)).toMatchObject({ ok: true, digest });
    expect(verified.digestOf(k.keyId, signed.signature!, signed.spec!)).toBe(digest);
    packet.fill(0); // the packet's buffer is reused: the remembered bytes are not
    expect(verified.digestOf(k.keyId, signed.signature!, signed.spec!)).toBe(digest);
    expect(verifySignedJob(signed, keys, verified)).toMatchObject({ ok: true, digest }); // from memory
    const other = Uint8Array.from(signed.spec!);
    other[0] = other[0]! ^ 1;
    expect(verified.digestOf(k.keyId, signed.signature!, other)).toBeUndefined();
    expect(verifySignedJob({ ...signed, spec: other }, keys, verified).ok).toBe(false);
    expect(verified.digestOf("other-key", signed.signature!, signed.spec!)).toBeUndefined();
  });
});
