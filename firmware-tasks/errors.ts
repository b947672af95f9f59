// Named failure kinds a handler may throw; the executor maps them to task states and reasons.

/** The task failed; the retry policy applies. */
export class TaskFailedError extends Error {
  constructor(
    message: string,
    readonly details: { reason?: string; output?: string } = {},
  ) {
    super(message);
    this.name = "TaskFailedError";
  }
}

/** The task failed in a way retrying cannot fix: no further attempts. */
export class UnrecoverableError extends TaskFailedError {
  constructor(message: string, details: { reason?: string; output?: string } = {}) {
    super(message, details);
    this.name = "UnrecoverableError";
  }
}

/** Abort reasons the executor passes through the AbortSignal. */
export class TaskTimeoutError extends Error {
  constructor(readonly timeoutS: number) {
    super(`timed out after ${timeoutS}s`);
    this.name = "TaskTimeoutError";
  }
}

export class TaskCanceledError extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = "TaskCanceledError";
  }
}
