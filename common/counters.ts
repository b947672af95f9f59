/**
 * Named monotonic counters (dropped payloads by reason, reconnects, ...), reported in
 * DeviceState; a few are gauges (`set`: a gateway's queued bytes, connected devices).
 */
export class Counters {
  private readonly values = new Map<string, number>();

  inc(name: string, by = 1): void {
    this.values.set(name, (this.values.get(name) ?? 0) + by);
  }

  set(name: string, value: number): void {
    this.values.set(name, value);
  }

  get(name: string): number {
    return this.values.get(name) ?? 0;
  }

  toObject(): Record<string, number> {
    return Object.fromEntries(this.values);
  }
}
