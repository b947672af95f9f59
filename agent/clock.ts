// Device clocks lie (no RTC, 1970 at boot, NTP jumps). The agent's notion of "now" advances
// at the rate of the monotonic clock and follows the wall clock only while the two agree
// (within a tolerance) and the wall clock is not below the durable floor: the latest
// signed timestamp seen (a verified issued_at). The controller's unsigned time hints set "now"
// but never the floor.

export interface TimeSource {
  wall(): number;
  mono(): number;
}

export const systemTime: TimeSource = { wall: () => Date.now(), mono: () => performance.now() };

export class TrustedClock {
  private anchorTime: number;
  private anchorMono: number;

  constructor(
    private readonly src: TimeSource,
    private floorMs: number,
    private readonly toleranceMs = 5 * 60_000,
  ) {
    const w = src.wall();
    this.anchorTime = Math.max(w, floorMs);
    this.anchorMono = src.mono();
  }

  get floor(): number {
    return this.floorMs;
  }

  now(): number {
    const m = this.src.mono();
    const projected = this.anchorTime + (m - this.anchorMono);
    const w = this.src.wall();
    if (w >= this.floorMs && Math.abs(w - projected) <= this.toleranceMs) {
      this.anchorTime = w;
      this.anchorMono = m;
      return w;
    }
    return projected;
  }

  /** True while the wall clock agrees with the agent's time (so "issued in the future" is meaningful). */
  wallTrusted(): boolean {
    const w = this.src.wall();
    return w >= this.floorMs && Math.abs(w - this.now()) <= this.toleranceMs;
  }

  /**
   * A signed timestamp (a job's issued_at, verified): raises the durable floor and moves "now"
   * up to it. Returns true when the floor moved.
   */
  observe(ts: number): boolean {
    const now = this.now();
    const raised = ts > this.floorMs;
    if (raised) this.floorMs = ts;
    if (ts > now) this.setNow(ts);
    return raised;
  }

  /**
   * The controller's time (TimeHint, SyncResponse): unsigned, so it may set "now" (up, or down
   * when it disagrees by more than the tolerance, never below the floor) but never moves the
   * durable floor — a wrong or forged hint is undone by the next one or by a restart.
   */
  hint(ts: number): void {
    const now = this.now();
    if (ts > now || Math.abs(ts - now) > this.toleranceMs) this.setNow(ts);
  }

  private setNow(ts: number): void {
    this.anchorTime = Math.max(ts, this.floorMs);
    this.anchorMono = this.src.mono();
  }
}
