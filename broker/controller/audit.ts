// The audit log (DESIGN.md §12): every operator request the controller accepted or refused —
// operator, time, method, a digest of its params, its result — appended to a hash chain in
// LevelDB. Each entry's hash covers the previous entry's hash and its own fields, so altering,
// removing or reordering an entry breaks the chain from there on; `verify` names the first
// entry that does not fit. Appends are serialized (the chain has one tail) and written before
// the request is answered.
import { createHash } from "node:crypto";
import type { AuditEntry, ControllerStore } from "./store.js";

export type { AuditEntry };

const GENESIS = "0".repeat(64);
const key = (seq: number) => seq.toString(16).padStart(16, "0");

export function entryHash(e: Omit<AuditEntry, "hash">): string {
  return createHash("sha256")
    .update(JSON.stringify([e.prev, e.seq, e.at, e.operator, e.method, e.paramsDigest, e.result]))
    .digest("hex");
}

export function paramsDigest(paramsJson: string): string {
  return createHash("sha256").update(paramsJson).digest("hex");
}

export class AuditLog {
  private tail = { seq: 0, hash: GENESIS };
  private chain: Promise<unknown> = Promise.resolve();

  constructor(private readonly store: ControllerStore) {}

  async open(): Promise<void> {
    for await (const e of this.store.audit.values({ reverse: true, limit: 1 }))
      this.tail = { seq: e.seq, hash: e.hash };
  }

  get length(): number {
    return this.tail.seq;
  }

  /** Appends one entry (durably) after every earlier append. */
  append(e: {
    operator: string;
    method: string;
    paramsJson: string;
    result: string;
    at?: number;
  }): Promise<AuditEntry> {
    const next = this.chain.then(async () => {
      const body = {
        seq: this.tail.seq + 1,
        at: e.at ?? Date.now(),
        operator: e.operator,
        method: e.method,
        paramsDigest: paramsDigest(e.paramsJson),
        result: e.result.slice(0, 512),
        prev: this.tail.hash,
      };
      const entry: AuditEntry = { ...body, hash: entryHash(body) };
      await this.store.batch([this.store.put(this.store.audit, key(entry.seq), entry)]);
      this.tail = { seq: entry.seq, hash: entry.hash };
      return entry;
    });
    this.chain = next.catch(() => {});
    return next;
  }

  /** Entries oldest first, after seq `after`, at or after `since`, by `operator` if given. */
  async *entries(o: { after?: number; since?: number; operator?: string } = {}): AsyncGenerator<AuditEntry> {
    for await (const e of this.store.audit.values(o.after ? { gt: key(o.after) } : {})) {
      if (o.since !== undefined && e.at < o.since) continue;
      if (o.operator !== undefined && e.operator !== o.operator) continue;
      yield e;
    }
  }

  /** Recomputes the chain from the start. */
  async verify(): Promise<{ ok: boolean; entries: number; broken?: { seq: number; reason: string } }> {
    let prev = GENESIS;
    let expected = 1;
    let n = 0;
    for await (const [k, e] of this.store.audit.iterator()) {
      n++;
      const at = Number.parseInt(k, 16);
      const fail = (reason: string) => ({ ok: false, entries: n, broken: { seq: at, reason } });
      if (e.seq !== at || at !== expected)
        return fail(at !== expected ? `entry ${expected} is missing` : `entry ${at} claims seq ${e.seq}`);
      if (e.prev !== prev) return fail(`entry ${at} does not follow entry ${at - 1}`);
      const { hash, ...body } = e;
      if (entryHash(body) !== hash)
        return fail(`entry ${at} was altered (its hash does not match its fields)`);
      prev = hash;
      expected++;
    }
    return { ok: true, entries: n };
  }
}
