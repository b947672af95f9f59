/**
 * Steps every item once per tick, one tick at a time (a slow tick makes the next one skip,
 * not overlap); a failing item is reported and the others go on.
 */
export class Ticker {
  private busy = false;

  async run<T>(
    items: Iterable<T>,
    step: (item: T) => Promise<void>,
    onError: (item: T, err: unknown) => void,
  ): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      for (const item of [...items]) {
        try {
          await step(item);
        } catch (err) {
          onError(item, err);
        }
      }
    } finally {
      this.busy = false;
    }
  }
}
