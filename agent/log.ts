import pino, { type Logger } from "pino";

/** One logger per process (on stderr, JSON); components take `log.child({ component })`. */
export function createLogger(level = process.env.FLEET_LOG_LEVEL ?? "info"): Logger {
  return pino(
    {
      level,
      base: { pid: process.pid },
      // Secrets never reach a log line, whatever object a caller passes.
      redact: {
        paths: ["password", "*.password", "key", "*.key", "signingKey", "*.signingKey", "token", "*.token"],
        censor: "[redacted]",
      },
    },
    pino.destination({ fd: 2, sync: false }),
  );
}

export type { Logger };

/**
 * Resolves once every line logged so far is on its file descriptor. `Logger.flush(cb)` calls
 * back at once while an asynchronous write is still in flight (sonic-boom with `minLength` 0),
 * and pino flushes on exit only on the main thread: a worker thread that exits after
 * `flush` can lose its last lines (seen in CI).
 */
export function logDrained(log: Logger): Promise<void> {
  const stream = (
    log as unknown as Record<symbol, { _writing?: boolean; once(e: "drain", f: () => void): void }>
  )[pino.symbols.streamSym];
  return new Promise((resolve) => (stream?._writing ? stream.once("drain", resolve) : resolve()));
}
