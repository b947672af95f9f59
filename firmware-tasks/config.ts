import { readFile, rm, stat } from "node:fs/promises";
import { dirname, isAbsolute } from "node:path";
import { z } from "zod";
import { writeFileDurable } from "../common/files.js";
import { TaskFailedError } from "./errors.js";
import { pathAllowed, taskEnv, underRoot } from "./paths.js";
import { describeExit, runCommand } from "./process.js";
import { defineHandler, type TaskContext } from "./types.js";

const argv = z
  .array(z.string())
  .min(1)
  .refine((a) => isAbsolute(a[0]!), "the command must be an absolute path");

const params = z
  .object({
    path: z.string().min(1),
    content: z.string(),
    // Always octal (M7): "0644", "644", "0o644", or a number written in octal digits (YAML reads
    // `mode: 0600` as the number 600, which means 0600 here, never decimal 600 = 0o1130).
    // No setuid, setgid or sticky bit.
    mode: z
      .union([z.number().int().nonnegative(), z.string()])
      .transform((m, ctx) => {
        const digits = String(m).replace(/^0o/, "");
        if (!/^[0-7]{1,4}$/.test(digits)) {
          ctx.addIssue({ code: "custom", message: `"${m}" is not an octal mode like 0644` });
          return z.NEVER;
        }
        const mode = Number.parseInt(digits, 8);
        if (mode > 0o777) {
          ctx.addIssue({
            code: "custom",
            message: `mode ${m}: setuid, setgid and sticky bits are not allowed`,
          });
          return z.NEVER;
        }
        return mode;
      })
      .optional(),
    validate: argv.optional(),
    reload: argv.optional(),
  })
  .strict();

async function runStep(ctx: TaskContext, what: string, cmd: string[], file: string, signal: AbortSignal) {
  const [command, ...args] = cmd.map((a) => a.replaceAll("{path}", file));
  const r = await runCommand(command!, args, {
    cwd: dirname(file),
    env: taskEnv(ctx.root, ctx.scratchDir, { FLEET_CONFIG_PATH: file }),
    signal,
    outputLimit: ctx.policy.outputLimitBytes,
  });
  return { ok: r.code === 0, why: `${what}: ${describeExit(command!, r)}`, output: r.output };
}

export default defineHandler({
  type: "config",
  paramsSchema: params,
  idempotent: true,
  check(p, policy) {
    const outside = pathAllowed(p.path, policy.allowPaths);
    if (outside) return outside;
    for (const c of [p.validate, p.reload]) {
      if (c && !policy.allowShell.includes(c[0]!))
        return `command ${c[0]} is not in this agent's allowShell list`;
    }
    return undefined;
  },
  async run(ctx, p, signal) {
    const file = underRoot(ctx.root, p.path);
    const before = await stat(file).catch(() => undefined);
    const previous = before ? await readFile(file) : undefined;
    const mode = p.mode ?? (before ? before.mode & 0o7777 : 0o644);
    await writeFileDurable(file, p.content, mode);
    ctx.progress(40, "written");
    if (p.validate) {
      const v = await runStep(ctx, "validate", p.validate, file, signal);
      if (!v.ok) {
        if (previous) await writeFileDurable(file, previous, before!.mode & 0o7777);
        else await rm(file, { force: true });
        throw new TaskFailedError(`${v.why}; previous content restored`, {
          reason: "validation_failed",
          output: v.output,
        });
      }
    }
    ctx.progress(70, "validated");
    if (p.reload) {
      const r = await runStep(ctx, "reload", p.reload, file, signal);
      if (!r.ok) throw new TaskFailedError(r.why, { reason: "reload_failed", output: r.output });
    }
    return {
      message: `wrote ${p.path} (${Buffer.byteLength(p.content)} bytes, mode ${mode.toString(8).padStart(4, "0")})`,
    };
  },
});
