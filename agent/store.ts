// The agent's durable state on LevelDB (any abstract-level database: a ClassicLevel on
// disk, or a sublevel of a shared one for simulated devices).
//
// Write classes and LevelDB `sync` (what a power cut may lose):
//  - accepting a job (job record + QUEUED status):          sync  — a PUBACK follows it.
//  - RUNNING and terminal task states (+ their statuses):   sync  — crash recovery relies on them
//                                                                   (persist, then act).
//  - WAITING/progress states:                               async — losing one re-derives it on start.
//  - outbox deletions after a StatusAck, facts, time floor: async — losing one only re-sends or
//                                                                   re-measures; sends are idempotent.
import { randomBytes } from "node:crypto";
import type { AbstractBatchOperation, AbstractLevel, AbstractSublevel } from "abstract-level";
import { GroupCommit } from "../common/group-commit.js";
import { boundStatus } from "../common/output.js";
import type { KeyValue } from "../firmware-tasks/types.js";
import { pb, type TaskStatus } from "../proto/index.js";

export interface TaskRun {
  state: number; // pb TaskState
  attempt: number;
  progress: number;
  message: string;
  reason: string;
  output?: string;
  startedAt?: number;
  finishedAt?: number;
  nextAttemptAt?: number;
  /** The next run continues this attempt (a resumable task after a restart). */
  resume?: boolean;
}

export interface ExecutionRecord {
  jobId: string;
  execId: string; // "" for one-shot jobs, the occurrence (ISO time) for recurring ones
  createdAt: number;
  done: boolean;
  jobState?: number;
  tasks: Record<string, TaskRun>;
}

export interface JobRecord {
  jobId: string;
  digest: string;
  signed: string; // base64 of the serialized SignedJob, kept verbatim
  receivedAt: number;
  expiresAt: number;
  rolloutId?: string;
  cancelled?: { reason: string; at: number };
  lastSlot?: number; // recurring: the last occurrence started
  occurrences?: number; // recurring: how many were started
}

export type Db = AbstractLevel<string | Buffer | Uint8Array, string, unknown>;
type Sub<V> = AbstractSublevel<Db, string | Buffer | Uint8Array, string, V>;

export interface Commit {
  jobs?: JobRecord[];
  executions?: ExecutionRecord[];
  statuses?: TaskStatus[];
  deleteJobs?: string[];
  deleteExecutions?: Array<{ jobId: string; execId: string }>;
}

type Op = AbstractBatchOperation<Db, string, unknown>;

const RECENT_MAX = 5000;

const seqKey = (seq: number) => seq.toString(16).padStart(16, "0");
const execKey = (jobId: string, execId: string) => `${jobId}!${execId}`;

export class AgentStore {
  readonly jobs: Sub<JobRecord>;
  readonly executions: Sub<ExecutionRecord>;
  readonly outbox: Sub<Uint8Array>;
  readonly meta: Sub<unknown>;
  readonly kvs: Sub<unknown>;
  private nextSeq = 1;
  private ackedSeq = 0;
  private readonly writer: GroupCommit<Op>;
  /**
   * The un-acknowledged statuses committed since `recentFrom`, in seq order: the outbox sends
   * them from memory instead of reading back what it just wrote. Older ones (after a restart,
   * a write failure or more than RECENT_MAX) come from LevelDB.
   */
  private readonly recent = new Map<number, TaskStatus>();
  private recentFrom = 1;

  constructor(
    readonly db: Db,
    writer?: GroupCommit<unknown>,
    /** No status may be larger than this (M1): a batch of one must still fit the payload limit. */
    private readonly maxStatusBytes = 128 * 1024,
  ) {
    this.writer = (writer as GroupCommit<Op> | undefined) ?? new GroupCommit<Op>(db as never);
    this.jobs = db.sublevel<string, JobRecord>("job", { valueEncoding: "json" }) as Sub<JobRecord>;
    this.executions = db.sublevel<string, ExecutionRecord>("exec", {
      valueEncoding: "json",
    }) as Sub<ExecutionRecord>;
    this.outbox = db.sublevel<string, Uint8Array>("out", { valueEncoding: "view" }) as Sub<Uint8Array>;
    this.meta = db.sublevel<string, unknown>("meta", { valueEncoding: "json" }) as Sub<unknown>;
    this.kvs = db.sublevel<string, unknown>("kv", { valueEncoding: "json" }) as Sub<unknown>;
  }

  /** This database's epoch (random, made with it): the controller's seq for it starts at 0. */
  epoch = "";
  /**
   * The latest expiry among jobs whose records were compacted away (M14): a job expiring at or
   * before it may have run here, so it is refused even if the clock says it has not expired.
   */
  forgottenUpTo = 0;

  /** Raises the compaction watermark durably, before the records go. */
  async forget(upTo: number): Promise<void> {
    if (upTo <= this.forgottenUpTo) return;
    await this.meta.put("forgottenUpTo", upTo, { sync: true } as never);
    this.forgottenUpTo = upTo;
  }

  async open(): Promise<void> {
    await this.db.open();
    this.forgottenUpTo = ((await this.meta.get("forgottenUpTo")) as number | undefined) ?? 0;
    this.epoch = ((await this.meta.get("epoch")) as string | undefined) ?? "";
    if (!this.epoch) {
      this.epoch = randomBytes(8).toString("hex");
      await this.meta.put("epoch", this.epoch, { sync: true } as never);
    }
    this.ackedSeq = ((await this.meta.get("ackedSeq")) as number | undefined) ?? 0;
    // The next seq is derived from what is on disk, so an unflushed counter can never reuse a seq.
    let last = this.ackedSeq;
    for await (const key of this.outbox.keys({ reverse: true, limit: 1 }))
      last = Math.max(last, Number.parseInt(key, 16));
    const stored = ((await this.meta.get("seq")) as number | undefined) ?? 0;
    this.nextSeq = Math.max(last, stored) + 1;
    this.recentFrom = this.nextSeq;
  }

  async close(): Promise<void> {
    await this.writer.idle();
    await this.db.close();
  }

  get lastAckedSeq(): number {
    return this.ackedSeq;
  }

  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  /** Writes everything in one atomic batch; statuses get their seq here. Commits are serialized. */
  commit(c: Commit, sync: boolean): Promise<TaskStatus[]> {
    const statuses = (c.statuses ?? []).map((s) => ({
      ...boundStatus(s, this.maxStatusBytes),
      seq: this.nextSeq++,
    }));
    const ops: Op[] = [];
    for (const j of c.jobs ?? []) ops.push({ type: "put", sublevel: this.jobs, key: j.jobId, value: j });
    for (const e of c.executions ?? [])
      ops.push({ type: "put", sublevel: this.executions, key: execKey(e.jobId, e.execId), value: e });
    for (const id of c.deleteJobs ?? []) ops.push({ type: "del", sublevel: this.jobs, key: id });
    for (const e of c.deleteExecutions ?? [])
      ops.push({ type: "del", sublevel: this.executions, key: execKey(e.jobId, e.execId) });
    for (const s of statuses)
      ops.push({
        type: "put",
        sublevel: this.outbox,
        key: seqKey(s.seq!),
        value: pb.TaskStatus.encode(s).finish(),
      });
    if (statuses.length) ops.push({ type: "put", sublevel: this.meta, key: "seq", value: this.nextSeq - 1 });
    return this.writer.write(ops, sync).then(
      () => {
        for (const st of statuses) this.recent.set(st.seq, st);
        if (this.recent.size > RECENT_MAX) this.forgetRecent();
        return statuses;
      },
      (err) => {
        this.forgetRecent(); // a gap: read from disk until new statuses follow
        throw err;
      },
    );
  }

  private forgetRecent(): void {
    this.recent.clear();
    this.recentFrom = this.nextSeq;
  }

  /** Drops outbox entries up to `upTo` (a cumulative StatusAck). */
  async ack(upTo: number): Promise<number> {
    if (upTo <= this.ackedSeq) return 0;
    const upper = Math.min(upTo, this.lastSeq);
    const ops: Op[] = [];
    if (this.ackedSeq + 1 >= this.recentFrom) {
      // Everything un-acknowledged is in memory: no need to ask LevelDB which keys exist.
      for (const seq of this.recent.keys()) {
        if (seq > upper) break;
        ops.push({ type: "del", sublevel: this.outbox, key: seqKey(seq) });
        this.recent.delete(seq);
      }
    } else {
      // From the last ack on: everything before it is already deleted (and skipping LevelDB's
      // tombstones of a long outbox history on every ack would make acks quadratic).
      for await (const key of this.outbox.keys({ gt: seqKey(this.ackedSeq), lte: seqKey(upper) }))
        ops.push({ type: "del", sublevel: this.outbox, key });
      for (const seq of this.recent.keys()) {
        if (seq > upper) break;
        this.recent.delete(seq);
      }
    }
    this.ackedSeq = Math.max(this.ackedSeq, upper);
    ops.push({ type: "put", sublevel: this.meta, key: "ackedSeq", value: this.ackedSeq });
    await this.writer.write(ops, false);
    return ops.length - 1;
  }

  /** Un-acked statuses with seq > `after`, oldest first. */
  async pending(after: number, limit: number): Promise<TaskStatus[]> {
    const from = Math.max(after, this.ackedSeq);
    if (from + 1 >= this.recentFrom) {
      const out: TaskStatus[] = [];
      for (const [seq, st] of this.recent) {
        if (seq <= from) continue;
        out.push(st);
        if (out.length >= limit) break;
      }
      return out;
    }
    const out: TaskStatus[] = [];
    for await (const value of this.outbox.values({ gt: seqKey(Math.max(after, this.ackedSeq)), limit }))
      out.push(pb.TaskStatus.decode(value));
    return out;
  }

  async pendingCount(): Promise<number> {
    let n = 0;
    for await (const _ of this.outbox.keys()) n++;
    return n;
  }

  async loadJobs(): Promise<JobRecord[]> {
    return this.jobs.values().all();
  }

  async loadExecutions(): Promise<ExecutionRecord[]> {
    return this.executions.values().all();
  }

  async getMeta<T>(key: string): Promise<T | undefined> {
    return (await this.meta.get(key)) as T | undefined;
  }

  putMeta(key: string, value: unknown): Promise<void> {
    return this.meta.put(key, value);
  }

  /**
   * The key-value store handlers get in their context. Synced (M12): handlers save a state here
   * before acting on it (the software update's "persist, then act"), so a power cut must not
   * lose it.
   */
  readonly kv: KeyValue = {
    get: async <T>(key: string) => (await this.kvs.get(key)) as T | undefined,
    put: (key, value) => this.kvs.put(key, value, { sync: true } as never),
    del: (key) => this.kvs.del(key, { sync: true } as never),
  };
}
