// Group commit for LevelDB: a batch is written at once when the disk is idle; batches that
// arrive while a write is in flight are appended, in order, to one batch written next (synced
// if any of them asks for it). Each caller's promise settles when its operations are durable,
// so one fsync serves every change that arrived meanwhile. Each caller's operations stay
// atomic (they are part of one atomic batch) and later operations on a key win, as before.
// Used by the agent's store and the controller's.
//
// On an open root database with a native batch (classic-level) and no prewrite hook or `write`
// listener, the operations are encoded here — sublevel prefix, key and value encodings, the
// same public abstract-level calls `batch()` makes — and handed to the database's own
// `_batch`. abstract-level's `batch()` costs 5–7 µs of main-thread CPU per operation once its
// operations have mixed shapes (sublevels, puts and dels, JSON and bytes), as the agent's and
// the controller's do; the native batch of the same operations about 1.5 µs (issue 17, B1).
// What is stored is the same bytes under the same keys either way (test/unit/group-commit).

interface Writer<Op> {
  batch(ops: Op[], options: { sync: boolean }): Promise<void>;
}

interface Encoding {
  encode(v: unknown): unknown;
  format: string;
}
/** The parts of an abstract-level database (or sublevel) the native path uses. */
interface Level {
  status?: string;
  keyEncoding(e?: unknown): Encoding;
  valueEncoding(e?: unknown): Encoding;
  prefixKey?(key: unknown, format: string): unknown;
  db?: unknown;
  parent?: unknown;
}
interface NativeRoot extends Level {
  _batch(ops: NativeOp[], options: { sync: boolean }): Promise<void>;
  hooks?: { prewrite?: { noop?: boolean } };
  listenerCount?(event: string): number;
}
interface LevelOp {
  type: "put" | "del";
  key: unknown;
  value?: unknown;
  sublevel?: Level;
  keyEncoding?: unknown;
  valueEncoding?: unknown;
}
interface NativeOp {
  type: "put" | "del";
  key: unknown;
  value: unknown;
  keyEncoding: string;
  valueEncoding: string;
}

/** The operations for `root._batch`, or undefined where only `batch()` can write them. */
function encodeNative(root: NativeRoot, ops: readonly LevelOp[]): NativeOp[] | undefined {
  if (root.status !== "open" || root.hooks?.prewrite?.noop === false || root.listenerCount?.("write")) return undefined;
  const out: NativeOp[] = new Array(ops.length);
  for (let i = 0; i < ops.length; i++) {
    const op = ops[i]!;
    const db = op.sublevel ?? root;
    if (op.sublevel && op.sublevel.db !== root) return undefined; // another database's sublevel
    // batch() throws its own errors for these
    if ((op.type !== "put" && op.type !== "del") || op.key === undefined || op.key === null) return undefined;
    const ke = db.keyEncoding(op.keyEncoding);
    let key = ke.encode(op.key);
    if (op.sublevel) key = op.sublevel.prefixKey!(key, ke.format);
    let value: unknown;
    let valueFormat = "utf8";
    if (op.type === "put") {
      if (op.value === undefined || op.value === null) return undefined; // batch() throws its error
      const ve = db.valueEncoding(op.valueEncoding);
      value = ve.encode(op.value);
      valueFormat = ve.format;
    }
    out[i] = { type: op.type, key, value, keyEncoding: ke.format, valueEncoding: valueFormat };
  }
  return out;
}

export class GroupCommit<Op> {
  private group: { ops: Op[]; sync: boolean; waiters: Array<(err?: Error) => void> } | undefined;
  private writing: Promise<void> | undefined;
  /**
   * Callers' writes (and of those synced) and what reached LevelDB: batches, synced batches
   * (fsyncs) and operations — the figures of the per-job cost table (issue 17).
   */
  readonly stats = { writes: 0, syncWrites: 0, batches: 0, syncs: 0, ops: 0 };

  /** The database, if its native batch can be used (see the top of this file). */
  private readonly native: NativeRoot | undefined;

  constructor(private readonly db: Writer<Op>) {
    const d = db as unknown as Partial<NativeRoot>;
    this.native =
      typeof d._batch === "function" && d.parent === null && typeof d.keyEncoding === "function"
        ? (d as NativeRoot)
        : undefined;
  }

  write(ops: readonly Op[], sync: boolean): Promise<void> {
    this.stats.writes++;
    if (sync) this.stats.syncWrites++;
    return new Promise((resolve, reject) => {
      this.group ??= { ops: [], sync: false, waiters: [] };
      for (const op of ops) this.group.ops.push(op);
      this.group.sync ||= sync;
      this.group.waiters.push((err) => (err ? reject(err) : resolve()));
      this.writing ??= this.drain();
    });
  }

  /** Resolves when nothing is waiting or in flight. */
  async idle(): Promise<void> {
    while (this.writing) await this.writing;
  }

  private async drain(): Promise<void> {
    while (this.group) {
      const g = this.group;
      this.group = undefined;
      let failure: Error | undefined;
      this.stats.batches++;
      if (g.sync) this.stats.syncs++;
      this.stats.ops += g.ops.length;
      try {
        const native = this.native && encodeNative(this.native, g.ops as LevelOp[]);
        if (native) await this.native!._batch(native, { sync: g.sync });
        else await this.db.batch(g.ops, { sync: g.sync });
      } catch (err) {
        failure = err as Error;
      }
      for (const w of g.waiters) w(failure);
    }
    this.writing = undefined;
  }
}
