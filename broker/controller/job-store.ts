// The seam under Delivery, Rollouts and the work queue: jobs and their per-device assignments
// in the controller's LevelDB, with the cache in front of them. Nothing else reads or writes
// the job, signed-job or assignment sublevels. Jobs, decoded signed jobs and assignments are
// cached (bounded); writes go through the cache.
//
// A signed job is kept as the bytes the operator signed (its own sublevel, not base64 inside
// the JSON record) and decoded at most once per process; what its tasks name (artifacts,
// uploads) is recorded on the job record at submit, so an artifact download check is a lookup.
import { type DecodedJobSpec, decodeJobSpec, pb, type SignedJob } from "../../proto/index.js";
import {
  type Assignment,
  asgKey,
  type ControllerStore,
  type JobNames,
  type JobRecord,
  type Op,
} from "./store.js";

const CACHE_MAX = 10_000;
/** Assignments kept in memory (a few hundred bytes each): 20 jobs each for 10,000 devices. */
const ASSIGNMENTS_MAX = 200_000;
/** Jobs whose assignment list is kept (see `ofJob`): those being rolled out or watched. */
const LISTS_MAX = 64;

/** What a job's tasks name, for the artifact server's checks (recorded at submit). */
export function jobNames(spec: Pick<DecodedJobSpec, "tasks">): JobNames {
  const names: JobNames = { artifacts: [], uploads: false };
  for (const t of spec.tasks) {
    let p: Record<string, unknown>;
    try {
      p = JSON.parse(t.paramsJson || "{}") as Record<string, unknown>;
    } catch {
      continue;
    }
    if (t.type === "software-update" && typeof p.artifact === "string" && typeof p.version === "string")
      names.artifacts.push(`${p.artifact}@${p.version}`);
    if (t.type === "backup" && p.upload === true) names.uploads = true;
  }
  return names;
}

/** A job being submitted: its record and the bytes the operator signed. */
export interface NewJob {
  record: JobRecord;
  signed: Uint8Array;
}

/** A job record as an older controller stored it: the signed job as base64 inside. */
type Stored = JobRecord & { signed?: string };

export class JobStore {
  private readonly cache = new Map<string, JobRecord>();
  private readonly decoded = new Map<string, { signed: SignedJob; bytes: Uint8Array }>();
  /**
   * Assignments as last written (write-through; the object callers change is the one cached):
   * applying a status or stepping a rollout reads memory, not LevelDB (issue 17). A write that
   * fails is forgotten (`forget`), so the next read is the disk's.
   */
  private readonly asgs = new Map<string, Assignment>();
  /** Per job, its assignments (the cached objects) in the order of the `devices` array named. */
  private readonly lists = new Map<string, { devices: readonly string[]; asgs: Assignment[] }>();

  constructor(private readonly store: ControllerStore) {}

  // ---- jobs -----------------------------------------------------------------------------------

  async get(jobId: string): Promise<JobRecord | undefined> {
    const cached = this.cache.get(jobId);
    if (cached) return cached;
    const stored = (await this.store.jobs.get(jobId)) as Stored | undefined;
    if (!stored) return undefined;
    const { signed, ...job } = stored;
    if (signed !== undefined) this.remember(jobId, Buffer.from(signed, "base64"));
    this.keep(job);
    return job;
  }

  /** The operator's signed job: decoded once, then from memory. */
  async signed(job: JobRecord): Promise<SignedJob> {
    return (await this.signedEntry(job)).signed;
  }

  /** What the job's tasks name (recorded at submit; read from the signed job for older jobs). */
  async names(job: JobRecord): Promise<JobNames> {
    if (!job.names) job.names = jobNames(decodeJobSpec((await this.signed(job)).spec ?? new Uint8Array()));
    return job.names;
  }

  /** The signed job's serialized size (what it adds to an assignment). */
  async signedSize(job: JobRecord): Promise<number> {
    return (await this.signedEntry(job)).bytes.length;
  }

  private async signedEntry(job: JobRecord): Promise<{ signed: SignedJob; bytes: Uint8Array }> {
    const hit = this.decoded.get(job.id);
    if (hit) return hit;
    const bytes = await this.store.signedJobs.get(job.id);
    if (!bytes) throw new Error(`job ${job.id} has no signed bytes`);
    return this.remember(job.id, bytes);
  }

  private remember(jobId: string, bytes: Uint8Array) {
    const entry = { signed: pb.SignedJob.decode(bytes), bytes };
    if (this.decoded.size >= CACHE_MAX) this.decoded.delete(this.decoded.keys().next().value!);
    this.decoded.set(jobId, entry);
    return entry;
  }

  private keep(job: JobRecord): void {
    if (this.cache.size >= CACHE_MAX) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(job.id, job);
  }

  /** Ops that store a new job with its signed bytes. */
  create(job: JobRecord, signedBytes: Uint8Array): Op[] {
    this.remember(job.id, signedBytes);
    return [this.put(job), this.store.put(this.store.signedJobs, job.id, signedBytes)];
  }

  /** The op that stores a changed job record (the cache holds the same object). */
  put(job: JobRecord): Op {
    this.keep(job);
    return this.store.put(this.store.jobs, job.id, job);
  }

  /** Ops that delete a job, its signed bytes and its assignments. */
  remove(job: JobRecord): Op[] {
    this.cache.delete(job.id);
    this.decoded.delete(job.id);
    this.lists.delete(job.id);
    for (const d of job.devices) this.asgs.delete(asgKey(d, job.id));
    return [
      this.store.del(this.store.jobs, job.id),
      this.store.del(this.store.signedJobs, job.id),
      ...job.devices.map((d) => this.store.del(this.store.assignments, asgKey(d, job.id))),
    ];
  }

  /** Every job, oldest id first (or newest first from before `before`, for listings). */
  async *all(o: { newestFirst?: boolean; before?: string } = {}): AsyncGenerator<JobRecord> {
    const range = o.newestFirst ? { reverse: true, ...(o.before ? { lt: o.before } : {}) } : {};
    for await (const stored of this.store.jobs.values(range)) {
      const { signed: _bytes, ...job } = stored as Stored;
      yield this.cache.get(job.id) ?? job;
    }
  }

  // ---- assignments ------------------------------------------------------------------------------

  private cacheAsg(a: Assignment): Assignment {
    const key = asgKey(a.deviceId, a.jobId);
    const had = this.asgs.get(key);
    if (had === a) return a; // the same object, changed in place: every list of it holds it
    this.lists.delete(a.jobId);
    if (!had && this.asgs.size >= ASSIGNMENTS_MAX) {
      const [oldest, evicted] = this.asgs.entries().next().value!;
      this.asgs.delete(oldest);
      this.lists.delete(evicted.jobId);
    }
    this.asgs.set(key, a);
    return a;
  }

  async assignment(deviceId: string, jobId: string): Promise<Assignment | undefined> {
    const hit = this.asgs.get(asgKey(deviceId, jobId));
    if (hit) return hit;
    const a = await this.store.assignments.get(asgKey(deviceId, jobId));
    return a && (this.asgs.get(asgKey(deviceId, jobId)) ?? this.cacheAsg(a));
  }

  putAssignment(a: Assignment): Op {
    this.cacheAsg(a);
    return this.store.put(this.store.assignments, asgKey(a.deviceId, a.jobId), a);
  }

  /** Drops assignments whose write failed: their next read comes from disk. */
  forget(asgs: Iterable<Assignment>): void {
    for (const a of asgs) {
      this.asgs.delete(asgKey(a.deviceId, a.jobId));
      this.lists.delete(a.jobId);
    }
  }

  /**
   * A job's assignments in device order (a copy: callers may sort it). From the job's list
   * while that is current — the same `devices` array, as long, and none of its assignments
   * replaced, evicted or forgotten since — else looked up device by device (and from disk where
   * not in memory; a list is kept only once all are in memory). A rollout's step and every
   * `rollout show` ask for all of them: at 10,000 devices the lookups (a key built and hashed
   * per device) were 4–9 ms a call.
   */
  async ofJob(job: JobRecord): Promise<Assignment[]> {
    const list = this.lists.get(job.id);
    if (list && list.devices === job.devices && list.asgs.length === job.devices.length)
      return list.asgs.slice();
    const out: Array<Assignment | undefined> = [];
    const missing: number[] = [];
    for (const d of job.devices) {
      const hit = this.asgs.get(asgKey(d, job.id));
      if (!hit) missing.push(out.length);
      out.push(hit);
    }
    if (!missing.length) {
      // All in memory, read without waiting (nothing was forgotten or replaced meanwhile).
      const asgs = out as Assignment[];
      if (this.lists.size >= LISTS_MAX) this.lists.delete(this.lists.keys().next().value!);
      this.lists.set(job.id, { devices: job.devices, asgs });
      return asgs.slice();
    }
    const got = await this.store.assignments.getMany(missing.map((i) => asgKey(job.devices[i]!, job.id)));
    missing.forEach((i, k) => {
      const a = got[k];
      if (a) out[i] = this.asgs.get(asgKey(a.deviceId, a.jobId)) ?? this.cacheAsg(a);
    });
    return out.filter((a): a is Assignment => a !== undefined);
  }

  /** A device's assignments, oldest job first (or the newest `limit` first). */
  async ofDevice(deviceId: string, o: { newestFirst?: boolean; limit?: number } = {}): Promise<Assignment[]> {
    const stored = await this.store.assignments
      .values({
        gt: `${deviceId}!`,
        lt: `${deviceId}!\xff`,
        ...(o.newestFirst ? { reverse: true } : {}),
        ...(o.limit !== undefined ? { limit: o.limit } : {}),
      })
      .all();
    // What is in memory may be newer than the disk (a write on its way).
    return stored.map((a) => this.asgs.get(asgKey(a.deviceId, a.jobId)) ?? a);
  }

  /** Ids of a device's jobs, newest first, before job id `before`. */
  async *deviceJobIds(deviceId: string, before?: string): AsyncGenerator<string> {
    const prefix = `${deviceId}!`;
    const keys = this.store.assignments.keys({
      gt: prefix,
      lt: before ? `${prefix}${before}` : `${prefix}\xff`,
      reverse: true,
    });
    for await (const k of keys) yield k.slice(prefix.length);
  }

  /** One atomic batch (group commit). */
  batch(ops: Op[], sync = true): Promise<void> {
    return this.store.batch(ops, sync);
  }
}
