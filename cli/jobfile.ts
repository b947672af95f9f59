// Job files (DESIGN.md §7): YAML or JSON with the JobSpec's operator-facing fields.
import { readFileSync } from "node:fs";
import { ulid } from "ulid";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { bullets, formatIssues } from "../common/issues.js";
import { type JobSpec, OnUnmet, Trigger } from "../proto/index.js";
import { checkGraph } from "../proto/jobspec.js";
import { CliError, EXIT } from "./exit.js";
import { parseDuration } from "./format.js";

const duration = z.union([z.number(), z.string()]);

const requirement = z
  .object({
    fact: z.string(),
    op: z.enum(["==", "=", "!=", ">=", "<=", ">", "<", "in", "notin", "exists"]),
    value: z.union([z.string(), z.number(), z.array(z.string())]).optional(),
    onUnmet: z.enum(["wait", "fail", "skip"]).default("wait"),
  })
  .strict();

export const taskSchema = z
  .object({
    id: z.string().min(1),
    type: z.string().min(1),
    params: z.record(z.string(), z.unknown()).default({}),
    dependsOn: z.array(z.string()).default([]),
    trigger: z.enum(["all_success", "all_done", "one_failed"]).default("all_success"),
    priority: z.number().int().default(0),
    timeoutS: duration.optional(),
    retry: z
      .object({
        maxAttempts: z.number().int().min(1),
        backoffS: duration.default(5),
        factor: z.number().min(1).default(2),
      })
      .strict()
      .optional(),
    requires: z.array(requirement).default([]),
  })
  .strict();

export const jobFileSchema = z
  .object({
    name: z.string().default(""),
    tasks: z.array(taskSchema).min(1),
    window: z
      .object({ cron: z.string(), duration, timezone: z.string().default("UTC") })
      .strict()
      .optional(),
    schedule: z
      .union([z.string(), z.object({ cron: z.string(), timezone: z.string().default("UTC") }).strict()])
      .optional(),
    expiresIn: duration.default("7d"),
    notBefore: z.string().optional(),
    allowDowngrade: z.boolean().default(false),
  })
  .strict();

export type JobFile = z.output<typeof jobFileSchema>;
export type TaskInput = z.input<typeof taskSchema>;

export function readJobFile(path: string): JobFile {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new CliError(`cannot read job file ${path}: ${(err as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = path.endsWith(".json") ? JSON.parse(text) : parseYaml(text);
  } catch (err) {
    throw new CliError(`job file ${path}: ${(err as Error).message}`);
  }
  return parseJob(raw, path);
}

export function parseJob(raw: unknown, what = "job"): JobFile {
  const r = jobFileSchema.safeParse(raw);
  if (!r.success) throw new CliError(`${what}:\n${bullets(formatIssues(r.error.issues))}`, EXIT.USAGE);
  return r.data;
}

const TRIGGERS = {
  all_success: Trigger.TRIGGER_ALL_SUCCESS,
  all_done: Trigger.TRIGGER_ALL_DONE,
  one_failed: Trigger.TRIGGER_ONE_FAILED,
};
const UNMET = { wait: OnUnmet.ON_UNMET_WAIT, fail: OnUnmet.ON_UNMET_FAIL, skip: OnUnmet.ON_UNMET_SKIP };

/** Builds the JobSpec to sign; refuses a job with a cycle or an unknown dependency before it is sent. */
export function buildSpec(
  job: JobFile,
  target: { deviceIds: string[]; selector: string },
  now = Date.now(),
): JobSpec {
  const spec: JobSpec = {
    jobId: ulid(now),
    name: job.name,
    issuedAtMs: now,
    expiresAtMs: now + parseDuration(job.expiresIn, "expiresIn") * 1000,
    notBeforeMs: job.notBefore ? Date.parse(job.notBefore) : 0,
    allowDowngrade: job.allowDowngrade,
    target,
    tasks: job.tasks.map((t) => ({
      id: t.id,
      type: t.type,
      paramsJson: JSON.stringify(t.params),
      dependsOn: t.dependsOn,
      trigger: TRIGGERS[t.trigger],
      priority: t.priority,
      timeoutS: t.timeoutS === undefined ? 0 : Math.ceil(parseDuration(t.timeoutS, `task ${t.id} timeoutS`)),
      retry: t.retry
        ? {
            maxAttempts: t.retry.maxAttempts,
            backoffS: parseDuration(t.retry.backoffS),
            factor: t.retry.factor,
          }
        : undefined,
      requires: t.requires.map((r) => ({
        fact: r.fact,
        op: r.op,
        value: Array.isArray(r.value) ? r.value.join(",") : String(r.value ?? ""),
        onUnmet: UNMET[r.onUnmet],
      })),
    })),
  };
  if (job.window)
    spec.window = {
      cron: job.window.cron,
      durationS: Math.round(parseDuration(job.window.duration, "window.duration")),
      timezone: job.window.timezone,
    };
  if (job.schedule)
    spec.schedule = typeof job.schedule === "string" ? { cron: job.schedule, timezone: "UTC" } : job.schedule;
  if (Number.isNaN(spec.notBeforeMs)) throw new CliError(`notBefore: "${job.notBefore}" is not a date`);
  const problem = checkGraph(
    spec.tasks!.map((t) => ({ id: t.id!, type: t.type!, dependsOn: t.dependsOn ?? [] })),
  );
  if (problem) throw new CliError(`job refused: ${problem.message}`, EXIT.USAGE);
  return spec;
}
