// The controller's durable state, one LevelDB: devices, jobs (with their signed bytes),
// assignments (one per job and device, carrying the aggregated task states), rollouts, the
// last applied status seq per device, and RPC nonces. Jobs and assignments are reached only
// through job-store.ts. Devices are cached in memory (a few hundred bytes each); assignments are read
// from disk when needed.
import type { AbstractBatchOperation, AbstractSublevel } from "abstract-level";
import { ClassicLevel } from "classic-level";
import { GroupCommit } from "../../common/group-commit.js";

export interface DeviceRecord {
  id: string;
  labels: Record<string, string>;
  tokenHash?: string;
  /** The same secret as Mosquitto's `$7$` PBKDF2-SHA512, for `fleet acl export`. */
  brokerHash?: string;
  createdAt: number;
  lastSeen: number;
  online: boolean;
  agentVersion: string;
  queueDepth: number;
  facts?: Record<string, unknown>;
  /**
   * Serial numbers (hex, upper case) of the client certificates this device may log in with:
   * only the latest one issued (M9). A certificate of a removed, re-added or re-flashed device
   * is refused although the CA signed it.
   */
  certSerials?: string[];
  /** The site gateway this device connects through (DESIGN.md §11). */
  via?: string;
  /** This device is its site's gateway, reachable at these names and port. */
  gateway?: { hosts: string[]; port: number };
  /** A gateway's counters from its last DeviceState (relayed messages, refusals, …). */
  counters?: Record<string, number>;
  /** Where it serves update chunks to its site's peers, and the artifacts it holds (§11). */
  peerUrl?: string;
  artifactsHeld?: string[];
}

/** What a job's tasks name: artifacts (`name@version`) they download, and whether one uploads. */
export interface JobNames {
  artifacts: string[];
  uploads: boolean;
}

/** A job; its signed bytes are stored beside it (job-store.ts). */
export interface JobRecord {
  id: string;
  name: string;
  /** Recorded at submit (absent on jobs from before: the signed job is read instead). */
  names?: JobNames;
  createdAt: number;
  expiresAt: number;
  recurring: boolean;
  tasks: Array<{ id: string; type: string }>;
  target: { deviceIds: string[]; selector: string };
  devices: string[];
  createdBy: string;
  cancelled?: { reason: string; at: number };
  /** Delivered by a rollout: devices are added wave by wave. */
  rolloutId?: string;
  /** Run by a LAN operator at a site gateway while the center was unreachable (DESIGN.md §11). */
  origin?: "site";
  /** The gateway it was run at (origin `site`). */
  site?: string;
  /** Work-queue mode: done when this many devices succeeded. */
  any?: { need: number; selector: string; timeoutS: number; exhausted?: boolean };
}

export interface WaveRecord {
  /** Devices in this and all earlier waves (cumulative target). */
  target: number;
  devices: string[];
  startedAt?: number;
  finishedAt?: number;
  bakeUntil?: number;
}

export type RolloutState = "RUNNING" | "PAUSED" | "SUCCEEDED" | "ABORTED";

export interface RolloutRecord {
  id: string;
  jobId: string;
  name: string;
  selector: string;
  createdAt: number;
  state: RolloutState;
  reason?: string;
  /** Matching devices, in delivery order; waves take consecutive slices. */
  pool: string[];
  waveSpecs: string[];
  waves: WaveRecord[];
  current: number;
  maxFailuresPct: number;
  minFinished: number;
  bakeS: number;
  timeoutS: number;
  gate?: string;
  continuous: boolean;
  force: boolean;
  finishedAt?: number;
}

export interface TaskView {
  type: string;
  state: number;
  attempt: number;
  message: string;
  reason: string;
  output?: string;
  /** An update's bytes by source (local, peers, gateway, center). */
  bytesBySource?: Record<string, number>;
}

export interface Assignment {
  jobId: string;
  deviceId: string;
  /** The device acknowledged it (a job-level QUEUED or REJECTED arrived). */
  acked: boolean;
  state: number; // job-level pb TaskState on this device
  reason: string;
  message: string;
  execId: string;
  tasks: Record<string, TaskView>;
  updatedAt: number;
  runs: number; // finished executions (recurring jobs have many)
  assignedAt?: number;
  /** Ended by the controller (timeout, withdrawal): later device reports do not change the outcome. */
  closed?: boolean;
}

/** One operator request in the hash-chained audit log (audit.ts). */
export interface AuditEntry {
  seq: number;
  at: number;
  operator: string;
  method: string;
  paramsDigest: string;
  result: string;
  prev: string;
  hash: string;
}

/** A notification receiver (notify.ts). */
export interface ReceiverRecord {
  name: string;
  url: string;
  events: string[];
  selector: string;
  secret: string;
  createdAt: number;
  createdBy: string;
  /** How deliveries went (kept across restarts; written without fsync). */
  health?: Health;
}

/** How a receiver's deliveries went. */
export interface Health {
  lastSuccess?: number;
  lastError?: string;
  delivered: number;
  dropped: number;
}

/** A notification waiting for its receiver. */
export interface QueuedNotification {
  id: string;
  event: string;
  at: number;
  fields: Record<string, unknown>;
  attempts: number;
  nextAt: number;
  /** Device events coalesced into this one, oldest first. */
  devices?: Array<{ deviceId: string; at: number }>;
}

/** A bare number is a record from before epochs (epoch ""). */
export type SeqRecord = { epoch: string; seq: number } | number;

type Db = ClassicLevel<string, unknown>;
type Sub<V> = AbstractSublevel<Db, string | Buffer | Uint8Array, string, V>;
export type Op = AbstractBatchOperation<Db, string, unknown>;

export const asgKey = (deviceId: string, jobId: string) => `${deviceId}!${jobId}`;

export class ControllerStore {
  readonly db: Db;
  readonly devices: Sub<DeviceRecord>;
  readonly jobs: Sub<JobRecord>;
  readonly signedJobs: Sub<Uint8Array>;
  readonly assignments: Sub<Assignment>;
  /** The last applied status seq per device, in the epoch of its agent's database. */
  readonly seqs: Sub<SeqRecord>;
  readonly nonces: Sub<number>;
  readonly rollouts: Sub<RolloutRecord>;
  readonly audit: Sub<AuditEntry>;
  /** Notification receivers by name, and their queues (`<name>!<seq>`). */
  readonly receivers: Sub<ReceiverRecord>;
  readonly notifications: Sub<QueuedNotification>;
  private readonly writer: GroupCommit<Op>;

  /** Writes and LevelDB batches/fsyncs so far (`fleet_leveldb_total` in /metrics). */
  get writeStats(): Readonly<GroupCommit<Op>["stats"]> {
    return this.writer.stats;
  }

  constructor(path: string) {
    this.db = new ClassicLevel<string, unknown>(path, { valueEncoding: "json" });
    this.writer = new GroupCommit<Op>(this.db as never);
    this.devices = this.db.sublevel<string, DeviceRecord>("dev", {
      valueEncoding: "json",
    }) as Sub<DeviceRecord>;
    this.jobs = this.db.sublevel<string, JobRecord>("job", { valueEncoding: "json" }) as Sub<JobRecord>;
    this.signedJobs = this.db.sublevel<string, Uint8Array>("signedjob", {
      valueEncoding: "view",
    }) as Sub<Uint8Array>;
    this.assignments = this.db.sublevel<string, Assignment>("asg", {
      valueEncoding: "json",
    }) as Sub<Assignment>;
    this.seqs = this.db.sublevel<string, SeqRecord>("seq", { valueEncoding: "json" }) as Sub<SeqRecord>;
    this.nonces = this.db.sublevel<string, number>("nonce", { valueEncoding: "json" }) as Sub<number>;
    this.rollouts = this.db.sublevel<string, RolloutRecord>("rollout", {
      valueEncoding: "json",
    }) as Sub<RolloutRecord>;
    this.audit = this.db.sublevel<string, AuditEntry>("audit", { valueEncoding: "json" }) as Sub<AuditEntry>;
    this.receivers = this.db.sublevel<string, ReceiverRecord>("notify", {
      valueEncoding: "json",
    }) as Sub<ReceiverRecord>;
    this.notifications = this.db.sublevel<string, QueuedNotification>("notifyq", {
      valueEncoding: "json",
    }) as Sub<QueuedNotification>;
  }

  open(): Promise<void> {
    return this.db.open();
  }

  async close(): Promise<void> {
    await this.writer.idle();
    await this.db.close();
  }

  put<V>(sub: Sub<V>, key: string, value: V): Op {
    return { type: "put", sublevel: sub as never, key, value };
  }

  del<V>(sub: Sub<V>, key: string): Op {
    return { type: "del", sublevel: sub as never, key };
  }

  /** One atomic batch; concurrent batches share one write and fsync (group commit). */
  batch(ops: Op[], sync = true): Promise<void> {
    return this.writer.write(ops, sync);
  }
}
