// Exit codes (DESIGN.md §7): 0 ok, 1 the job/rollout failed, 2 usage or validation, 3 connect/auth.
export const EXIT = { OK: 0, FAILED: 1, USAGE: 2, CONNECT: 3 } as const;

/** An error the CLI reports as one line (no stack trace) with its exit code. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number = EXIT.USAGE,
  ) {
    super(message);
    this.name = "CliError";
  }
}
