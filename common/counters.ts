/** Named monotonic counters (dropped payloads by reason, reconnects, ...), reported in DeviceState. */
export class Counters {
  private readonly values = new Map<string, number>();

  inc(name: string, by = 1): void {
    this.values.set(name, (this.values.get(name) ?? 0) + by);
  }

  get(name: string): number {
    return this.values.get(name) ?? 0;
  }

  toObject(): Record<string, number> {
    return Object.fromEntries(this.values);
  }
}
