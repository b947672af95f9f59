// Job store and delivery (DESIGN.md §4): store the assignment, then publish it; re-send what
// a device has not acknowledged on every SyncRequest; apply StatusBatches idempotently by seq,
// persist, then StatusAck; aggregate task and job states per device and per job.
import type { Logger } from "pino";
import type { Counters } from "../../common/counters.js";
import { boundStatus } from "../../common/output.js";
import { encodeEnvelope } from "../../proto/envelope.js";
import {
  isLostWrite,
  type SignedJob,
  type StatusAck,
  stateName,
  TaskState,
  type TaskStatus,
  TERMINAL_STATES,
} from "../../proto/index.js";
import { specDigest } from "../../proto/signing.js";
import { deviceTopic, eventsTopic } from "../../proto/topics.js";
import { applyStatus, jobState, newAssignment } from "./job-state.js";
import type { JobStore, NewJob } from "./job-store.js";
import type { Registry } from "./registry.js";
import type { Assignment, ControllerStore, JobRecord, Op } from "./store.js";
import { jobView } from "./views.js";

export interface DeliveryContext {
  /** For the per-device status seqs; jobs and assignments go through `jobs`. */
  store: ControllerStore;
  jobs: JobStore;
  registry: Registry;
  prefix: string;
  log: Logger;
  counters: Counters;
  publish(topic: string, payload: Uint8Array, qos: 0 | 1): void;
  /**
   * QoS of StatusAcks: 0 where the publishes keep their order (the embedded broker's link),
   * else 1 (the default).
   */
  ackQos?: 0 | 1;
  /** The broker's payload limit: nothing larger is published. */
  maxPayloadBytes: number;
  now(): number;
  /**
   * A device finished a job (terminal job-level status applied) in `state`; `last`: as far as
   * this process knows, no device of the job is left; `lastKnown`: whether this process will
   * say so when it happens (see `unsettled`).
   */
  onFinished?(jobId: string, f: { state: TaskState; last: boolean; lastKnown: boolean }): void;
  /**
   * A job (not a rollout's: its rollout reports) ended — every device terminal, SUCCEEDED or
   * FAILED — with the statuses of this batch: ops to write in the same batch, before the
   * StatusAck (notifications). Asked only while `wantsJobEnds()` says someone listens.
   */
  onJobEnded?(job: JobRecord, state: "SUCCEEDED" | "FAILED", asgs: readonly Assignment[]): Op[];
  wantsJobEnds?(): boolean;
  /** Whether anyone may receive a FleetEvent now (else it is neither built nor published). */
  wantsEvents?(): boolean;
}

/** A device is acknowledged at least every this many statuses, even while more batches wait. */
const ACK_AT_LEAST = 128;
/** What one status may add to an assignment (an agent of ours bounds it already). */
const STATUS_BYTES = 96 * 1024;

export class Delivery {
  /** Per-device chains so one device's batches apply in order while devices run in parallel. */
  private readonly chains = new Map<string, Promise<void>>();
  /**
   * Assignments not yet terminal, per job, counted once and then kept by decrement: telling
   * when a job ends costs O(devices) per job, not per status. Dropped when devices are added
   * or assignments are ended by the controller (recounted when next needed).
   */
  private readonly openCount = new Map<string, number>();
  private readonly endedHere = new Map<string, Map<string, Assignment>>();
  private endings: Promise<unknown> = Promise.resolve();
  /**
   * Per job assigned by this process: how many of those assignments are not terminal yet, kept
   * by decrement as statuses apply. Only a hint, so that a rollout steps the moment its last
   * device ends instead of at its next rate-limited step (up to 50 ms later): after a restart
   * or once the controller ended assignments itself there is none (the rollout steps on its
   * timer, as before), and devices added after a restart make it early (one step too many).
   */
  private readonly unsettled = new Map<string, number>();
  /** Each device's last applied seq and epoch, as on disk (read once, then kept). */
  private readonly seqs = new Map<string, { epoch: string; seq: number }>();
  /** Batches waiting per device: only the last of a run is acknowledged (acks are cumulative). */
  private readonly waiting = new Map<string, number>();
  /** The seq each device was last acknowledged up to (by a StatusAck of ours). */
  private readonly ackedUpTo = new Map<string, number>();

  constructor(private readonly ctx: DeliveryContext) {}

  job(jobId: string): Promise<JobRecord | undefined> {
    return this.ctx.jobs.get(jobId);
  }

  private async assignmentPayload(job: JobRecord, deviceId: string): Promise<Uint8Array> {
    return encodeEnvelope({ jobAssignment: { job: await this.ctx.jobs.signed(job), deviceId } });
  }

  /**
   * Stores a new job, its signed bytes and its assignments (one synced batch), then publishes
   * to online devices.
   */
  async submit(
    { record: job, signed }: NewJob,
    extra: Op[] = [],
    opts: { delivered?: boolean } = {},
  ): Promise<void> {
    const devices = job.devices;
    job.devices = [];
    await this.addDevices(job, devices, [...this.ctx.jobs.create(job, signed), ...extra], opts);
    this.event({
      kind: "job.created",
      jobId: job.id,
      detailJson: JSON.stringify({
        name: job.name,
        devices: devices.length,
        rolloutId: job.rolloutId,
        ...(job.origin ? { origin: job.origin, site: job.site } : {}),
      }),
    });
  }

  /**
   * Assigns the job to more devices (rollout waves, work-queue re-dispatch): the new assignments
   * and the job record in one synced batch, then a publish to those online. A device already
   * assigned is skipped, so a repeated call (after a restart) never delivers twice.
   */
  async addDevices(
    job: JobRecord,
    deviceIds: readonly string[],
    extra: Op[] = [],
    opts: { delivered?: boolean } = {},
  ): Promise<string[]> {
    const now = this.ctx.now();
    this.forgetCount(job.id);
    const known = new Set(job.devices);
    const fresh = [...new Set(deviceIds)].filter((d) => !known.has(d));
    if (!opts.delivered && fresh.length)
      this.unsettled.set(job.id, (this.unsettled.get(job.id) ?? 0) + fresh.length);
    job.devices.push(...fresh);
    const ops: Op[] = [this.ctx.jobs.put(job), ...extra];
    for (const d of fresh) {
      // A job run at a site (origin `site`): its gateway gave it to the devices already.
      ops.push(this.ctx.jobs.putAssignment(newAssignment(job.id, d, now, Boolean(opts.delivered))));
    }
    await this.ctx.jobs.batch(ops);
    if (!opts.delivered) await this.publishAssignments(job, fresh);
    return fresh;
  }

  /**
   * Publishes a job to the online devices among `deviceIds`; devices behind one online gateway
   * (two or more) get it through the gateway in one message per payload's worth of ids, so the
   * job crosses the site's uplink once. Each device still acknowledges its own copy.
   */
  private async publishAssignments(job: JobRecord, deviceIds: readonly string[]): Promise<void> {
    const { registry, prefix } = this.ctx;
    const sites = new Map<string, string[]>();
    const direct: string[] = [];
    for (const d of deviceIds) {
      const rec = registry.get(d);
      if (!rec?.online) continue;
      if (rec.via && registry.get(rec.via)?.online) sites.set(rec.via, [...(sites.get(rec.via) ?? []), d]);
      else direct.push(d);
    }
    for (const [gateway, ids] of sites) {
      if (ids.length < 2) {
        direct.push(...ids);
        continue;
      }
      const signed = await this.ctx.jobs.signed(job);
      // Ids take at most what the payload limit leaves beside the signed job.
      const room = Math.max(1024, this.ctx.maxPayloadBytes - (await this.ctx.jobs.signedSize(job)) - 1024);
      let chunk: string[] = [];
      let bytes = 0;
      const flush = () => {
        if (!chunk.length) return;
        const a = {
          job: signed,
          deviceId: gateway,
          siteDevices: chunk,
          ...(job.rolloutId ? { rolloutId: job.rolloutId } : {}),
        };
        this.ctx.publish(deviceTopic(prefix, gateway, "job"), encodeEnvelope({ jobAssignment: a }), 1);
        this.ctx.counters.inc("site_fanouts");
        chunk = [];
        bytes = 0;
      };
      for (const id of ids) {
        if (bytes + id.length + 4 > room) flush();
        chunk.push(id);
        bytes += id.length + 4;
      }
      flush();
    }
    for (const d of direct)
      this.ctx.publish(deviceTopic(prefix, d, "job"), await this.assignmentPayload(job, d), 1);
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
    this.forgetCount(job.id);
    this.unsettled.delete(job.id);
    const now = this.ctx.now();
    const ops: Op[] = [];
    for (const a of asgs) {
      a.state = state;
      a.reason = a.acked ? reason : "withdrawn";
      a.message = message;
      a.closed = true;
      a.updatedAt = now;
      ops.push(this.ctx.jobs.putAssignment(a));
    }
    await this.ctx.jobs.batch(ops);
    for (const a of asgs) {
      if (a.acked && this.ctx.registry.get(a.deviceId)?.online) {
        this.ctx.publish(
          deviceTopic(this.ctx.prefix, a.deviceId, "ctl"),
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
   * Re-sends every assignment the device has not acknowledged, pending cancels, and the time,
   * as the answer to the device's SyncRequest `requestId` (0: a re-send of the controller's own).
   * The SyncResponse carries as many assignments as fit the payload limit; the rest go as
   * ordinary JobAssignments on the device's job topic (each fits: checked at submit).
   */
  async onSync(deviceId: string, requestId = 0): Promise<void> {
    const inSync: Array<{ job: SignedJob; deviceId: string }> = [];
    const overflow: JobRecord[] = [];
    const cancels: Array<{ jobId: string; reason: string }> = [];
    const moreCancels: typeof cancels = [];
    // What does not fit the SyncResponse (envelope and time need little) goes separately.
    let room = this.ctx.maxPayloadBytes - 1024;
    const cancel = (jobId: string, reason: string) => {
      const c = { jobId, reason: reason.slice(0, 256) };
      const size = c.jobId.length + Buffer.byteLength(c.reason) + 16;
      if (size <= room) {
        room -= size;
        cancels.push(c);
      } else moreCancels.push(c);
    };
    for (const a of await this.ctx.jobs.ofDevice(deviceId)) {
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
      } else if (!a.acked && job.expiresAt > this.ctx.now()) {
        const size = (await this.ctx.jobs.signedSize(job)) + 128;
        if (size <= room) {
          room -= size;
          inSync.push({ job: await this.ctx.jobs.signed(job), deviceId });
        } else overflow.push(job);
      }
    }
    this.ctx.publish(
      deviceTopic(this.ctx.prefix, deviceId, "ctl"),
      encodeEnvelope({ syncResponse: { assignments: inSync, cancels, nowMs: this.ctx.now(), requestId } }),
      1,
    );
    for (const job of overflow)
      this.ctx.publish(
        deviceTopic(this.ctx.prefix, deviceId, "job"),
        await this.assignmentPayload(job, deviceId),
        1,
      );
    for (const c of moreCancels)
      this.ctx.publish(deviceTopic(this.ctx.prefix, deviceId, "ctl"), encodeEnvelope({ cancel: c }), 1);
    const resent = inSync.length + overflow.length;
    if (resent) this.ctx.counters.inc("assignments_resent", resent);
  }

  /**
   * `ack`: where the StatusAck goes once the batch is persisted — by default the device's ctl
   * topic; a gateway's SiteStatus collects its devices' acks into one SiteAck instead.
   */
  onStatusBatch(
    deviceId: string,
    statuses: TaskStatus[],
    epoch = "",
    ackedSeq = 0,
    ack?: (a: StatusAck) => void,
  ): Promise<void> {
    const prev = this.chains.get(deviceId) ?? Promise.resolve();
    this.waiting.set(deviceId, (this.waiting.get(deviceId) ?? 0) + 1);
    const next = prev
      .then(() => {
        const behind = (this.waiting.get(deviceId) ?? 1) - 1;
        if (behind > 0) this.waiting.set(deviceId, behind);
        else this.waiting.delete(deviceId);
        return this.apply(deviceId, statuses, epoch, ackedSeq, ack, behind > 0);
      })
      .catch((err) => {
        this.ctx.counters.inc("status_apply_failed");
        this.ctx.log.error({ err, deviceId }, "cannot apply status batch; the device will re-send it");
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
    ack?: (a: StatusAck) => void,
    /**
     * Another batch of this device is next: its ack (cumulative) covers this one — unless this
     * device has not been acknowledged for ACK_AT_LEAST statuses: a device with a long outbox
     * keeps its window moving.
     */
    more = false,
  ): Promise<void> {
    const { store } = this.ctx;
    let known = this.seqs.get(deviceId);
    if (!known) {
      const rec = (await store.seqs.get(deviceId)) ?? { epoch: "", seq: 0 };
      known = typeof rec === "number" ? { epoch: "", seq: rec } : rec;
    }
    let last = known.seq;
    // A new database on the device (re-flashed, replaced): its seq starts over (H6).
    const newEpoch = epoch !== "" && epoch !== known.epoch;
    if (newEpoch) {
      if (known.epoch || known.seq) {
        this.ctx.counters.inc("device_epoch_changed");
        this.ctx.log.info(
          { deviceId, epoch, was: known.epoch },
          "device has a new database; its status seq starts over",
        );
      }
      last = 0;
      this.ackedUpTo.delete(deviceId);
    }
    if (ackedSeq > last) {
      // The agent no longer has anything up to ackedSeq (our state was restored or reset).
      this.ctx.counters.inc("seq_fast_forward");
      last = ackedSeq;
    }
    const start = known.seq;
    const touched = new Map<string, Assignment>();
    /** Assignments of this batch that were not terminal before it. */
    const open = new Set<string>();
    const fresh: TaskStatus[] = [];
    /** Lost-write records of this batch (logged once per batch, not once each). */
    const lost: string[] = [];
    for (const s of statuses) {
      const seq = s.seq ?? 0;
      if (seq <= last) {
        this.ctx.counters.inc("statuses_duplicate");
        continue;
      }
      if (seq !== last + 1) {
        this.ctx.counters.inc("statuses_out_of_order");
        break;
      }
      last = seq;
      if (isLostWrite(s)) {
        // The agent could not write this status (disk full): the record only fills its seq.
        this.ctx.counters.inc("statuses_lost_write");
        lost.push(`${s.jobId ?? ""}/${s.taskId ?? ""}@${seq}`);
        continue;
      }
      fresh.push(s);
      const key = s.jobId ?? "";
      const a = touched.get(key) ?? (await this.ctx.jobs.assignment(deviceId, key));
      if (a && !touched.has(key) && !TERMINAL_STATES.has(a.state)) open.add(key);
      // Only the job's own tasks (M3): a device cannot grow an assignment with made-up ones.
      const job = a && s.taskId ? await this.job(a.jobId) : undefined;
      if (job && !job.tasks.some((t) => t.id === s.taskId)) {
        this.ctx.counters.inc("statuses_unknown_task");
        continue;
      }
      // A rejection counts for the job whose bytes were rejected, not for whatever id they claim.
      if (a && !s.taskId && s.state === TaskState.REJECTED && s.specDigest) {
        const job = await this.job(a.jobId);
        if (job && s.specDigest !== specDigest(await this.ctx.jobs.signed(job))) {
          this.ctx.counters.inc("rejections_of_other_bytes");
          continue;
        }
      }
      if (!a) {
        this.ctx.counters.inc("statuses_unknown_job");
        this.ctx.log.warn(
          { deviceId, jobId: s.jobId, state: stateName(s.state ?? 0), reason: s.reason },
          "status for a job this device was not assigned",
        );
        continue;
      }
      applyStatus(a, boundStatus(s, STATUS_BYTES), this.ctx.now());
      touched.set(key, a);
    }
    if (lost.length)
      this.ctx.log.warn(
        { deviceId, lost: lost.length, first: lost.slice(0, 5) },
        "the device lost statuses (it could not write them)",
      );
    const applied = { epoch: newEpoch ? epoch : known.epoch, seq: last };
    if (last !== start || newEpoch) {
      const ops: Op[] = [...touched.values()].map((a) => this.ctx.jobs.putAssignment(a));
      ops.push(store.put(store.seqs, deviceId, applied));
      try {
        ops.push(...(await this.endedJobs(touched, open)));
        await this.ctx.jobs.batch(ops);
      } catch (err) {
        // Not on disk: the cached assignments are read again, the device re-sends the batch.
        this.ctx.jobs.forget(touched.values());
        this.seqs.delete(deviceId);
        throw err;
      }
    }
    this.seqs.set(deviceId, applied);
    this.ctx.registry.seen(deviceId, this.ctx.now());
    /** Jobs whose last open assignment (as far as `unsettled` knows) this batch ended. */
    const settledJobs = new Set<string>();
    for (const key of open) {
      const a = touched.get(key);
      if (a && TERMINAL_STATES.has(a.state) && this.settled(a)) settledJobs.add(a.jobId);
    }
    // Persisted (or nothing new): acknowledge cumulatively — once for a run of batches.
    const statusAck = { upToSeq: last, epoch: applied.epoch };
    if (ack) ack(statusAck);
    else if (!more || last - (this.ackedUpTo.get(deviceId) ?? 0) >= ACK_AT_LEAST) {
      this.ackedUpTo.set(deviceId, last);
      // QoS 0 through the embedded broker: an ack is cumulative and idempotent, so a lost one
      // (the connection dropped) is repaired by the next, by the agent's re-send of a stalled
      // outbox (acknowledged again) or by the sync on reconnect; at QoS 1 it cost a PUBACK and
      // the broker's in-flight record. Elsewhere QoS 1 (`ackQos`): aedes may let a QoS 0
      // message overtake the QoS 1 job published before it and then drop the job (link.ts).
      this.ctx.publish(
        deviceTopic(this.ctx.prefix, deviceId, "ctl"),
        encodeEnvelope({ statusAck }),
        this.ctx.ackQos ?? 1,
      );
    } else this.ctx.counters.inc("status_acks_coalesced");
    for (const s of fresh) {
      // Where devices' update bytes came from (DESIGN.md §11), for /metrics.
      for (const [source, n] of Object.entries(s.bytesBySource ?? {}))
        if (/^(local|peers|gateway|center)$/.test(source))
          this.ctx.counters.inc(`artifact_bytes_from_${source}`, Number(n) || 0);
      // A peer that served bad chunks is an event operators see (`fleet watch`).
      for (const peer of (s.droppedPeers ?? []).slice(0, 16)) {
        this.ctx.counters.inc("peers_dropped_bad_chunk");
        this.event({
          kind: "peer.bad_chunk",
          deviceId,
          jobId: s.jobId ?? "",
          detailJson: JSON.stringify({ peer: peer.slice(0, 64) }),
        });
      }
      this.event({ kind: "task.status", deviceId, jobId: s.jobId ?? "", status: s });
      if (!s.taskId && TERMINAL_STATES.has(s.state ?? 0)) {
        const last = settledJobs.has(s.jobId ?? "");
        this.ctx.onFinished?.(s.jobId ?? "", {
          state: s.state!,
          last,
          lastKnown: last || this.unsettled.has(s.jobId ?? ""),
        });
      }
    }
    // A job the controller already ended here (withdrawn by an aborted rollout, timed out)
    // that reaches the device anyway — a copy the broker queued for it while it was offline —
    // is cancelled as soon as the device says it has it (M14).
    const late = [...touched.values()].filter(
      (a) => a.closed && fresh.some((s) => s.jobId === a.jobId && !TERMINAL_STATES.has(s.state ?? 0)),
    );
    for (const a of late) {
      this.ctx.counters.inc("late_deliveries_canceled");
      this.ctx.publish(
        deviceTopic(this.ctx.prefix, deviceId, "ctl"),
        encodeEnvelope({ cancel: { jobId: a.jobId, reason: a.message || "ended by the controller" } }),
        1,
      );
    }
  }

  /** Ops for jobs this batch ended (a device's assignment went terminal and so did the job). */
  private endedJobs(touched: ReadonlyMap<string, Assignment>, open: ReadonlySet<string>): Promise<Op[]> {
    if (!this.ctx.onJobEnded || !this.ctx.wantsJobEnds?.()) return Promise.resolve([]);
    // One device's batch at a time: a count made by one is decremented by the others.
    const next = this.endings.then(() => this.countEnds(touched, open));
    this.endings = next.catch(() => {});
    return next;
  }

  private async countEnds(
    touched: ReadonlyMap<string, Assignment>,
    open: ReadonlySet<string>,
  ): Promise<Op[]> {
    const ops: Op[] = [];
    for (const [key, a] of touched) {
      if (!open.has(key) || !TERMINAL_STATES.has(a.state)) continue;
      const job = await this.job(a.jobId);
      if (!job || job.rolloutId || job.recurring) continue;
      // Terminal outcomes counted here, some maybe not on disk yet (another device's batch).
      const seen = this.endedHere.get(job.id) ?? new Map<string, Assignment>();
      this.endedHere.set(job.id, seen);
      seen.set(a.deviceId, a);
      const current = async () => (await this.ctx.jobs.ofJob(job)).map((x) => seen.get(x.deviceId) ?? x);
      let left = this.openCount.get(job.id);
      if (left === undefined) left = (await current()).filter((x) => !TERMINAL_STATES.has(x.state)).length;
      else left--;
      this.openCount.set(job.id, left);
      if (left > 0) continue;
      const asgs = await current();
      this.forgetCount(job.id);
      const state = jobState(job, asgs);
      if (state === "SUCCEEDED" || state === "FAILED") ops.push(...this.ctx.onJobEnded!(job, state, asgs));
    }
    return ops;
  }

  /** A removed device: its seq record is gone from disk too. */
  forgetDevice(deviceId: string): void {
    this.seqs.delete(deviceId);
    this.ackedUpTo.delete(deviceId);
  }

  private forgetCount(jobId: string): void {
    this.openCount.delete(jobId);
    this.endedHere.delete(jobId);
  }

  /** Whether the terminal assignment `a` (open before) was the last one of its job here. */
  private settled(a: Assignment): boolean {
    const left = this.unsettled.get(a.jobId);
    if (left === undefined) return false;
    if (left > 1) {
      this.unsettled.set(a.jobId, left - 1);
      return false;
    }
    this.unsettled.delete(a.jobId);
    return true;
  }

  /** Cancels a job: withdraws what was not delivered, tells devices to cancel the rest. */
  async cancel(jobId: string, reason: string): Promise<JobRecord | undefined> {
    const job = await this.job(jobId);
    if (!job) return undefined;
    if (job.cancelled) return job;
    job.cancelled = { reason, at: this.ctx.now() };
    this.forgetCount(job.id);
    const asgs = await this.ctx.jobs.ofJob(job);
    const ops: Op[] = [this.ctx.jobs.put(job)];
    const notify: string[] = [];
    for (const a of asgs) {
      if (TERMINAL_STATES.has(a.state)) continue;
      if (!a.acked) {
        a.state = TaskState.CANCELED;
        a.reason = "withdrawn";
        a.message = reason;
        a.updatedAt = this.ctx.now();
        ops.push(this.ctx.jobs.putAssignment(a));
      } else notify.push(a.deviceId);
    }
    await this.ctx.jobs.batch(ops);
    for (const d of notify) {
      if (this.ctx.registry.get(d)?.online) {
        this.ctx.publish(
          deviceTopic(this.ctx.prefix, d, "ctl"),
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
    return jobView(job, await this.ctx.jobs.ofJob(job), page);
  }

  /** Drops jobs (and their assignments) created before `before` whose assignments are all terminal. */
  async prune(before: number): Promise<number> {
    let n = 0;
    for await (const job of this.ctx.jobs.all()) {
      if (job.createdAt >= before) continue;
      const asgs = await this.ctx.jobs.ofJob(job);
      if (asgs.some((a) => !TERMINAL_STATES.has(a.state)) && job.expiresAt > this.ctx.now()) continue;
      await this.ctx.jobs.batch(this.ctx.jobs.remove(job), false);
      this.forgetCount(job.id);
      this.unsettled.delete(job.id);
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
    // Nobody may hear it (no `fleet watch`, no dashboard page): neither built nor published.
    if (this.ctx.wantsEvents && !this.ctx.wantsEvents()) {
      this.ctx.counters.inc("events_unheard");
      return;
    }
    this.ctx.publish(
      eventsTopic(this.ctx.prefix),
      encodeEnvelope({ fleetEvent: { ...e, atMs: this.ctx.now() } }),
      0,
    );
  }
}
