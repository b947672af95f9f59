// Backoff arithmetic: a task's retries (deterministic, from its signed spec) here, and the
// connection's reconnects (full jitter, common/backoff.ts, shared with the controller).

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

export { type BackoffOptions, backoffDelay } from "../common/backoff.js";
