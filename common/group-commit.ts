// Group commit for LevelDB: a batch is written at once when the disk is idle; batches that
// arrive while a write is in flight are appended, in order, to one batch written next (synced
// if any of them asks for it). Each caller's promise settles when its operations are durable,
// so one fsync serves every change that arrived meanwhile. Each caller's operations stay
// atomic (they are part of one atomic batch) and later operations on a key win, as before.
// Used by the agent's store and the controller's.

interface Writer<Op> {
  batch(ops: Op[], options: { sync: boolean }): Promise<void>;
}

export class GroupCommit<Op> {
  private group: { ops: Op[]; sync: boolean; waiters: Array<(err?: Error) => void> } | undefined;
  private writing: Promise<void> | undefined;
  /**
   * Callers' writes (and of those synced) and what reached LevelDB: batches, synced batches
   * (fsyncs) and operations — the figures of the per-job cost table (issue 17).
   */
  readonly stats = { writes: 0, syncWrites: 0, batches: 0, syncs: 0, ops: 0 };

  constructor(private readonly db: Writer<Op>) {}

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
        await this.db.batch(g.ops, { sync: g.sync });
      } catch (err) {
        failure = err as Error;
      }
      for (const w of g.waiters) w(failure);
    }
    this.writing = undefined;
  }
}
