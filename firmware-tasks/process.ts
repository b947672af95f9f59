// Runs a command as a child process in its own process group: stdout+stderr captured (tail
// kept), the whole group killed on abort (SIGTERM, then SIGKILL after a grace period).
import { spawn } from "node:child_process";
import { OutputTail } from "../common/output.js";
import { TaskFailedError } from "./errors.js";

const KILL_GRACE_MS = 3000;

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  output: string;
}

export function runCommand(
  command: string,
  args: readonly string[],
  o: { cwd: string; env: Record<string, string>; signal: AbortSignal; outputLimit: number },
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const out = new OutputTail(o.outputLimit);
    // detached: the child leads its own process group, so a timeout kills grandchildren too.
    const child = spawn(command, args, {
      cwd: o.cwd,
      env: o.env,
      detached: true,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let killTimer: NodeJS.Timeout | undefined;
    const killGroup = (sig: NodeJS.Signals) => {
      try {
        if (child.pid) process.kill(-child.pid, sig);
      } catch {
        // already gone
      }
    };
    const onAbort = () => {
      killGroup("SIGTERM");
      killTimer = setTimeout(() => killGroup("SIGKILL"), KILL_GRACE_MS);
    };
    o.signal.addEventListener("abort", onAbort, { once: true });
    child.stdout.on("data", (d: Buffer) => out.write(d));
    child.stderr.on("data", (d: Buffer) => out.write(d));
    child.on("error", (err) => {
      o.signal.removeEventListener("abort", onAbort);
      reject(new TaskFailedError(`cannot start ${command}: ${err.message}`, { reason: "spawn_failed" }));
    });
    child.on("close", (code, sig) => {
      o.signal.removeEventListener("abort", onAbort);
      if (killTimer) clearTimeout(killTimer);
      killGroup("SIGKILL"); // reap anything the command left behind in its group
      if (o.signal.aborted) return reject(o.signal.reason);
      resolve({ code, signal: sig, output: out.toString() });
    });
  });
}

export function describeExit(command: string, r: RunResult): string {
  return `${command} ${r.signal ? `killed by ${r.signal}` : `exit code ${r.code}`}`;
}
