// Exponential backoff with full jitter: a uniform delay in [0, min(max, min × 2^attempt)), so
// many clients retrying after one outage spread out instead of arriving together. Used by the
// agent's reconnects and the controller's notification retries.

export interface BackoffOptions {
  minMs: number;
  maxMs: number;
  random?: () => number;
}

export function backoffDelay(attempt: number, o: BackoffOptions): number {
  const cap = Math.min(o.maxMs, o.minMs * 2 ** Math.min(attempt, 30));
  return Math.floor((o.random ?? Math.random)() * cap);
}
