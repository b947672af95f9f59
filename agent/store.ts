// The agent's durable state on LevelDB (any abstract-level database: a ClassicLevel on
// disk, or a sublevel of a shared one for simulated devices).
//
// Write classes and LevelDB `sync` (what a power cut may lose):
//  - accepting a job (job record + QUEUED status + the time   sync  — a PUBACK follows it; one
//    floor its signed timestamp raised):                             write per job.
//  - RUNNING and terminal task states (+ their statuses):   sync  — crash recovery relies on them
//                                                                   (persist, then act).
//  - WAITING/progress states:                               async — losing one re-derives it on start.
//  - the outbox's ack mark after a StatusAck (acknowledged entries are cleared in bulk later),
//    facts, time floor:                                     async — losing one only re-sends or
//                                                                   re-measures; sends are idempotent.
import { randomBytes } from "node:crypto";
import type { AbstractBatchOperation, AbstractLevel, AbstractSublevel } from "abstract-level";
import { GroupCommit } from "../common/group-commit.js";
import type { KeyValue } from "../firmware-tasks/types.js";
import type { TaskStatus } from "../proto/index.js";
import { Outbox } from "./outbox.js";

export interface TaskRun {
  state: number; // pb TaskState
  attempt: number;
  progress: number;
  message: string;
  reason: string;
  output?: string;
  /** An update's bytes by where they came from (local, peers, gateway, center). */
  bytesBySource?: Record<string, number>;
  droppedPeers?: string[];
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

export interface StoredJob {
  jobId: string;
  digest: string;
  /** The serialized SignedJob, kept verbatim (stored as bytes beside the record). */
  signed: Uint8Array;
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
  jobs?: StoredJob[];
  executions?: ExecutionRecord[];
  statuses?: TaskStatus[];
  deleteJobs?: string[];
  deleteExecutions?: Array<{ jobId: string; execId: string }>;
  /** Meta values written in the same batch (the time floor a newly accepted job raised). */
  meta?: Record<string, unknown>;
}

type Op = AbstractBatchOperation<Db, string, unknown>;

const execKey = (jobId: string, execId: string) => `${jobId}!${execId}`;

/** A job record as stored: its signed bytes live in their own sublevel, not as base64. */
type JobMeta = Omit<StoredJob, "signed"> & { signed?: string };

export class AgentStore {
  readonly jobs: Sub<JobMeta>;
  readonly signedJobs: Sub<Uint8Array>;
  readonly executions: Sub<ExecutionRecord>;
  readonly meta: Sub<unknown>;
  readonly kvs: Sub<unknown>;
  readonly outbox: Outbox;
  private readonly writer: GroupCommit<Op>;

  constructor(
    readonly db: Db,
    writer?: GroupCommit<unknown>,
    /** No status may be larger than this (M1): a batch of one must still fit the payload limit. */
    maxStatusBytes = 128 * 1024,
    /** The outbox's flush window (statuses coalesce within it). */
    statusFlushMs?: number,
  ) {
    this.writer = (writer as GroupCommit<Op> | undefined) ?? new GroupCommit<Op>(db as never);
    this.jobs = db.sublevel<string, JobMeta>("job", { valueEncoding: "json" }) as Sub<JobMeta>;
    this.signedJobs = db.sublevel<string, Uint8Array>("signed", { valueEncoding: "view" }) as Sub<Uint8Array>;
    this.executions = db.sublevel<string, ExecutionRecord>("exec", {
      valueEncoding: "json",
    }) as Sub<ExecutionRecord>;
    this.meta = db.sublevel<string, unknown>("meta", { valueEncoding: "json" }) as Sub<unknown>;
    this.kvs = db.sublevel<string, unknown>("kv", { valueEncoding: "json" }) as Sub<unknown>;
    const entries = db.sublevel<string, Uint8Array>("out", { valueEncoding: "view" }) as Sub<Uint8Array>;
    this.outbox = new Outbox(
      entries as never,
      this.meta as never,
      this.writer as never,
      maxStatusBytes,
      statusFlushMs,
    );
  }

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
    await this.outbox.open(() => randomBytes(8).toString("hex"));
  }

  async close(): Promise<void> {
    await this.outbox.settled();
    await this.writer.idle();
    await this.db.close();
  }

  /** Writes everything in one atomic batch, statuses through the outbox (which numbers them). */
  commit(c: Commit, sync: boolean): Promise<TaskStatus[]> {
    const ops: Op[] = [];
    for (const { signed, ...j } of c.jobs ?? []) {
      ops.push({ type: "put", sublevel: this.jobs, key: j.jobId, value: j });
      ops.push({ type: "put", sublevel: this.signedJobs, key: j.jobId, value: signed });
    }
    for (const e of c.executions ?? [])
      ops.push({ type: "put", sublevel: this.executions, key: execKey(e.jobId, e.execId), value: e });
    for (const id of c.deleteJobs ?? []) {
      ops.push({ type: "del", sublevel: this.jobs, key: id });
      ops.push({ type: "del", sublevel: this.signedJobs, key: id });
    }
    for (const e of c.deleteExecutions ?? [])
      ops.push({ type: "del", sublevel: this.executions, key: execKey(e.jobId, e.execId) });
    for (const [key, value] of Object.entries(c.meta ?? {}))
      ops.push({ type: "put", sublevel: this.meta, key, value });
    return this.outbox.append(c.statuses ?? [], ops, sync);
  }

  async loadJobs(): Promise<StoredJob[]> {
    const out: StoredJob[] = [];
    for (const { signed, ...j } of await this.jobs.values().all()) {
      // Records written before signed jobs were kept as bytes carry them as base64.
      const bytes = signed !== undefined ? Buffer.from(signed, "base64") : await this.signedJobs.get(j.jobId);
      out.push({ ...j, signed: bytes ?? new Uint8Array() }); // missing: fails to decode, counted
    }
    return out;
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
