// Backoff arithmetic, in one place: a task's retries (deterministic, from its signed spec) and
// the connection's reconnects (full jitter, so a broker restart does not become a storm).

export interface RetryPolicy {
  maxAttempts?: number | null;
  backoffS?: number | null;
  factor?: number | null;
}

/**
 * After attempt `attempt` (1-based) of a task failed: the delay before the next one, or
 * undefined when no attempt is left. Delay = backoffS × factor^(attempt−1), factor 2 by default.
 */
export function retryDelay(policy: RetryPolicy | null | undefined, attempt: number): number | undefined {
  const max = Math.max(1, policy?.maxAttempts ?? 1);
  const done = Math.max(1, attempt);
  if (done >= max) return undefined;
  const factor = policy?.factor || 2;
  return (policy?.backoffS ?? 0) * 1000 * factor ** (done - 1);
}

export interface BackoffOptions {
  minMs: number;
  maxMs: number;
  random?: () => number;
}

/** Full jitter: a uniform delay in [0, min(max, min × 2^attempt)). */
export function backoffDelay(attempt: number, o: BackoffOptions): number {
  const cap = Math.min(o.maxMs, o.minMs * 2 ** Math.min(attempt, 30));
  return Math.floor((o.random ?? Math.random)() * cap);
}
