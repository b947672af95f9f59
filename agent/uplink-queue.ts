// A gateway's store-and-forward queue (DESIGN.md §11): what its site sends up while the uplink
// is down (or the center has not answered the gateway's sync yet) is kept here, in LevelDB, in
// arrival order, and sent when the center is back. Bounded by bytes: telemetry is dropped
// first, oldest first; statuses never — when only statuses fill it, a new one is not queued
// (it stays in its device's outbox, which sends it again at the next sync) and that is counted.
import type { AbstractSublevel } from "abstract-level";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import type { Db } from "./store.js";

export type UplinkKind = "status" | "telemetry";

interface Entry {
  key: string;
  kind: UplinkKind;
  bytes: number;
}

interface Stored {
  topic: string;
  kind: UplinkKind;
  qos: 0 | 1;
  /** base64 */
  payload: string;
}

type Sub = AbstractSublevel<Db, string | Buffer | Uint8Array, string, Stored>;

export interface UplinkQueueOptions {
  db: Db;
  maxBytes: number;
  log: Logger;
  counters: Counters;
  /** The queue's size changed. */
  onChange?(): void;
}

export class UplinkQueue {
  private readonly store: Sub;
  private readonly entries: Entry[] = [];
  private total = 0;
  private next = 0;
  private draining: Promise<void> | undefined;

  constructor(private readonly opts: UplinkQueueOptions) {
    this.store = opts.db.sublevel<string, Stored>("uplink", { valueEncoding: "json" }) as Sub;
  }

  get bytes(): number {
    return this.total;
  }

  get length(): number {
    return this.entries.length;
  }

  async load(): Promise<void> {
    for await (const [key, v] of this.store.iterator()) {
      const bytes = Math.ceil((v.payload.length * 3) / 4) + v.topic.length;
      this.entries.push({ key, kind: v.kind, bytes });
      this.total += bytes;
      this.next = Number.parseInt(key, 16) + 1;
    }
    this.gauge();
  }

  /** False when it could not be queued (a status with the queue full of statuses). */
  async push(topic: string, payload: Buffer, kind: UplinkKind, qos: 0 | 1): Promise<boolean> {
    const bytes = payload.length + topic.length;
    const dels: string[] = [];
    // Oldest telemetry goes first to make room; statuses are never dropped.
    for (let i = 0; this.total + bytes > this.opts.maxBytes && i < this.entries.length; ) {
      const e = this.entries[i]!;
      if (e.kind !== "telemetry") {
        i++;
        continue;
      }
      this.entries.splice(i, 1);
      this.total -= e.bytes;
      dels.push(e.key);
      this.opts.counters.inc("gateway_queue_dropped_telemetry");
    }
    const fits = this.total + bytes <= this.opts.maxBytes;
    if (!fits) {
      this.opts.counters.inc(kind === "telemetry" ? "gateway_queue_dropped_telemetry" : "gateway_queue_full");
      if (kind === "status")
        this.opts.log.warn(
          { bytes: this.total, max: this.opts.maxBytes },
          "uplink queue full of statuses: this one stays in its device's outbox until the next sync",
        );
    }
    const key = fits ? (this.next++).toString(16).padStart(16, "0") : undefined;
    const ops = [
      ...dels.map((k) => ({ type: "del" as const, key: k })),
      ...(key
        ? [{ type: "put" as const, key, value: { topic, kind, qos, payload: payload.toString("base64") } }]
        : []),
    ];
    if (ops.length) await this.store.batch(ops as never);
    if (key) {
      this.entries.push({ key, kind, bytes });
      this.total += bytes;
      this.opts.counters.inc("gateway_queued");
    }
    this.gauge();
    return fits;
  }

  /**
   * Sends everything queued, oldest first, a window at a time; an entry is deleted once sent.
   * `send` returns false when the uplink went down again: the rest stays for the next time.
   */
  drain(send: (topic: string, payload: Buffer, qos: 0 | 1) => Promise<boolean>): Promise<void> {
    this.draining ??= this.drainAll(send).finally(() => {
      this.draining = undefined;
    });
    return this.draining;
  }

  private async drainAll(send: (topic: string, payload: Buffer, qos: 0 | 1) => Promise<boolean>) {
    let sent = 0;
    while (this.entries.length) {
      const window = this.entries.slice(0, 64);
      const values = await this.store.getMany(window.map((e) => e.key));
      const results = await Promise.all(
        window.map((e, i) => {
          const v = values[i];
          return v ? send(v.topic, Buffer.from(v.payload, "base64"), v.qos) : Promise.resolve(true);
        }),
      );
      const done = window.filter((_, i) => results[i]);
      if (done.length) {
        await this.store.batch(done.map((e) => ({ type: "del" as const, key: e.key })) as never);
        const keys = new Set(done.map((e) => e.key));
        for (let i = this.entries.length - 1; i >= 0; i--)
          if (keys.has(this.entries[i]!.key)) {
            this.total -= this.entries[i]!.bytes;
            this.entries.splice(i, 1);
          }
        sent += done.length;
      }
      this.gauge();
      if (done.length < window.length) break;
    }
    if (sent)
      this.opts.log.info(
        { sent, left: this.entries.length },
        "sent what the site queued while the uplink was down",
      );
  }

  private gauge(): void {
    this.opts.counters.set("gateway_queue_bytes", this.total);
    this.opts.counters.set("gateway_queue_messages", this.entries.length);
    this.opts.onChange?.();
  }
}
