// The durable status outbox (DESIGN.md §4.3), in one class: statuses get their seq and enter
// LevelDB here (in the same atomic batch as the state they describe), leave it only on a
// cumulative StatusAck, and are published in seq order, in batches, with a bounded window of
// un-acknowledged statuses in flight; re-sent from the last ack on every reconnect and when
// acks stop arriving.
//
// Coalescing (issue 17): statuses committed within one flush window (until the agent goes
// idle, or no commit came for `flushDelayMs` and it is not busy; at most 50 windows: 1 s by
// default where timers fire on time) go out together, and a task's non-terminal status that
// was never sent is overwritten in place — same seq, same key, in the batch that commits its
// successor — so a task that goes QUEUED -> RUNNING -> SUCCEEDED within the window costs one
// record, and the controller still gets every seq, in order, and every terminal state (a
// terminal status is never overwritten). Only the latest status of its job is overwritten: a
// job's statuses keep their order.
//
// A write that fails (disk full, I/O error) has used its seqs, and later writes may already
// have the next ones: a hole the controller would wait at for ever (it applies seqs only in
// order). Such a seq is filled with a "lost" record (`lostStatus`: state unspecified, reason
// `lost_write`, naming the job and task whose status was lost), written as soon as the disk
// takes it; nothing from the lowest hole on is sent meanwhile. A hole left on disk by an
// earlier run is filled at start.
import type { AbstractBatchOperation, AbstractLevel, AbstractSublevel } from "abstract-level";
import type { Logger } from "pino";
import type { GroupCommit } from "../common/group-commit.js";
import { boundStatus } from "../common/output.js";
import { delimitedSize, encodeStatusBatch } from "../proto/envelope.js";
import { LOST_WRITE, pb, type TaskStatus, TERMINAL_STATES } from "../proto/index.js";

const MAX_BATCH_COUNT = 500;
const WINDOW = 2000;
const RESEND_AFTER_MS = 15_000;
/** At most this many un-acknowledged statuses are kept in memory (the rest are read back). */
const RECENT_MAX = 5000;
/** Statuses committed within this long of each other go out in one batch. */
export const FLUSH_DELAY_MS = 20;
/** ... but none waits longer than this many windows (1 s by default, while timers fire on time). */
const MAX_WINDOWS = 50;
/** Acknowledged entries are cleared from disk in bulk, once this many have gathered. */
const CLEAR_EVERY = 64;

type Db = AbstractLevel<string | Buffer | Uint8Array, string, unknown>;
type Sub<V> = AbstractSublevel<Db, string | Buffer | Uint8Array, string, V>;
export type Op = AbstractBatchOperation<Db, string, unknown>;

export interface OutboxSending {
  log: Logger;
  /** Publishes one encoded StatusBatch envelope (QoS 1); false when not connected. */
  publish: (payload: Uint8Array) => boolean;
  /** A batch's statuses take at most this many bytes (the payload limit, less room). */
  maxBatchBytes: number;
  /** The agent is in the middle of something (a task runs, a commit is on its way). */
  busy?: () => boolean;
}

const seqKey = (seq: number) => seq.toString(16).padStart(16, "0");
/** The first retry of a failed fill; then doubled up to FILL_RETRY_MAX_MS. */
const FILL_RETRY_MS = 200;
const FILL_RETRY_MAX_MS = 30_000;

/** What fills the seq of a status that never reached the disk (see the top of this file). */
function lostStatus(seq: number, lost?: TaskStatus): TaskStatus {
  return {
    seq,
    jobId: lost?.jobId ?? "",
    executionId: lost?.executionId ?? "",
    taskId: lost?.taskId ?? "",
    state: 0,
    reason: LOST_WRITE,
    message: "this status was lost: the agent could not write it (disk full or I/O error)",
  };
}

export class Outbox {
  private nextSeq = 1;
  private ackedSeq = 0;
  /**
   * The un-acknowledged statuses committed since `recentFrom`, in seq order, as written to
   * disk: they are sent from memory instead of read back, and not encoded again. Older ones
   * (after a restart, a write failure or more than RECENT_MAX) come from LevelDB.
   */
  private readonly recent = new Map<number, Uint8Array>();
  private recentFrom = 1;
  /** This database's epoch (random, made with it): the controller's seq for it starts at 0. */
  epoch = "";

  private sending: OutboxSending | undefined;
  private sentUpTo = 0;
  private flushing = false;
  private again = false;
  private connected = false;
  private lastProgressAt = Date.now();
  private timer: NodeJS.Timeout | undefined;
  private flushTimer: NodeJS.Timeout | undefined;
  /** Checks made in the current window (the longest window is counted in checks, not ms). */
  private windowChecks = 0;
  /** The highest seq ever published: nothing at or below it is overwritten. */
  private everSent = 0;
  /** Per task (job, execution, task), the seq of its latest status if never sent and not terminal. */
  private readonly unsent = new Map<string, number>();
  /** Per job execution, the seq of its latest status (for the in-place rule). */
  private readonly jobTail = new Map<string, number>();
  /** Seqs being overwritten by a write not yet on disk: nothing from the lowest one on is sent. */
  private readonly rewriting = new Map<number, number>();
  /** Seqs used by a failed write (with the status that was lost), until their fill is on disk. */
  private readonly holes = new Map<number, TaskStatus | undefined>();
  private fillTimer: NodeJS.Timeout | undefined;
  private fillRetryMs = FILL_RETRY_MS;
  /** Stopped (the agent is closing its store): no more fills are written. */
  private stopped = false;
  /** Appends on their way to disk, by number; and the last one past the longest window waits for. */
  private appends = 0;
  private readonly appending = new Set<number>();
  private holdFor: number | undefined;
  /** Acknowledged entries may still be on disk after this seq (see `release`). */
  private clearedUpTo = 0;
  private clearing: Promise<void> | undefined;

  constructor(
    private readonly entries: Sub<Uint8Array>,
    private readonly meta: Sub<unknown>,
    private readonly writer: GroupCommit<Op>,
    /** No status may be larger than this (M1): a batch of one must still fit the payload limit. */
    private readonly maxStatusBytes: number,
    /** The flush window (0: every commit is sent at once, nothing coalesces). */
    private readonly flushDelayMs = FLUSH_DELAY_MS,
  ) {}

  async open(newEpoch: () => string): Promise<void> {
    this.epoch = ((await this.meta.get("epoch")) as string | undefined) ?? "";
    if (!this.epoch) {
      this.epoch = newEpoch();
      await this.meta.put("epoch", this.epoch, { sync: true } as never);
    }
    this.ackedSeq = ((await this.meta.get("ackedSeq")) as number | undefined) ?? 0;
    // The next seq is derived from what is on disk: the newest entry, or the last ack (written
    // with the deletions it allowed). "seq" is no longer written with every status (issue 17);
    // an outbox of an older agent may still have it.
    let last = this.ackedSeq;
    for await (const key of this.entries.keys({ reverse: true, limit: 1 }))
      last = Math.max(last, Number.parseInt(key, 16));
    const stored = ((await this.meta.get("seq")) as number | undefined) ?? 0;
    this.nextSeq = Math.max(last, stored) + 1;
    this.recentFrom = this.nextSeq;
    // Holes a failed write left and the last run did not fill (the un-acknowledged keys only).
    let expect = this.ackedSeq + 1;
    const fills: Op[] = [];
    for await (const key of this.entries.keys({ gt: seqKey(this.ackedSeq) })) {
      const seq = Number.parseInt(key, 16);
      for (; expect < seq; expect++) fills.push(this.fillOp(lostStatus(expect)));
      expect = seq + 1;
    }
    if (fills.length) await this.writer.write(fills, true);
    if (this.ackedSeq) this.clearAcked(); // what the last run acknowledged and left
  }

  /** Resolves when no clearing of acknowledged entries is under way (before closing). */
  async settled(): Promise<void> {
    await this.clearing;
  }

  get lastAckedSeq(): number {
    return this.ackedSeq;
  }

  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  // ---- the durable part ---------------------------------------------------------------------

  /**
   * The one entrance: numbers the statuses and writes them with `ops` (the state they
   * describe) in one atomic batch; once on disk they are sent. Commits are serialized.
   */
  append(statuses: readonly TaskStatus[], ops: Op[], sync: boolean): Promise<TaskStatus[]> {
    const numbered: TaskStatus[] = [];
    /** Seqs this batch overwrites (each, once written, may be sent again). */
    const overwritten: number[] = [];
    for (const status of statuses) {
      const job = `${status.jobId}\0${status.executionId}`;
      const key = status.taskId ? `${job}\0${status.taskId}` : "";
      // No flush window (0): every change is kept and sent, none overwritten.
      const prior = key && this.flushDelayMs ? this.unsent.get(key) : undefined;
      // In place only if nothing of the same job came after it: a job's statuses stay in order.
      const inPlace =
        prior !== undefined &&
        prior > this.everSent &&
        this.recent.has(prior) &&
        this.jobTail.get(job) === prior;
      // A copy (the caller's object may be committed again) — not by spread: protobufjs encoded
      // a `{ ...status, seq }` 4-8x slower than this (its property loads met a fresh map each time).
      const s: TaskStatus = Object.assign({}, boundStatus(status, this.maxStatusBytes));
      s.seq = inPlace ? prior : this.nextSeq++;
      if (inPlace) {
        overwritten.push(prior);
        this.rewriting.set(prior, (this.rewriting.get(prior) ?? 0) + 1);
        const i = numbered.findIndex((n) => n.seq === prior);
        if (i >= 0) numbered.splice(i, 1); // both in this batch: the later one stays
      }
      if (key) {
        if (TERMINAL_STATES.has(s.state!)) this.unsent.delete(key);
        else this.unsent.set(key, s.seq);
      }
      this.jobTail.set(job, s.seq);
      numbered.push(s);
    }
    const encoded = numbered.map((s) => pb.TaskStatus.encode(s).finish());
    for (let i = 0; i < numbered.length; i++)
      ops.push({ type: "put", sublevel: this.entries, key: seqKey(numbered[i]!.seq!), value: encoded[i]! });
    const id = ++this.appends;
    this.appending.add(id);
    const settled = () => {
      this.appending.delete(id);
      for (const seq of overwritten) {
        const n = (this.rewriting.get(seq) ?? 1) - 1;
        if (n > 0) this.rewriting.set(seq, n);
        else this.rewriting.delete(seq);
      }
    };
    return this.writer.write(ops, sync).then(
      () => {
        settled();
        const over = new Set(overwritten);
        // An overwritten one keeps its place in `recent` (seq order) — if still there.
        for (let i = 0; i < numbered.length; i++) {
          const seq = numbered[i]!.seq!;
          if (!over.has(seq) || this.recent.has(seq)) this.recent.set(seq, encoded[i]!);
        }
        if (this.recent.size > RECENT_MAX) this.forgetRecent();
        if (numbered.length) this.flushSoon();
        return numbered;
      },
      (err) => {
        settled();
        const over = new Set(overwritten); // an overwritten seq keeps its earlier record on disk
        for (const st of numbered) if (!over.has(st.seq!)) this.holes.set(st.seq!, st);
        this.forgetRecent(); // read from disk until new statuses follow
        this.fillHoles();
        throw err;
      },
    );
  }

  /**
   * Sends once nothing new was committed for `flushDelayMs` and the agent is not in the middle
   * of something (a task running, a pass or a commit pending: `busy`) — so that a job's
   * transitions, each its own commit, go out together — but at the latest `MAX_WINDOWS`
   * windows after the first unsent commit (or once a commit then on its way has landed): a
   * long task's RUNNING is not held back for long. Sooner when the agent goes idle (`onIdle`).
   *
   * The longest window is counted in checks, not in ms: 1 s on an agent with time to spare,
   * longer on one whose event loop is saturated (its timers fire late). There the successor
   * of what waits is queued behind the same backlog, and a wall-clock bound would split a
   * job's statuses over two batches just when the agent can least afford a third message each
   * way (issue 17).
   */
  private flushSoon(): void {
    if (!this.flushDelayMs) {
      this.flush();
      return;
    }
    if (this.flushTimer) clearTimeout(this.flushTimer);
    else {
      this.windowChecks = 0;
      this.holdFor = undefined; // a new window: nothing to wait for yet
    }
    const check = () => {
      this.flushTimer = undefined;
      // A full batch is waiting: nothing to gain from holding it (a long queue of jobs).
      const full = this.lastSeq - this.sentUpTo >= MAX_BATCH_COUNT;
      // Past the longest window, still wait for the commits then on their way to disk (they
      // land, and usually carry the successor of what waits: a slow disk, or thousands of
      // simulated devices on one, would otherwise split a job's statuses over two batches) —
      // those only, not the ones after them.
      const busy = ++this.windowChecks < MAX_WINDOWS ? this.sending?.busy?.() : this.landing();
      if (!full && busy) {
        this.flushTimer = setTimeout(check, this.flushDelayMs);
        return;
      }
      this.flush();
    };
    this.flushTimer = setTimeout(check, this.flushDelayMs);
  }

  /**
   * The agent has nothing running, scheduled or being written: the transitions a window waits
   * for are all in, so what waits goes out now rather than `flushDelayMs` after the last commit
   * (a job's final status reached the controller 20 ms late).
   */
  onIdle(): void {
    if (!this.flushTimer) return;
    clearTimeout(this.flushTimer);
    this.flushTimer = undefined;
    this.flush();
  }

  /** Whether a commit that was on its way when the longest window ended is still on its way. */
  private landing(): boolean {
    this.holdFor ??= this.appends;
    for (const id of this.appending) if (id <= this.holdFor) return true;
    return false;
  }

  private fillOp(st: TaskStatus): Op {
    return {
      type: "put",
      sublevel: this.entries,
      key: seqKey(st.seq!),
      value: pb.TaskStatus.encode(st).finish(),
    };
  }

  /** Writes the fills of the holes (soon; again, later and later, while the disk refuses). */
  private fillHoles(delayMs = 0): void {
    if (this.fillTimer || !this.holes.size || this.stopped) return; // stopped: the next start fills
    this.fillTimer = setTimeout(() => {
      const filling = [...this.holes].map(([seq, lost]) => lostStatus(seq, lost));
      this.writer
        .write(
          filling.map((st) => this.fillOp(st)),
          true,
        )
        .then(
          () => {
            this.fillTimer = undefined;
            this.fillRetryMs = FILL_RETRY_MS;
            for (const st of filling) this.holes.delete(st.seq!);
            this.flushSoon();
            this.fillHoles();
          },
          (err) => {
            this.fillTimer = undefined;
            this.sending?.log.warn(
              { err, seqs: filling.length },
              "cannot fill the seqs of lost statuses (retried)",
            );
            this.fillRetryMs = Math.min(this.fillRetryMs * 2, FILL_RETRY_MAX_MS);
            this.fillHoles(this.fillRetryMs);
          },
        );
    }, delayMs);
    this.fillTimer.unref?.();
  }

  private forgetRecent(): void {
    this.recent.clear();
    this.unsent.clear(); // only statuses in memory are overwritten
    this.jobTail.clear();
    this.recentFrom = this.nextSeq;
  }

  /**
   * A cumulative StatusAck: only `ackedSeq` is written. The entries it covers are dead from
   * then on (nothing reads at or below it: `pending`, `pendingCount`, `open`) and are cleared
   * in bulk — one range clear in LevelDB's native code per CLEAR_EVERY statuses — rather than
   * a delete each in the batch: three of a `noop` job's thirteen operations (issue 17).
   */
  private async release(upTo: number): Promise<void> {
    if (upTo <= this.ackedSeq) return;
    const upper = Math.min(upTo, this.lastSeq);
    for (const seq of this.recent.keys()) {
      if (seq > upper) break;
      this.recent.delete(seq);
    }
    this.ackedSeq = Math.max(this.ackedSeq, upper);
    await this.writer.write(
      [{ type: "put", sublevel: this.meta, key: "ackedSeq", value: this.ackedSeq }],
      false,
    );
    if (this.ackedSeq - this.clearedUpTo >= CLEAR_EVERY) this.clearAcked();
  }

  /** Clears the acknowledged entries from disk (one clear at a time; a failed one is retried later). */
  private clearAcked(): void {
    if (this.clearing) return;
    const upTo = this.ackedSeq;
    this.clearing = this.entries
      .clear({ gt: seqKey(this.clearedUpTo), lte: seqKey(upTo) })
      .then(
        () => {
          this.clearedUpTo = upTo;
        },
        (err) => this.sending?.log.warn({ err }, "cannot clear acknowledged statuses (retried later)"),
      )
      .finally(() => {
        this.clearing = undefined;
      });
  }

  /** Un-acked statuses with seq > `after`, oldest first. */
  async pending(after: number, limit: number): Promise<TaskStatus[]> {
    return (await this.pendingEncoded(after, limit)).map((e) => pb.TaskStatus.decode(e.bytes));
  }

  /** `pending` as stored: each status's seq and bytes. */
  private async pendingEncoded(
    after: number,
    limit: number,
  ): Promise<Array<{ seq: number; bytes: Uint8Array }>> {
    const from = Math.max(after, this.ackedSeq);
    const out: Array<{ seq: number; bytes: Uint8Array }> = [];
    const held = Math.min(
      this.rewriting.size ? Math.min(...this.rewriting.keys()) : Number.POSITIVE_INFINITY,
      this.holes.size ? Math.min(...this.holes.keys()) : Number.POSITIVE_INFINITY,
    );
    if (from + 1 >= this.recentFrom) {
      for (const [seq, bytes] of this.recent) {
        if (seq <= from) continue;
        if (seq >= held) break;
        out.push({ seq, bytes });
        if (out.length >= limit) break;
      }
      return out;
    }
    for await (const [key, bytes] of this.entries.iterator({ gt: seqKey(from), limit })) {
      const seq = Number.parseInt(key, 16);
      if (seq >= held) break;
      out.push({ seq, bytes });
    }
    return out;
  }

  /** Statuses not yet acknowledged (on disk, from the last ack on). */
  async pendingCount(): Promise<number> {
    let n = 0;
    for await (const _ of this.entries.keys({ gt: seqKey(this.ackedSeq) })) n++;
    return n;
  }

  // ---- the sending part -----------------------------------------------------------------------

  start(sending: OutboxSending): void {
    this.sending = sending;
    this.stopped = false;
    this.timer = setInterval(() => this.checkStalled(), 5000);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.flushTimer) clearTimeout(this.flushTimer);
    if (this.fillTimer) clearTimeout(this.fillTimer);
    this.fillTimer = undefined;
    this.stopped = true;
    this.connected = false;
  }

  onConnected(): void {
    this.connected = true;
    this.sentUpTo = this.ackedSeq;
    this.lastProgressAt = Date.now();
    this.flush();
  }

  onDisconnected(): void {
    this.connected = false;
  }

  async onAck(upTo: number): Promise<void> {
    const before = this.ackedSeq;
    await this.release(upTo);
    if (upTo > before) this.lastProgressAt = Date.now();
    else if (upTo === before && this.sentUpTo > before) {
      // The controller applies seqs only in order: an ack that does not move while more is
      // out means it is waiting for the next one (lost with a connection): go back to it.
      this.sentUpTo = before;
    }
    if (this.sentUpTo < this.ackedSeq) this.sentUpTo = this.ackedSeq;
    this.flush();
  }

  /** Sends what is committed and not yet out, within the window. */
  flush(): void {
    if (!this.connected || !this.sending) return;
    if (this.flushing) {
      this.again = true;
      return;
    }
    const { log } = this.sending;
    this.flushing = true;
    this.drain()
      .catch((err) => log.error({ err }, "outbox flush failed"))
      .finally(() => {
        this.flushing = false;
        if (this.again) {
          this.again = false;
          this.flush();
        }
      });
  }

  private async drain(): Promise<void> {
    const { publish, maxBatchBytes } = this.sending!;
    while (this.connected && this.sentUpTo - this.ackedSeq < WINDOW) {
      const room = WINDOW - (this.sentUpTo - this.ackedSeq);
      const pending = await this.pendingEncoded(this.sentUpTo, Math.min(MAX_BATCH_COUNT, room));
      if (!pending.length) return;
      const batch: Uint8Array[] = [];
      let bytes = 0;
      for (const s of pending) {
        const size = delimitedSize(s.bytes.length);
        if (batch.length && bytes + size > maxBatchBytes) break;
        batch.push(s.bytes);
        bytes += size;
      }
      if (!publish(encodeStatusBatch(batch, this.epoch, this.ackedSeq))) return;
      // Nothing was out: the wait for an ack starts now, not at the last ack (maybe an hour ago).
      if (this.sentUpTo <= this.ackedSeq) this.lastProgressAt = Date.now();
      this.sentUpTo = pending[batch.length - 1]!.seq;
      if (this.sentUpTo > this.everSent) {
        this.everSent = this.sentUpTo;
        for (const [key, seq] of this.unsent) if (seq <= this.everSent) this.unsent.delete(key);
        for (const [job, seq] of this.jobTail) if (seq <= this.everSent) this.jobTail.delete(job);
      }
    }
  }

  /** No ack for a while although statuses are out: send again from the last ack. */
  private checkStalled(): void {
    if (!this.connected || this.sentUpTo <= this.ackedSeq) return;
    if (Date.now() - this.lastProgressAt < RESEND_AFTER_MS) return;
    this.sending?.log.warn({ from: this.ackedSeq }, "no status ack; re-sending the outbox");
    this.sentUpTo = this.ackedSeq;
    this.lastProgressAt = Date.now();
    this.flush();
  }
}
