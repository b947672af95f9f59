// The machine itself, as tasks see it (reboot, boot identity). A dry-run system stands in for
// it in tests and simulations: "booting" is starting the agent process.
import { execFile } from "node:child_process";
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { Logger } from "pino";
import type { SystemPort } from "../firmware-tasks/types.js";

const processBoot = randomUUID();

export function realSystem(rebootCommand: readonly string[], log: Logger): SystemPort {
  return {
    async bootId() {
      try {
        return (await readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
      } catch {
        return processBoot;
      }
    },
    reboot() {
      log.warn({ command: rebootCommand }, "rebooting the machine");
      const [cmd, ...args] = rebootCommand;
      return new Promise((resolve, reject) =>
        execFile(cmd!, args, (err) => (err ? reject(new Error(`reboot failed: ${err.message}`)) : resolve())),
      );
    },
  };
}

/** Boot id = this agent instance; reboot = a log line (the test or simulator restarts the agent). */
export function dryRunSystem(log: Logger): SystemPort {
  const boot = randomUUID();
  return {
    async bootId() {
      return boot;
    },
    async reboot() {
      log.warn("dry-run system: reboot requested (restart the agent to complete it)");
    },
  };
}
