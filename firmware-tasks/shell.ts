import { isAbsolute } from "node:path";
import { z } from "zod";
import { TaskFailedError } from "./errors.js";
import { taskEnv, underRoot } from "./paths.js";
import { describeExit, runCommand } from "./process.js";
import { defineHandler } from "./types.js";

const params = z
  .object({
    command: z.string().refine(isAbsolute, "must be an absolute path"),
    args: z.array(z.string()).default([]),
    cwd: z.string().optional(),
    env: z.record(z.string(), z.string()).default({}),
  })
  .strict();

export default defineHandler({
  type: "shell",
  paramsSchema: params,
  idempotent: false,
  check(p, policy) {
    return policy.allowShell.includes(p.command)
      ? undefined
      : `command ${p.command} is not in this agent's allowShell list`;
  },
  async run(ctx, p, signal) {
    const r = await runCommand(p.command, p.args, {
      cwd: p.cwd ? underRoot(ctx.root, p.cwd) : ctx.scratchDir,
      env: taskEnv(ctx.root, ctx.scratchDir, p.env),
      signal,
      outputLimit: ctx.policy.outputLimitBytes,
    });
    if (r.code === 0) return { message: "exit 0", output: r.output };
    throw new TaskFailedError(describeExit(p.command, r), { reason: "nonzero_exit", output: r.output });
  },
});
