import { readFileSync } from "node:fs";
import type { Command } from "commander";
import { pb } from "../proto/index.js";
import { parseSelector, SelectorError } from "../proto/selector.js";
import { signJob } from "../proto/signing.js";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { CliError, EXIT } from "./exit.js";
import { collect, parseDuration, parseKv, printJson } from "./format.js";
import { buildSpec, type JobFile, parseJob, readJobFile } from "./jobfile.js";
import { JobWaiter, printJob, wholeJob } from "./jobs.js";
import { withRpc } from "./rpc.js";

interface RunOptions extends OperatorOptions {
  file?: string;
  param: string[];
  paramsFile?: string;
  device: string[];
  selector?: string;
  priority?: string;
  timeout?: string;
  retries?: string;
  cron?: string;
  name?: string;
  expiresIn?: string;
  wait?: boolean;
  any?: string;
}

function jobFromOptions(type: string | undefined, o: RunOptions): JobFile {
  if (o.file && type) throw new CliError("give a task type or -f JOB.yaml, not both");
  let job: JobFile;
  if (o.file) job = readJobFile(o.file);
  else {
    if (!type) throw new CliError("give a task type (e.g. `fleet run noop`) or -f JOB.yaml");
    let params: Record<string, unknown> = {};
    if (o.paramsFile) {
      try {
        params = JSON.parse(readFileSync(o.paramsFile, "utf8"));
      } catch (err) {
        throw new CliError(`--params-file ${o.paramsFile}: ${(err as Error).message}`);
      }
    }
    params = { ...params, ...parseKv(o.param, "--param", true) };
    job = parseJob({ name: o.name ?? type, tasks: [{ id: type, type, params }] }, "job");
  }
  for (const t of job.tasks) {
    if (o.priority !== undefined) t.priority = Number.parseInt(o.priority, 10);
    if (o.timeout !== undefined) t.timeoutS = parseDuration(o.timeout, "--timeout");
    if (o.retries !== undefined)
      t.retry = { maxAttempts: Number.parseInt(o.retries, 10) + 1, backoffS: 5, factor: 2 };
  }
  if (o.cron) job.schedule = { cron: o.cron, timezone: "UTC" };
  if (o.expiresIn) job.expiresIn = o.expiresIn;
  if (o.name) job.name = o.name;
  return job;
}

export function registerRun(program: Command): void {
  operatorOptions(program.command("run [type]"))
    .description(
      "sign a job and send it to devices: one task (`fleet run shell --param command=/bin/true`) or a job file (-f)",
    )
    .option("-f, --file <job.yaml>", "a job file (YAML or JSON)")
    .option("--param <k=v>", "a task parameter; JSON values are taken as JSON (repeatable)", collect, [])
    .option("--params-file <file>", "task parameters from a JSON file")
    .option("--device <id>", "a target device (repeatable)", collect, [])
    .option("--selector <s>", "target every device whose labels match")
    .option(
      "--any <n>",
      "work-queue: any N matching online devices, least loaded first, re-dispatched on failure",
    )
    .option("--priority <n>", "task priority (higher runs first)")
    .option("--timeout <d>", "per-task timeout, e.g. 30s, 5m")
    .option("--retries <n>", "retries after a failure (exponential backoff from 5 s)")
    .option("--cron <expr>", "run on this schedule on the device (recurring job)")
    .option("--name <name>", "job name")
    .option("--expires-in <d>", "job expiry (default 7d)")
    .option("--wait", "wait until the job is done on every target; exit 1 if any failed")
    .action(async (type: string | undefined, o: RunOptions) => {
      if (!o.device.length && !o.selector)
        throw new CliError("give --device ID (repeatable) or --selector S");
      if (o.device.length && o.selector) throw new CliError("give --device or --selector, not both");
      if (o.selector) {
        try {
          parseSelector(o.selector);
        } catch (err) {
          if (err instanceof SelectorError) throw new CliError(err.message);
          throw err;
        }
      }
      const job = jobFromOptions(type, o);
      if (o.wait && job.schedule)
        throw new CliError("--wait cannot wait for a recurring job (--cron / schedule)");
      const ctx = loadContext(o);
      const target = { deviceIds: o.device, selector: o.selector ?? "" };
      const spec = buildSpec(job, target);
      const signed = Buffer.from(
        pb.SignedJob.encode(signJob(spec, ctx.signingKeyPem, ctx.keyId)).finish(),
      ).toString("base64");
      const started = performance.now();
      const result = await withRpc(ctx, async (rpc) => {
        const waiter = o.wait ? await JobWaiter.open(rpc, ctx.prefix) : undefined;
        const any = o.any === undefined ? undefined : Number.parseInt(o.any, 10);
        if (any !== undefined && !(any >= 1)) throw new CliError("--any wants a number >= 1");
        if (any !== undefined && !o.selector) throw new CliError("--any needs --selector");
        // The controller re-dispatches a device's work after the task timeout plus a grace period.
        const timeoutS = o.timeout ? parseDuration(o.timeout, "--timeout") + 10 : 0;
        const submitted = await rpc.call("job.submit", {
          signedJob: signed,
          ...target,
          ...(any ? { any, timeoutS } : {}),
        });
        if (!waiter) return wholeJob(rpc, await rpc.call("jobs.show", { id: submitted.id }));
        if (!o.json)
          process.stderr.write(`job ${submitted.id} sent to ${submitted.counts.total} device(s); waiting\n`);
        return waiter.wait(submitted.id);
      });
      if (o.json) printJson(result);
      else if (o.wait) {
        printJob(result);
        process.stderr.write(`done in ${((performance.now() - started) / 1000).toFixed(2)}s\n`);
      } else
        process.stdout.write(
          `job ${result.id} sent to ${result.devices.length} device(s): ${result.devices
            .slice(0, 20)
            .map((d) => d.deviceId)
            .join(", ")}${result.devices.length > 20 ? ", …" : ""}\n`,
        );
      if (o.wait && result.state !== "SUCCEEDED") process.exitCode = EXIT.FAILED;
    });
}
