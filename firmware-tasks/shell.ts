import { spawn } from "node:child_process";
import { isAbsolute, relative, resolve } from "node:path";
import { z } from "zod";
import { TaskFailedError } from "./errors.js";
import { OutputTail } from "./output.js";
import { defineHandler } from "./types.js";

const KILL_GRACE_MS = 3000;

const params = z
  .object({
    command: z.string().refine(isAbsolute, "must be an absolute path"),
    args: z.array(z.string()).default([]),
    cwd: z.string().optional(),
    env: z.record(z.string(), z.string()).default({}),
  })
  .strict();

/** Resolves `p` under `root`, refusing anything that escapes it. */
export function underRoot(root: string, p: string): string {
  const abs = resolve(root, p.replace(/^\/+/, ""));
  const rel = relative(root, abs);
  if (rel.startsWith("..") || isAbsolute(rel)) throw new TaskFailedError(`path ${p} escapes the agent root`);
  return abs;
}

export default defineHandler({
  type: "shell",
  paramsSchema: params,
  idempotent: false,
  check(p, policy) {
    return policy.allowShell.includes(p.command)
      ? undefined
      : `command ${p.command} is not in this agent's allowShell list`;
  },
  run(ctx, p, signal) {
    return new Promise((resolveRun, reject) => {
      const out = new OutputTail(ctx.policy.outputLimitBytes);
      // detached: the child leads its own process group, so a timeout kills grandchildren too.
      const child = spawn(p.command, p.args, {
        cwd: p.cwd ? underRoot(ctx.root, p.cwd) : ctx.scratchDir,
        env: {
          PATH: process.env.PATH ?? "/usr/bin:/bin",
          HOME: ctx.scratchDir,
          FLEET_ROOT: ctx.root,
          ...p.env,
        },
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
      signal.addEventListener("abort", onAbort, { once: true });
      child.stdout.on("data", (d: Buffer) => out.write(d));
      child.stderr.on("data", (d: Buffer) => out.write(d));
      child.on("error", (err) => {
        signal.removeEventListener("abort", onAbort);
        reject(new TaskFailedError(`cannot start ${p.command}: ${err.message}`, { reason: "spawn_failed" }));
      });
      child.on("close", (code, sig) => {
        signal.removeEventListener("abort", onAbort);
        if (killTimer) clearTimeout(killTimer);
        // Reap anything the command left behind in its group.
        killGroup("SIGKILL");
        const output = out.toString();
        if (signal.aborted) return reject(signal.reason);
        if (code === 0) return resolveRun({ message: "exit 0", output });
        const why = sig ? `killed by ${sig}` : `exit code ${code}`;
        reject(new TaskFailedError(`${p.command} ${why}`, { reason: "nonzero_exit", output }));
      });
    });
  },
});
