// Job store and delivery (DESIGN.md §4): store the assignment, then publish it; re-send what
// a device has not acknowledged on every SyncRequest; apply StatusBatches idempotently by seq,
// persist, then StatusAck; aggregate task and job states per device and per job.
import type { Logger } from "pino";
import type { Counters } from "../../common/counters.js";
import { boundStatus } from "../../common/output.js";
import { encodeEnvelope } from "../../proto/envelope.js";
import { pb, stateName, TaskState, type TaskStatus, TERMINAL_STATES } from "../../proto/index.js";
import { specDigest } from "../../proto/signing.js";
import { deviceTopic, eventsTopic } from "../../proto/topics.js";
import type { Registry } from "./registry.js";
import { type Assignment, asgKey, type ControllerStore, type JobRecord, type Op } from "./store.js";

export interface DeliveryContext {
  store: ControllerStore;
  registry: Registry;
  prefix: string;
  log: Logger;
  counters: Counters;
  publish(topic: string, payload: Uint8Array, qos: 0 | 1): void;
  /** The broker's payload limit: nothing larger is published. */
  maxPayloadBytes: number;
  now(): number;
  /** A device finished a job (terminal job-level status applied). */
  onFinished?(jobId: string): void;
}

/** What one status may add to an assignment (an agent of ours bounds it already). */
const STATUS_BYTES = 96 * 1024;

export function assignmentJson(a: Assignment, job?: JobRecord) {
  const order = job?.tasks.map((t) => t.id) ?? Object.keys(a.tasks);
  return {
    deviceId: a.deviceId,
    state: stateName(a.state),
    ...(a.reason ? { reason: a.reason } : {}),
    ...(a.message ? { message: a.message } : {}),
    tasks: order.map((id) => {
      const t = a.tasks[id];
      return {
        id,
        type: t?.type ?? job?.tasks.find((x) => x.id === id)?.type ?? "",
        state: stateName(t?.state ?? TaskState.TASK_STATE_UNSPECIFIED),
        attempt: t?.attempt ?? 0,
        message: t?.message ?? "",
        ...(t?.reason ? { reason: t.reason } : {}),
        ...(t?.output ? { output: t.output } : {}),
      };
    }),
  };
}

/** A job's state across its devices. */
export function jobState(job: JobRecord, asgs: readonly Assignment[]): string {
  if (job.any) {
    // Work-queue: done when `need` devices succeeded; failed when nobody is left to try.
    const ok = asgs.filter((a) => a.state === TaskState.SUCCEEDED).length;
    if (ok >= job.any.need) return "SUCCEEDED";
    if (asgs.some((a) => !TERMINAL_STATES.has(a.state))) return job.cancelled ? "CANCELING" : "RUNNING";
    if (job.cancelled) return "CANCELED";
    return job.any.exhausted ? "FAILED" : "RUNNING";
  }
  if (asgs.some((a) => !TERMINAL_STATES.has(a.state))) {
    if (job.cancelled) return "CANCELING";
    return asgs.some((a) => a.acked) ? "RUNNING" : "PENDING";
  }
  if (job.cancelled) return "CANCELED";
  return asgs.every((a) => a.state === TaskState.SUCCEEDED) ? "SUCCEEDED" : "FAILED";
}

/** A device's outcome that counts as a failure (for counts, rollout thresholds, failure lists). */
export const FAILED = new Set<number>([
  TaskState.FAILED,
  TaskState.TIMED_OUT,
  TaskState.REJECTED,
  TaskState.SKIPPED,
]);

/** Where assignments are: one tally for a job's counts and a rollout's. */
export function tally(asgs: readonly Assignment[]) {
  const c = { pending: 0, running: 0, succeeded: 0, failed: 0, canceled: 0, timedOut: 0 };
  for (const a of asgs) {
    if (a.state === TaskState.SUCCEEDED) c.succeeded++;
    else if (FAILED.has(a.state)) {
      c.failed++;
      if (a.state === TaskState.TIMED_OUT) c.timedOut++;
    } else if (a.state === TaskState.CANCELED) c.canceled++;
    else if (a.acked) c.running++;
    else c.pending++;
  }
  return c;
}

/** How many of a job's devices are where (a summary that stays small at any fleet size). */
export function jobCounts(job: JobRecord, asgs: readonly Assignment[]) {
  return { total: job.devices.length, ...tally(asgs) };
}

/**
 * A job with one page of its devices: those after device `after` (in assignment order), at
 * most `limit`, and no more than `budget` bytes of JSON (at least one). `next` names the last
 * device given when more follow.
 */
export function jobView(
  job: JobRecord,
  asgs: readonly Assignment[],
  page: { limit: number; after?: string; budget: number },
) {
  const byDevice = new Map(asgs.map((a) => [a.deviceId, a]));
  const start = page.after === undefined ? 0 : job.devices.indexOf(page.after) + 1;
  const devices: Array<ReturnType<typeof assignmentJson> & { outputOmitted?: boolean }> = [];
  let bytes = 0;
  let next: string | undefined;
  for (let i = start; i < job.devices.length && page.limit > 0; i++) {
    const a = byDevice.get(job.devices[i]!);
    if (!a) continue;
    let item: ReturnType<typeof assignmentJson> & { outputOmitted?: boolean } = assignmentJson(a, job);
    let size = Buffer.byteLength(JSON.stringify(item));
    if (size > page.budget) {
      // One device's task outputs alone would not fit a reply: leave them out, say so.
      item = { ...item, tasks: item.tasks.map(({ output: _, ...t }) => t), outputOmitted: true };
      size = Buffer.byteLength(JSON.stringify(item));
    }
    bytes += size;
    if (devices.length && (devices.length >= page.limit || bytes > page.budget)) {
      next = devices.at(-1)!.deviceId;
      break;
    }
    devices.push(item);
  }
  return {
    id: job.id,
    name: job.name,
    state: jobState(job, asgs),
    createdAt: new Date(job.createdAt).toISOString(),
    ...(job.cancelled ? { cancelled: job.cancelled.reason } : {}),
    ...(job.rolloutId ? { rolloutId: job.rolloutId } : {}),
    counts: jobCounts(job, asgs),
    devices,
    ...(next !== undefined ? { next } : {}),
  };
}

export class Delivery {
  /** Per-device chains so one device's batches apply in order while devices run in parallel. */
  private readonly chains = new Map<string, Promise<void>>();
  private readonly jobCache = new Map<string, JobRecord>();

  constructor(private readonly c: DeliveryContext) {}

  async job(jobId: string): Promise<JobRecord | undefined> {
    const cached = this.jobCache.get(jobId);
    if (cached) return cached;
    const j = await this.c.store.jobs.get(jobId);
    if (j && this.jobCache.size < 10_000) this.jobCache.set(jobId, j);
    return j;
  }

  private assignmentPayload(job: JobRecord, deviceId: string): Uint8Array {
    return encodeEnvelope({
      jobAssignment: { job: pb.SignedJob.decode(Buffer.from(job.signed, "base64")), deviceId },
    });
  }

  /** Stores the job and its assignments (one synced batch), then publishes to online devices. */
  async submit(job: JobRecord, extra: Op[] = []): Promise<void> {
    const devices = job.devices;
    job.devices = [];
    await this.addDevices(job, devices, extra);
    this.event({
      kind: "job.created",
      jobId: job.id,
      detailJson: JSON.stringify({ name: job.name, devices: devices.length, rolloutId: job.rolloutId }),
    });
  }

  /**
   * Assigns the job to more devices (rollout waves, work-queue re-dispatch): the new assignments
   * and the job record in one synced batch, then a publish to those online. A device already
   * assigned is skipped, so a repeated call (after a restart) never delivers twice.
   */
  async addDevices(job: JobRecord, deviceIds: readonly string[], extra: Op[] = []): Promise<string[]> {
    const now = this.c.now();
    const known = new Set(job.devices);
    const fresh = [...new Set(deviceIds)].filter((d) => !known.has(d));
    job.devices.push(...fresh);
    const ops: Op[] = [this.c.store.put(this.c.store.jobs, job.id, job), ...extra];
    for (const d of fresh) {
      const a: Assignment = {
        jobId: job.id,
        deviceId: d,
        acked: false,
        state: TaskState.TASK_STATE_UNSPECIFIED,
        reason: "",
        message: "",
        execId: "",
        tasks: {},
        updatedAt: now,
        runs: 0,
        assignedAt: now,
      };
      ops.push(this.c.store.put(this.c.store.assignments, asgKey(d, job.id), a));
    }
    await this.c.store.batch(ops);
    this.jobCache.set(job.id, job);
    for (const d of fresh) {
      if (this.c.registry.get(d)?.online) {
        this.c.publish(deviceTopic(this.c.prefix, d, "job"), this.assignmentPayload(job, d), 1);
      }
    }
    return fresh;
  }

  /**
   * Ends assignments on the controller's side (timeout, abort, re-dispatch): undelivered ones
   * are withdrawn, delivered ones get a Cancel. Later reports from the device do not change them.
   */
  async close(
    job: JobRecord,
    asgs: readonly Assignment[],
    state: TaskState,
    reason: string,
    message: string,
  ): Promise<void> {
    if (!asgs.length) return;
    const now = this.c.now();
    const ops: Op[] = [];
    for (const a of asgs) {
      a.state = state;
      a.reason = a.acked ? reason : "withdrawn";
      a.message = message;
      a.closed = true;
      a.updatedAt = now;
      ops.push(this.c.store.put(this.c.store.assignments, asgKey(a.deviceId, a.jobId), a));
    }
    await this.c.store.batch(ops);
    for (const a of asgs) {
      if (a.acked && this.c.registry.get(a.deviceId)?.online) {
        this.c.publish(
          deviceTopic(this.c.prefix, a.deviceId, "ctl"),
          encodeEnvelope({ cancel: { jobId: job.id, reason: message } }),
          1,
        );
      }
      this.event({
        kind: "job.device_closed",
        deviceId: a.deviceId,
        jobId: job.id,
        detailJson: JSON.stringify({ state: TaskState[state], reason: a.reason, message }),
      });
    }
  }

  /**
   * Re-sends every assignment the device has not acknowledged, pending cancels, and the time.
   * The SyncResponse carries as many assignments as fit the payload limit; the rest go as
   * ordinary JobAssignments on the device's job topic (each fits: checked at submit).
   */
  async onSync(deviceId: string): Promise<void> {
    const inSync: Array<{ job: ReturnType<typeof pb.SignedJob.decode>; deviceId: string }> = [];
    const overflow: JobRecord[] = [];
    const cancels: Array<{ jobId: string; reason: string }> = [];
    const moreCancels: typeof cancels = [];
    // What does not fit the SyncResponse (envelope and time need little) goes separately.
    let room = this.c.maxPayloadBytes - 1024;
    const cancel = (jobId: string, reason: string) => {
      const c = { jobId, reason: reason.slice(0, 256) };
      const size = c.jobId.length + Buffer.byteLength(c.reason) + 16;
      if (size <= room) {
        room -= size;
        cancels.push(c);
      } else moreCancels.push(c);
    };
    for (const a of await this.c.store.deviceAssignments(deviceId)) {
      if (a.closed) {
        // Ended by the controller: make sure the device stops too (it may have missed the Cancel).
        if (a.acked && Object.values(a.tasks).some((t) => !TERMINAL_STATES.has(t.state)))
          cancel(a.jobId, a.message || "canceled by the controller");
        continue;
      }
      if (TERMINAL_STATES.has(a.state)) continue;
      const job = await this.job(a.jobId);
      if (!job) continue;
      if (job.cancelled) {
        if (a.acked) cancel(job.id, job.cancelled.reason);
      } else if (!a.acked && job.expiresAt > this.c.now()) {
        const size = (job.signed.length * 3) / 4 + 128;
        if (size <= room) {
          room -= size;
          inSync.push({ job: pb.SignedJob.decode(Buffer.from(job.signed, "base64")), deviceId });
        } else overflow.push(job);
      }
    }
    this.c.publish(
      deviceTopic(this.c.prefix, deviceId, "ctl"),
      encodeEnvelope({ syncResponse: { assignments: inSync, cancels, nowMs: this.c.now() } }),
      1,
    );
    for (const job of overflow)
      this.c.publish(deviceTopic(this.c.prefix, deviceId, "job"), this.assignmentPayload(job, deviceId), 1);
    for (const c of moreCancels)
      this.c.publish(deviceTopic(this.c.prefix, deviceId, "ctl"), encodeEnvelope({ cancel: c }), 1);
    const resent = inSync.length + overflow.length;
    if (resent) this.c.counters.inc("assignments_resent", resent);
  }

  onStatusBatch(deviceId: string, statuses: TaskStatus[], epoch = "", ackedSeq = 0): Promise<void> {
    const prev = this.chains.get(deviceId) ?? Promise.resolve();
    const next = prev
      .then(() => this.apply(deviceId, statuses, epoch, ackedSeq))
      .catch((err) => {
        this.c.counters.inc("status_apply_failed");
        this.c.log.error({ err, deviceId }, "cannot apply status batch; the device will re-send it");
      });
    this.chains.set(deviceId, next);
    void next.then(() => {
      if (this.chains.get(deviceId) === next) this.chains.delete(deviceId);
    });
    return next;
  }

  /**
   * Applies a batch strictly in seq order (go-back-N): a status is applied only when it is the
   * next one; at a gap (the statuses before it were lost with a connection) the rest is left
   * for the agent to send again, and the ack says where the controller is. Acknowledging past
   * a gap would make the agent delete statuses never applied (found by the crash campaign).
   */
  private async apply(
    deviceId: string,
    statuses: TaskStatus[],
    epoch: string,
    ackedSeq: number,
  ): Promise<void> {
    const { store } = this.c;
    const rec = (await store.seqs.get(deviceId)) ?? { epoch: "", seq: 0 };
    const known = typeof rec === "number" ? { epoch: "", seq: rec } : rec;
    let last = known.seq;
    // A new database on the device (re-flashed, replaced): its seq starts over (H6).
    const newEpoch = epoch !== "" && epoch !== known.epoch;
    if (newEpoch) {
      if (known.epoch || known.seq) {
        this.c.counters.inc("device_epoch_changed");
        this.c.log.info(
          { deviceId, epoch, was: known.epoch },
          "device has a new database; its status seq starts over",
        );
      }
      last = 0;
    }
    if (ackedSeq > last) {
      // The agent no longer has anything up to ackedSeq (our state was restored or reset).
      this.c.counters.inc("seq_fast_forward");
      last = ackedSeq;
    }
    const start = known.seq;
    const touched = new Map<string, Assignment>();
    const fresh: TaskStatus[] = [];
    for (const s of statuses) {
      const seq = s.seq ?? 0;
      if (seq <= last) {
        this.c.counters.inc("statuses_duplicate");
        continue;
      }
      if (seq !== last + 1) {
        this.c.counters.inc("statuses_out_of_order");
        break;
      }
      last = seq;
      fresh.push(s);
      const key = asgKey(deviceId, s.jobId ?? "");
      const a = touched.get(key) ?? (await store.assignments.get(key));
      // Only the job's own tasks (M3): a device cannot grow an assignment with made-up ones.
      const job = a && s.taskId ? await this.job(a.jobId) : undefined;
      if (job && !job.tasks.some((t) => t.id === s.taskId)) {
        this.c.counters.inc("statuses_unknown_task");
        continue;
      }
      // A rejection counts for the job whose bytes were rejected, not for whatever id they claim.
      if (a && !s.taskId && s.state === TaskState.REJECTED && s.specDigest) {
        const job = await this.job(a.jobId);
        if (job && s.specDigest !== specDigest(pb.SignedJob.decode(Buffer.from(job.signed, "base64")))) {
          this.c.counters.inc("rejections_of_other_bytes");
          continue;
        }
      }
      if (!a) {
        this.c.counters.inc("statuses_unknown_job");
        this.c.log.warn(
          { deviceId, jobId: s.jobId, state: stateName(s.state ?? 0), reason: s.reason },
          "status for a job this device was not assigned",
        );
        continue;
      }
      applyStatus(a, boundStatus(s, STATUS_BYTES), this.c.now());
      touched.set(key, a);
    }
    if (last !== start || newEpoch) {
      const ops: Op[] = [...touched.values()].map((a) =>
        store.put(store.assignments, asgKey(a.deviceId, a.jobId), a),
      );
      ops.push(store.put(store.seqs, deviceId, { epoch: newEpoch ? epoch : known.epoch, seq: last }));
      await store.batch(ops);
    }
    this.c.registry.seen(deviceId, this.c.now());
    // Persisted (or nothing new): acknowledge cumulatively.
    this.c.publish(
      deviceTopic(this.c.prefix, deviceId, "ctl"),
      encodeEnvelope({ statusAck: { upToSeq: last, epoch: newEpoch ? epoch : known.epoch } }),
      1,
    );
    for (const s of fresh) {
      this.event({ kind: "task.status", deviceId, jobId: s.jobId ?? "", status: s });
      if (!s.taskId && TERMINAL_STATES.has(s.state ?? 0)) this.c.onFinished?.(s.jobId ?? "");
    }
    // A job the controller already ended here (withdrawn by an aborted rollout, timed out)
    // that reaches the device anyway — a copy the broker queued for it while it was offline —
    // is cancelled as soon as the device says it has it (M14).
    const late = [...touched.values()].filter(
      (a) => a.closed && fresh.some((s) => s.jobId === a.jobId && !TERMINAL_STATES.has(s.state ?? 0)),
    );
    for (const a of late) {
      this.c.counters.inc("late_deliveries_canceled");
      this.c.publish(
        deviceTopic(this.c.prefix, deviceId, "ctl"),
        encodeEnvelope({ cancel: { jobId: a.jobId, reason: a.message || "ended by the controller" } }),
        1,
      );
    }
  }

  /** Cancels a job: withdraws what was not delivered, tells devices to cancel the rest. */
  async cancel(jobId: string, reason: string): Promise<JobRecord | undefined> {
    const job = await this.job(jobId);
    if (!job) return undefined;
    if (job.cancelled) return job;
    job.cancelled = { reason, at: this.c.now() };
    const asgs = await this.c.store.jobAssignments(job);
    const ops: Op[] = [this.c.store.put(this.c.store.jobs, job.id, job)];
    const notify: string[] = [];
    for (const a of asgs) {
      if (TERMINAL_STATES.has(a.state)) continue;
      if (!a.acked) {
        a.state = TaskState.CANCELED;
        a.reason = "withdrawn";
        a.message = reason;
        a.updatedAt = this.c.now();
        ops.push(this.c.store.put(this.c.store.assignments, asgKey(a.deviceId, a.jobId), a));
      } else notify.push(a.deviceId);
    }
    await this.c.store.batch(ops);
    for (const d of notify) {
      if (this.c.registry.get(d)?.online) {
        this.c.publish(
          deviceTopic(this.c.prefix, d, "ctl"),
          encodeEnvelope({ cancel: { jobId, reason } }),
          1,
        );
      }
    }
    this.event({ kind: "job.canceled", jobId, detailJson: JSON.stringify({ reason }) });
    return job;
  }

  async view(jobId: string, page: Parameters<typeof jobView>[2]) {
    const job = await this.job(jobId);
    if (!job) return undefined;
    return jobView(job, await this.c.store.jobAssignments(job), page);
  }

  /** Drops jobs (and their assignments) created before `before` whose assignments are all terminal. */
  async prune(before: number): Promise<number> {
    let n = 0;
    for await (const job of this.c.store.jobs.values()) {
      if (job.createdAt >= before) continue;
      const asgs = await this.c.store.jobAssignments(job);
      if (asgs.some((a) => !TERMINAL_STATES.has(a.state)) && job.expiresAt > this.c.now()) continue;
      await this.c.store.batch(
        [
          this.c.store.del(this.c.store.jobs, job.id),
          ...job.devices.map((d) => this.c.store.del(this.c.store.assignments, asgKey(d, job.id))),
        ],
        false,
      );
      this.jobCache.delete(job.id);
      n++;
    }
    return n;
  }

  event(e: {
    kind: string;
    deviceId?: string;
    jobId?: string;
    status?: TaskStatus;
    detailJson?: string;
  }): void {
    this.c.publish(
      eventsTopic(this.c.prefix),
      encodeEnvelope({ fleetEvent: { ...e, atMs: this.c.now() } }),
      0,
    );
  }
}

/** Folds one status into an assignment. */
export function applyStatus(a: Assignment, s: TaskStatus, now: number): void {
  const state = s.state ?? TaskState.TASK_STATE_UNSPECIFIED;
  const execId = s.executionId ?? "";
  a.updatedAt = now;
  if (execId !== a.execId && execId) {
    // A new occurrence of a recurring job: its tasks start over.
    a.execId = execId;
    a.tasks = {};
  }
  if (!s.taskId) {
    if (state === TaskState.QUEUED || state === TaskState.REJECTED || s.reason === "duplicate_delivery")
      a.acked = true;
    if (a.closed) return; // the controller already decided this device's outcome
    if (execId && TERMINAL_STATES.has(state)) {
      a.runs++; // a recurring occurrence ended; the job itself goes on
      a.message = `last run ${TaskState[state]}`;
      return;
    }
    if (s.reason === "duplicate_delivery" && !TERMINAL_STATES.has(state)) return;
    if (TERMINAL_STATES.has(a.state) && !TERMINAL_STATES.has(state)) return;
    a.state = state;
    a.reason = s.reason ?? "";
    a.message = s.message ?? "";
    return;
  }
  a.acked = true;
  a.tasks[s.taskId] = {
    type: s.taskType ?? a.tasks[s.taskId]?.type ?? "",
    state,
    attempt: s.attempt ?? 0,
    message: s.message ?? "",
    reason: s.reason ?? "",
    ...(s.output ? { output: s.output } : {}),
  };
  if (!a.closed && !TERMINAL_STATES.has(a.state) && state === TaskState.RUNNING) a.state = TaskState.RUNNING;
}
