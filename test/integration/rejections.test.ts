// Every rejection reason of DESIGN.md §5, and bad payloads on the agent's topics.
import { sign as edSign } from "node:crypto";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { encodeEnvelope } from "../../proto/envelope.js";
import { type JobAssignment, type JobSpec, pb, TaskState } from "../../proto/index.js";
import { generateSigningKey, signJob } from "../../proto/signing.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec, operator, sign } from "../helpers/keys.js";

let h: Harness;
const DEV = "rej-1";
beforeAll(async () => {
  h = await harness();
  await h.newAgent(DEV, {
    labels: { env: "prod", region: "eu" },
    allowTaskTypes: ["noop", "shell", "probe", "software-update"],
    allowShell: ["/bin/true"],
  });
});
afterAll(() => h.close());

const noop = [{ id: "a", type: "noop" }];
const stranger = generateSigningKey();

async function expectRejected(spec: JobSpec, reason: string, raw?: JobAssignment): Promise<string> {
  const before = h.ctl.statuses(DEV).length;
  const jobId = await h.ctl.assign(DEV, spec, raw ? { raw } : {});
  const s = await h.ctl.waitFor(`status of ${jobId}`, () =>
    h.ctl
      .statuses(DEV)
      .slice(before)
      .find((x) => x.jobId === jobId && x.taskId === ""),
  );
  expect(TaskState[s.state!]).toBe("REJECTED");
  expect(s.reason).toBe(reason);
  expect(s.message).toBeTruthy();
  return s.message!;
}

describe("rejections", () => {
  it.each<[string, () => { spec: JobSpec; raw?: JobAssignment }, RegExp?]>([
    [
      "unsigned",
      () => {
        const spec = jobSpec(noop);
        return { spec, raw: { job: { spec: pb.JobSpec.encode(spec).finish() }, deviceId: DEV } };
      },
    ],
    [
      "unknown_key",
      () => {
        const spec = jobSpec(noop);
        return { spec, raw: { job: signJob(spec, stranger.privateKeyPem, stranger.keyId), deviceId: DEV } };
      },
    ],
    [
      "bad_signature",
      () => {
        const spec = jobSpec(noop);
        return { spec, raw: { job: signJob(spec, stranger.privateKeyPem, operator.keyId), deviceId: DEV } };
      },
      /does not verify/,
    ],
    [
      "bad_signature",
      () => {
        const spec = jobSpec(noop);
        const job = sign(spec);
        const tampered = pb.JobSpec.decode(job.spec!);
        tampered.tasks[0]!.type = "shell";
        return { spec, raw: { job: { ...job, spec: pb.JobSpec.encode(tampered).finish() }, deviceId: DEV } };
      },
    ],
    [
      "malformed",
      () => {
        const bytes = Buffer.from([0x0a, 0xff]);
        return {
          spec: { jobId: "" },
          raw: {
            job: {
              spec: bytes,
              signature: edSign(null, bytes, operator.privateKeyPem),
              keyId: operator.keyId,
            },
          },
        };
      },
    ],
    ["no_expiry", () => ({ spec: jobSpec(noop, { expiresAtMs: 0 }) })],
    ["expired", () => ({ spec: jobSpec(noop, { expiresAtMs: Date.now() - 1000 }) })],
    [
      "issued_in_future",
      () => ({
        spec: jobSpec(noop, {
          issuedAtMs: Date.now() + 86_400_000,
          expiresAtMs: Date.now() + 2 * 86_400_000,
        }),
      }),
    ],
    ["wrong_target", () => ({ spec: jobSpec(noop, { target: { deviceIds: ["someone-else"] } }) })],
    [
      "wrong_target",
      () => ({ spec: jobSpec(noop, { target: { selector: "env=prod,region in (us,asia)" } }) }),
      /labels do not match/,
    ],
    [
      "wrong_target",
      () => {
        const spec = jobSpec(noop);
        return { spec, raw: { job: sign(spec), deviceId: "other-device" } };
      },
    ],
    [
      "duplicate_task_id",
      () => ({
        spec: jobSpec([
          { id: "a", type: "noop" },
          { id: "a", type: "noop" },
        ]),
      }),
    ],
    ["unknown_dependency", () => ({ spec: jobSpec([{ id: "a", type: "noop", dependsOn: ["ghost"] }]) })],
    [
      "dependency_cycle",
      () => ({
        spec: jobSpec([
          { id: "a", type: "noop", dependsOn: ["b"] },
          { id: "b", type: "noop", dependsOn: ["a"] },
        ]),
      }),
      /a -> b -> a|b -> a -> b/,
    ],
    ["unknown_task_type", () => ({ spec: jobSpec([{ id: "a", type: "teleport" }]) })],
    [
      "task_type_not_allowed",
      () => ({ spec: jobSpec([{ id: "a", type: "sleep", params: { seconds: 1 } }]) }),
    ],
    [
      "task_type_not_allowed",
      () => ({
        spec: jobSpec([{ id: "a", type: "shell", params: { command: "/bin/rm", args: ["-rf", "/"] } }]),
      }),
      /allowShell/,
    ],
    [
      // H3: a health check is a command like any other: in allowShell, or a file of the release.
      "task_type_not_allowed",
      () => ({
        spec: jobSpec([
          {
            id: "a",
            type: "software-update",
            params: {
              artifact: "app",
              version: "1.0.0",
              target: "opt/app",
              healthCheck: { command: ["/bin/sh", "-c", "id"] },
            },
          },
        ]),
      }),
      /health check command \/bin\/sh is not in this agent's allowShell list/,
    ],
    [
      "task_type_not_allowed",
      () => ({
        spec: jobSpec([
          {
            id: "a",
            type: "software-update",
            params: {
              artifact: "app",
              version: "1.0.0",
              target: "opt/app",
              healthCheck: { command: ["./../../../bin/sh"] },
            },
          },
        ]),
      }),
      /inside the release/,
    ],
    [
      // M8: no loader or interpreter variables for an allow-listed command.
      "invalid_params",
      () => ({
        spec: jobSpec([
          { id: "a", type: "shell", params: { command: "/bin/true", env: { BASH_ENV: "/tmp/evil" } } },
        ]),
      }),
      /env\.BASH_ENV: BASH_ENV may not be set by a job/,
    ],
    [
      "invalid_params",
      () => ({
        spec: jobSpec([
          {
            id: "a",
            type: "shell",
            params: { command: "/bin/true", env: { LD_PRELOAD: "/tmp/x.so", OK_VAR: "1" } },
          },
        ]),
      }),
      /LD_PRELOAD may not be set/,
    ],
    [
      "invalid_params",
      () => ({ spec: jobSpec([{ id: "a", type: "shell", params: { command: "relative/path" } }]) }),
      /command: must be an absolute path/,
    ],
    ["invalid_params", () => ({ spec: jobSpec([{ id: "a", type: "noop", params: { unexpected: 1 } }]) })],
    [
      "invalid_params",
      () => {
        const spec = jobSpec(noop);
        spec.tasks![0]!.paramsJson = "{not json";
        return { spec };
      },
      /not JSON/,
    ],
    ["invalid_schedule", () => ({ spec: jobSpec(noop, { schedule: { cron: "61 * * * *" } }) })],
  ])("%s", async (reason, make, message) => {
    const { spec, raw } = make();
    const msg = await expectRejected(spec, reason, raw);
    if (message) expect(msg).toMatch(message);
  });

  it("an identical re-delivery is acknowledged again with the current status; a changed one is rejected", async () => {
    const spec = jobSpec(noop);
    const jobId = await h.ctl.assign(DEV, spec);
    await h.ctl.waitJob(DEV, jobId, TaskState.SUCCEEDED);
    const before = h.ctl.statuses(DEV).length;
    await h.ctl.assign(DEV, spec); // same bytes, signed again: same spec digest
    const again = await h.ctl.waitFor("re-ack", () =>
      h.ctl
        .statuses(DEV)
        .slice(before)
        .find((s) => s.jobId === jobId),
    );
    expect(again).toMatchObject({ state: TaskState.SUCCEEDED, reason: "duplicate_delivery" });
    const changed = { ...spec, name: "something else" };
    await h.ctl.assign(DEV, changed);
    const rej = await h.ctl.waitFor("reject", () =>
      h.ctl
        .statuses(DEV)
        .slice(before)
        .find((s) => s.reason === "id_reused"),
    );
    expect(rej.state).toBe(TaskState.REJECTED);
    // The original job keeps its result.
    expect(
      h.ctl
        .statuses(DEV)
        .filter((s) => s.jobId === jobId && s.taskId === "a" && s.state === TaskState.SUCCEEDED),
    ).toHaveLength(1);
  });
});

describe("bad payloads on the agent's topics", () => {
  it("config, backup and software-update stay inside the device's allowPaths", async () => {
    const id = "rej-paths";
    await h.newAgent(id, {
      allowPaths: ["etc/app", "opt"],
      allowTaskTypes: ["config", "backup", "software-update"],
    });
    for (const [type, params] of [
      ["config", { path: "etc/passwd", content: "x" }],
      ["config", { path: "etc/app/../../etc/shadow", content: "x" }],
      ["backup", { paths: ["etc/app", "root/.ssh"] }],
      ["software-update", { artifact: "app", version: "1.0.0", target: "usr/bin" }],
    ] as const) {
      const jobId = await h.ctl.assign(id, jobSpec([{ id: "a", type, params }]));
      const s = await h.ctl.waitJob(id, jobId);
      expect(TaskState[s.state!], `${type} ${JSON.stringify(params)}`).toBe("REJECTED");
      expect(s.message).toMatch(/outside this device's allowPaths/);
    }
    const ok = await h.ctl.assign(
      id,
      jobSpec([{ id: "a", type: "config", params: { path: "etc/app/a.conf", content: "x" } }]),
    );
    expect((await h.ctl.waitJob(id, ok)).state).toBe(TaskState.SUCCEEDED);
  });

  it("a job valid for longer than the device allows is refused (M14)", async () => {
    const now = Date.now();
    await expectRejected(
      jobSpec(noop, { issuedAtMs: now, expiresAtMs: now + 500 * 86_400_000 }),
      "lifetime_too_long",
    );
  });

  it("a job forgotten by compaction is refused when replayed under a rolled-back clock (M14)", async () => {
    const agent = h.agents.find((a) => a.deviceId === DEV)!;
    const spec = jobSpec(noop, { expiresAtMs: Date.now() + 60_000 });
    const jobId = await h.ctl.assign(DEV, spec);
    await h.ctl.waitJob(DEV, jobId, TaskState.SUCCEEDED);
    // Hours later the job has expired and its record is compacted away...
    expect(await agent.scheduler.compact(spec.expiresAtMs! + 2 * 3600_000)).toBeGreaterThanOrEqual(1);
    expect(agent.store.forgottenUpTo).toBeGreaterThanOrEqual(spec.expiresAtMs!);
    // ...and the same signed job comes again while the device's clock is back before its expiry.
    const before = h.ctl.statuses(DEV).length;
    await h.ctl.publishRaw(
      DEV,
      "job",
      encodeEnvelope({ jobAssignment: h.ctl.assignments.get(DEV)!.get(jobId)! }),
    );
    const s = await h.ctl.waitFor("the replay's status", () =>
      h.ctl
        .statuses(DEV)
        .slice(before)
        .find((x) => x.jobId === jobId && x.taskId === ""),
    );
    expect(TaskState[s.state!]).toBe("REJECTED");
    expect(s.message).toMatch(/forgotten: it may have run/);
  });

  it("a rejection of a job with thousands of bad params is bounded: the status fits any batch (M1)", async () => {
    const args = Array.from({ length: 5000 }, (_, i) => i); // numbers where strings belong
    const message = await expectRejected(
      jobSpec([{ id: "a", type: "shell", params: { command: "/bin/true", args } }]),
      "invalid_params",
    );
    expect(Buffer.byteLength(message)).toBeLessThanOrEqual(4096);
    expect(message).toMatch(/truncated\]$/);
  });

  it("drops garbage, truncated and oversized payloads with a counter and keeps working", async () => {
    const agent = h.agents[0]!;
    const valid = encodeEnvelope({ jobAssignment: { job: sign(jobSpec(noop)), deviceId: DEV } });
    const before = { ...agent.counters.toObject() };
    await h.ctl.publishRaw(DEV, "job", Buffer.alloc(64, 0xff));
    await h.ctl.publishRaw(DEV, "job", valid.subarray(0, valid.length - 7));
    await h.ctl.publishRaw(DEV, "job", Buffer.alloc(1024 * 1024, 0x41));
    await h.ctl.publishRaw(DEV, "ctl", Buffer.concat([Buffer.from([0x0a, 0x50]), Buffer.alloc(10, 0x41)]));
    await h.ctl.publishRaw(DEV, "ctl", Buffer.alloc(0));
    await h.ctl.publishRaw(
      DEV,
      "ctl",
      pb.Envelope.encode({ protocolVersion: 2, statusAck: { upToSeq: 99999 } }).finish(),
    );
    await h.ctl.publishRaw(DEV, "job", encodeEnvelope({ timeHint: { nowMs: 1 } }));
    const dropped = () =>
      Object.entries(agent.counters.toObject())
        .filter(([k]) => k.startsWith("dropped_"))
        .reduce((a, [k, v]) => a + v - (before[k] ?? 0), 0);
    await h.ctl.waitFor("7 drops", () => dropped() === 7);
    expect(agent.counters.get("dropped_oversized") - (before.dropped_oversized ?? 0)).toBe(1);
    expect(agent.counters.get("dropped_wrong_version") - (before.dropped_wrong_version ?? 0)).toBe(2);
    expect(agent.counters.get("dropped_unexpected_body") - (before.dropped_unexpected_body ?? 0)).toBe(1);
    expect(agent.counters.get("dropped_undecodable") - (before.dropped_undecodable ?? 0)).toBe(3);
    // Still alive and accepting work.
    const jobId = await h.ctl.assign(DEV, jobSpec(noop));
    expect((await h.ctl.waitJob(DEV, jobId)).state).toBe(TaskState.SUCCEEDED);
  });
});
