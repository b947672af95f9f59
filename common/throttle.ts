// A shared byte rate (token bucket): every sender waits its turn so that all together stay
// under `bytesPerSecond` (0 = no limit). Used for the center's artifact bandwidth cap and a
// peer's upload cap (DESIGN.md §11).
import type { Writable } from "node:stream";

const SLICE = 16 * 1024;

export class Throttle {
  private available: number;
  private last = Date.now();
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly bytesPerSecond: number) {
    this.available = bytesPerSecond;
  }

  /** Resolves when `n` bytes may go. */
  take(n: number): Promise<void> {
    if (!this.bytesPerSecond) return Promise.resolve();
    const turn = this.queue.then(async () => {
      for (;;) {
        const now = Date.now();
        // At most one second's worth saved up: a burst never exceeds the rate by more.
        this.available = Math.min(
          this.bytesPerSecond,
          this.available + ((now - this.last) * this.bytesPerSecond) / 1000,
        );
        this.last = now;
        if (this.available >= n || (n > this.bytesPerSecond && this.available >= this.bytesPerSecond)) {
          this.available -= n;
          return;
        }
        await new Promise((r) =>
          setTimeout(r, Math.ceil(((n - this.available) * 1000) / this.bytesPerSecond)),
        );
      }
    });
    this.queue = turn;
    return turn;
  }

  /** Writes `data` to `out` in slices, each when the rate allows, respecting back-pressure. */
  async send(data: Buffer, out: Writable): Promise<void> {
    for (let i = 0; i < data.length; i += SLICE) {
      const piece = data.subarray(i, i + SLICE);
      await this.take(piece.length);
      if (!out.write(piece)) await new Promise((r) => out.once("drain", r));
    }
    if (!data.length) return;
  }
}
