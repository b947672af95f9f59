// Publishes the durable status outbox (DESIGN.md §4.3): batches in seq order, a bounded window
// of un-acknowledged statuses in flight, re-send from the last cumulative StatusAck on every
// reconnect and when acks stop arriving. Entries leave the store only on a StatusAck.
import type { Logger } from "pino";
import { encodeEnvelope } from "../proto/envelope.js";
import { pb, type TaskStatus } from "../proto/index.js";
import type { AgentStore } from "./store.js";

const MAX_BATCH_COUNT = 500;
const WINDOW = 2000;
const RESEND_AFTER_MS = 15_000;

export interface OutboxOptions {
  store: AgentStore;
  log: Logger;
  /** Publishes one encoded StatusBatch envelope (QoS 1); false when not connected. */
  publish: (payload: Uint8Array) => boolean;
  /** A batch's statuses take at most this many bytes (the payload limit, less room). */
  maxBatchBytes: number;
}

export class OutboxSender {
  private sentUpTo = 0;
  private flushing = false;
  private again = false;
  private connected = false;
  private lastProgressAt = Date.now();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly o: OutboxOptions) {}

  start(): void {
    this.timer = setInterval(() => this.checkStalled(), 5000);
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.connected = false;
  }

  onConnected(): void {
    this.connected = true;
    this.sentUpTo = this.o.store.lastAckedSeq;
    this.lastProgressAt = Date.now();
    this.flush();
  }

  onDisconnected(): void {
    this.connected = false;
  }

  async onAck(upTo: number): Promise<void> {
    const before = this.o.store.lastAckedSeq;
    await this.o.store.ack(upTo);
    if (upTo > before) this.lastProgressAt = Date.now();
    else if (upTo === before && this.sentUpTo > before) {
      // The controller applies seqs only in order: an ack that does not move while more is
      // out means it is waiting for the next one (lost with a connection): go back to it.
      this.sentUpTo = before;
    }
    if (this.sentUpTo < this.o.store.lastAckedSeq) this.sentUpTo = this.o.store.lastAckedSeq;
    this.flush();
  }

  /** New statuses were committed. */
  flush(): void {
    if (!this.connected) return;
    if (this.flushing) {
      this.again = true;
      return;
    }
    this.flushing = true;
    this.drain()
      .catch((err) => this.o.log.error({ err }, "outbox flush failed"))
      .finally(() => {
        this.flushing = false;
        if (this.again) {
          this.again = false;
          this.flush();
        }
      });
  }

  private async drain(): Promise<void> {
    while (this.connected && this.sentUpTo - this.o.store.lastAckedSeq < WINDOW) {
      const room = WINDOW - (this.sentUpTo - this.o.store.lastAckedSeq);
      const pending = await this.o.store.pending(this.sentUpTo, Math.min(MAX_BATCH_COUNT, room));
      if (!pending.length) return;
      const batch: TaskStatus[] = [];
      let bytes = 0;
      for (const s of pending) {
        const size = pb.TaskStatus.encodeDelimited(s).len;
        if (batch.length && bytes + size > this.o.maxBatchBytes) break;
        batch.push(s);
        bytes += size;
      }
      const body = { statuses: batch, epoch: this.o.store.epoch, ackedSeq: this.o.store.lastAckedSeq };
      if (!this.o.publish(encodeEnvelope({ statusBatch: body }))) return;
      this.sentUpTo = batch[batch.length - 1]!.seq!;
    }
  }

  /** No ack for a while although statuses are out: send again from the last ack. */
  private checkStalled(): void {
    if (!this.connected || this.sentUpTo <= this.o.store.lastAckedSeq) return;
    if (Date.now() - this.lastProgressAt < RESEND_AFTER_MS) return;
    this.o.log.warn({ from: this.o.store.lastAckedSeq }, "no status ack; re-sending the outbox");
    this.sentUpTo = this.o.store.lastAckedSeq;
    this.lastProgressAt = Date.now();
    this.flush();
  }
}
