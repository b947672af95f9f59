import { isAbsolute } from "node:path";
import { z } from "zod";
import { TaskFailedError } from "./errors.js";
import { taskEnv, underRoot } from "./paths.js";
import { describeExit, runCommand } from "./process.js";
import { defineHandler } from "./types.js";

/**
 * Variables a job may not set for an allow-listed command (M8): they make the loader, a shell or
 * an interpreter run other code (`BASH_ENV`, `LD_PRELOAD`, `NODE_OPTIONS`, …) or change which
 * program a name means (`PATH`).
 */
const LOADER_ENV =
  /^(LD_|DYLD_|BASH_FUNC_|PYTHON|PERL|RUBY|NODE_|GCONV_|LUA_|JAVA_TOOL|_JAVA_|GIT_|MALLOC_|GLIBC_)/;
const INTERPRETER_ENV = new Set([
  "PATH",
  "BASH_ENV",
  "ENV",
  "SHELLOPTS",
  "BASHOPTS",
  "IFS",
  "PS4",
  "PROMPT_COMMAND",
  "CDPATH",
  "HOSTALIASES",
  "LOCALDOMAIN",
  "RES_OPTIONS",
  "TMPDIR",
  "HOME",
  "FLEET_ROOT",
]);

export function refusedEnv(name: string): string | undefined {
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,127}$/.test(name)) return "not a variable name";
  if (LOADER_ENV.test(name) || INTERPRETER_ENV.has(name))
    return `${name} may not be set by a job (it changes which code runs)`;
  return undefined;
}

const params = z
  .object({
    command: z.string().refine(isAbsolute, "must be an absolute path"),
    args: z.array(z.string()).default([]),
    cwd: z.string().optional(),
    env: z
      .record(z.string(), z.string())
      .default({})
      .superRefine((env, ctx) => {
        for (const name of Object.keys(env)) {
          const why = refusedEnv(name);
          if (why) ctx.addIssue({ code: "custom", path: [name], message: why });
        }
      }),
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
