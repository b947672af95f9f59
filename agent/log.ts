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
