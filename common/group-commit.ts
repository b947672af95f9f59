// Group commit for LevelDB: a batch is written at once when the disk is idle; batches that
// arrive while a write is in flight are appended, in order, to one batch written next (synced
// if any of them asks for it). Each caller's promise settles when its operations are durable,
// so one fsync serves every change that arrived meanwhile (up to `maxOps` operations a batch).
// Each caller's operations stay atomic (they are part of one atomic batch) and later operations
// on a key win, as before.
// Used by the agent's store and the controller's.

interface Writer<Op> {
  batch(ops: Op[], options: { sync: boolean }): Promise<void>;
}

export class GroupCommit<Op> {
  /** Groups waiting for the disk, in order; the last one takes new writes until it is full. */
  private readonly groups: Array<{ ops: Op[]; sync: boolean; waiters: Array<(err?: Error) => void> }> = [];
  private writing: Promise<void> | undefined;
  /**
   * Callers' writes (and of those synced) and what reached LevelDB: batches, synced batches
   * (fsyncs) and operations — the figures of the per-job cost table (issue 17).
   */
  readonly stats = { writes: 0, syncWrites: 0, batches: 0, syncs: 0, ops: 0 };

  constructor(
    private readonly db: Writer<Op>,
    /**
     * A group takes no more writes once it holds this many operations (one write is never
     * split): the first writers are done sooner instead of all waiting for one huge batch —
     * thousands of simulated devices on one store then overlap with the server instead of
     * alternating with it (issue 17).
     */
    private readonly maxOps = 2000,
  ) {}

  write(ops: readonly Op[], sync: boolean): Promise<void> {
    this.stats.writes++;
    if (sync) this.stats.syncWrites++;
    return new Promise((resolve, reject) => {
      let g = this.groups[this.groups.length - 1];
      if (!g || (g.ops.length && g.ops.length + ops.length > this.maxOps)) {
        g = { ops: [], sync: false, waiters: [] };
        this.groups.push(g);
      }
      for (const op of ops) g.ops.push(op);
      g.sync ||= sync;
      g.waiters.push((err) => (err ? reject(err) : resolve()));
      this.writing ??= this.drain();
    });
  }

  /** Resolves when nothing is waiting or in flight. */
  async idle(): Promise<void> {
    while (this.writing) await this.writing;
  }

  private async drain(): Promise<void> {
    for (let g = this.groups.shift(); g; g = this.groups.shift()) {
      this.stats.batches++;
      if (g.sync) this.stats.syncs++;
      this.stats.ops += g.ops.length;
      let failure: Error | undefined;
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
