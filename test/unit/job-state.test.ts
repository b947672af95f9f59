// The controller's job-state rules without a broker: how statuses fold into an assignment,
// a job's state across devices, the tally; and the job store reading jobs of older versions.
import { describe, expect, it } from "vitest";
import { applyStatus, jobState, tally } from "../../broker/controller/job-state.js";
import { JobStore, jobNames } from "../../broker/controller/job-store.js";
import { type Assignment, ControllerStore, type JobRecord } from "../../broker/controller/store.js";
import { pb, TaskState as S } from "../../proto/index.js";
import { tempDir } from "../helpers/keys.js";

const asg = (over: Partial<Assignment> = {}): Assignment => ({
  jobId: "J",
  deviceId: "d",
  acked: false,
  state: S.TASK_STATE_UNSPECIFIED,
  reason: "",
  message: "",
  execId: "",
  tasks: {},
  updatedAt: 0,
  runs: 0,
  ...over,
});
const job = (over: Partial<JobRecord> = {}): JobRecord => ({
  id: "J",
  name: "j",
  createdAt: 0,
  expiresAt: 1,
  recurring: false,
  tasks: [{ id: "t", type: "noop" }],
  target: { deviceIds: [], selector: "" },
  devices: ["a", "b"],
  createdBy: "admin",
  ...over,
});

describe("status application", () => {
  it("a job-level QUEUED acknowledges; task statuses fill the tasks; RUNNING shows", () => {
    const a = asg();
    applyStatus(a, { jobId: "J", taskId: "", state: S.QUEUED }, 1);
    expect(a.acked).toBe(true);
    applyStatus(a, { jobId: "J", taskId: "t", taskType: "noop", state: S.RUNNING, attempt: 1 }, 2);
    expect(a.state).toBe(S.RUNNING);
    expect(a.tasks.t).toMatchObject({ type: "noop", state: S.RUNNING, attempt: 1 });
    applyStatus(a, { jobId: "J", taskId: "", state: S.SUCCEEDED, message: "1 SUCCEEDED" }, 3);
    expect(a).toMatchObject({ state: S.SUCCEEDED, message: "1 SUCCEEDED", updatedAt: 3 });
  });
  it("a terminal outcome is not undone by a late non-terminal status or a duplicate's re-ack", () => {
    const a = asg({ acked: true, state: S.FAILED });
    applyStatus(a, { jobId: "J", taskId: "", state: S.QUEUED, reason: "duplicate_delivery" }, 1);
    applyStatus(a, { jobId: "J", taskId: "", state: S.RUNNING }, 2);
    expect(a.state).toBe(S.FAILED);
  });
  it("a closed assignment keeps the controller's outcome", () => {
    const a = asg({ acked: true, state: S.CANCELED, closed: true });
    applyStatus(a, { jobId: "J", taskId: "", state: S.SUCCEEDED }, 1);
    expect(a.state).toBe(S.CANCELED);
  });
  it("a recurring occurrence's end counts a run; a new occurrence starts its tasks over", () => {
    const a = asg({ acked: true, state: S.QUEUED });
    applyStatus(a, { jobId: "J", taskId: "t", executionId: "o1", state: S.SUCCEEDED }, 1);
    applyStatus(a, { jobId: "J", taskId: "", executionId: "o1", state: S.SUCCEEDED }, 2);
    expect(a.runs).toBe(1);
    expect(a.state).not.toBe(S.SUCCEEDED); // the job itself goes on
    applyStatus(a, { jobId: "J", taskId: "t", executionId: "o2", state: S.RUNNING }, 3);
    expect(a.execId).toBe("o2");
    expect(Object.keys(a.tasks)).toEqual(["t"]);
  });
});

describe("job state and tally", () => {
  it("PENDING until acknowledged, RUNNING, then SUCCEEDED only if every device succeeded", () => {
    expect(jobState(job(), [asg({ deviceId: "a" }), asg({ deviceId: "b" })])).toBe("PENDING");
    expect(jobState(job(), [asg({ acked: true }), asg()])).toBe("RUNNING");
    expect(jobState(job(), [asg({ state: S.SUCCEEDED }), asg({ state: S.SKIPPED })])).toBe("FAILED");
    expect(jobState(job(), [asg({ state: S.SUCCEEDED }), asg({ state: S.SUCCEEDED })])).toBe("SUCCEEDED");
    expect(jobState(job({ cancelled: { reason: "x", at: 0 } }), [asg({ acked: true })])).toBe("CANCELING");
  });
  it("a work-queue job succeeds at `need` successes and fails when exhausted", () => {
    const any = { need: 1, selector: "x", timeoutS: 1 };
    expect(jobState(job({ any }), [asg({ state: S.SUCCEEDED }), asg({ acked: true })])).toBe("SUCCEEDED");
    expect(jobState(job({ any: { ...any, exhausted: true } }), [asg({ state: S.FAILED })])).toBe("FAILED");
  });
  it("skipped, rejected and timed-out devices count as failed; cancelled ones apart", () => {
    const c = tally([
      asg({ state: S.SKIPPED }),
      asg({ state: S.REJECTED }),
      asg({ state: S.TIMED_OUT }),
      asg({ state: S.CANCELED }),
      asg({ acked: true }),
      asg(),
    ]);
    expect(c).toEqual({ pending: 1, running: 1, succeeded: 0, failed: 3, canceled: 1, timedOut: 1 });
  });
});

describe("job store", () => {
  it("records what a job names at submit, and reads jobs stored by older controllers", async () => {
    const tmp = tempDir("fleet-jobstore-");
    const store = new ControllerStore(tmp.dir);
    await store.open();
    const task = (type: string, params: object) => ({ id: type, type, paramsJson: JSON.stringify(params) });
    const spec = pb.JobSpec.encode({
      jobId: "OLD",
      tasks: [task("software-update", { artifact: "fw", version: "2.0" }), task("backup", { upload: true })],
    }).finish();
    const signed = pb.SignedJob.encode({ spec, signature: Buffer.alloc(64), keyId: "k" }).finish();
    expect(jobNames(pb.JobSpec.decode(spec) as never)).toEqual({ artifacts: ["fw@2.0"], uploads: true });
    // An older controller kept the signed job as base64 inside the record, and no names.
    await store.jobs.put("OLD", {
      ...job({ id: "OLD" }),
      signed: Buffer.from(signed).toString("base64"),
    } as never);
    const jobs = new JobStore(store);
    const old = (await jobs.get("OLD"))!;
    expect(old).not.toHaveProperty("signed");
    expect([...(await jobs.signed(old)).spec!]).toEqual([...spec]);
    expect(await jobs.names(old)).toEqual({ artifacts: ["fw@2.0"], uploads: true });
    // A new one: bytes in their own sublevel, decoded from there by a fresh process.
    await jobs.batch(jobs.create(job({ id: "NEW" }), signed));
    const fresh = new JobStore(store);
    expect(await fresh.signedSize((await fresh.get("NEW"))!)).toBe(signed.length);
    expect([...(await store.signedJobs.get("NEW"))!]).toEqual([...signed]);
    await store.close();
    tmp.cleanup();
  });

  it("lists a job's assignments in device order, as they change, from disk again once forgotten", async () => {
    const tmp = tempDir("fleet-jobstore-");
    const store = new ControllerStore(tmp.dir);
    await store.open();
    const jobs = new JobStore(store);
    const j = job({ id: "L", devices: ["a", "b", "c"] });
    const put = (a: Assignment) => jobs.batch([jobs.putAssignment(a)]);
    for (const d of j.devices) await put(asg({ jobId: "L", deviceId: d }));
    const ids = async () => (await jobs.ofJob(j)).map((a) => `${a.deviceId}:${S[a.state]}`);
    expect(await ids()).toEqual([
      "a:TASK_STATE_UNSPECIFIED",
      "b:TASK_STATE_UNSPECIFIED",
      "c:TASK_STATE_UNSPECIFIED",
    ]);
    // A copy: a caller sorting or cutting it does not change the next answer.
    (await jobs.ofJob(j)).reverse();
    // Changed in place (as Delivery does) and written: seen.
    const b = (await jobs.assignment("b", "L"))!;
    b.state = S.SUCCEEDED;
    await put(b);
    expect(await ids()).toEqual(["a:TASK_STATE_UNSPECIFIED", "b:SUCCEEDED", "c:TASK_STATE_UNSPECIFIED"]);
    // A device added (the same devices array, longer).
    j.devices.push("d");
    await put(asg({ jobId: "L", deviceId: "d", state: S.QUEUED }));
    expect(await ids()).toEqual([
      "a:TASK_STATE_UNSPECIFIED",
      "b:SUCCEEDED",
      "c:TASK_STATE_UNSPECIFIED",
      "d:QUEUED",
    ]);
    // Changed in memory, its write failed and it was forgotten: the disk's version again.
    const c = (await jobs.assignment("c", "L"))!;
    c.state = S.FAILED;
    expect((await ids())[2]).toBe("c:FAILED");
    jobs.forget([c]);
    expect((await ids())[2]).toBe("c:TASK_STATE_UNSPECIFIED");
    // A new object for a device (read back from disk) replaces the old one in the list.
    const again = (await jobs.ofJob(j))[2]!;
    expect(again).not.toBe(c);
    expect(await jobs.assignment("c", "L")).toBe(again);
    await store.close();
    tmp.cleanup();
  });
});
