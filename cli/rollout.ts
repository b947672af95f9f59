import type { Command } from "commander";
import type { RolloutJson } from "../proto/api.js";
import { pb } from "../proto/index.js";
import { signJob } from "../proto/signing.js";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { CliError, EXIT } from "./exit.js";
import { type ListOptions, listOptions, parseDuration, printJson, printList } from "./format.js";
import { buildSpec, readJobFile } from "./jobfile.js";
import { type RpcClient, withRpc } from "./rpc.js";

const TERMINAL = new Set(["SUCCEEDED", "ABORTED"]);

export function bar(done: number, total: number, width = 20): string {
  const n = total ? Math.round((done / total) * width) : 0;
  return `[${"#".repeat(n)}${".".repeat(width - n)}]`;
}

const mib = (n: number) =>
  n >= 1024 * 1024
    ? `${(n / 1024 / 1024).toFixed(1)} MiB`
    : n >= 1024
      ? `${(n / 1024).toFixed(1)} KiB`
      : `${n} B`;

export function renderRollout(r: RolloutJson): string {
  const c = r.counts;
  let out = `rollout ${r.id} (${r.name}) ${r.state}${r.reason ? `: ${r.reason}` : ""}\n`;
  out += `  selector ${r.selector}; ${c.total} devices: ${c.succeeded} succeeded, ${c.failed} failed, ${c.running} running, ${c.pending} pending${c.canceled ? `, ${c.canceled} canceled` : ""}\n`;
  for (const w of r.waves) {
    out += `  wave ${w.wave} ${w.spec.padEnd(5)} ${bar(w.succeeded + w.failed, w.devices)} ${w.succeeded + w.failed}/${w.devices} ${w.state}${w.failed ? ` (${w.failed} failed)` : ""}\n`;
  }
  const bytes = (r as { bytes?: Record<string, number>; bytesSaved?: number }).bytes;
  if (bytes)
    out += `  bytes ${Object.entries(bytes)
      .filter(([, n]) => n)
      .map(([k, n]) => `${k} ${mib(n)}`)
      .join(", ")}; saved ${mib((r as { bytesSaved?: number }).bytesSaved ?? 0)} (not from the center)\n`;
  for (const f of r.failures.slice(0, 5))
    out += `  ! ${f.deviceId} ${f.state} ${f.reason}${f.message ? `: ${f.message}` : ""}\n`;
  return out;
}

async function waitRollout(rpc: RpcClient, id: string): Promise<RolloutJson> {
  for (;;) {
    const r = await rpc.call("rollout.show", { id });
    if (TERMINAL.has(r.state)) return r;
    await new Promise((res) => setTimeout(res, 500));
  }
}

const pct = (v: string) => {
  const m = /^(\d+(?:\.\d+)?)%?$/.exec(v.trim());
  if (!m) throw new CliError(`--max-failures "${v}": want a percentage like 5%`);
  return Number(m[1]);
};

export function registerRollout(program: Command): void {
  const rollout = program
    .command("rollout")
    .description("deliver a job to a selector in waves, with bake times and an abort threshold");
  operatorOptions(rollout.command("create"))
    .description("start a rollout of a job file")
    .requiredOption("-f, --file <job.yaml>", "the job file")
    .requiredOption("--selector <s>", "devices to roll out to")
    .option("--waves <list>", "cumulative wave sizes: counts or percentages", "100%")
    .option("--exponential <base,factor>", "wave sizes base, base*factor, ... instead of --waves")
    .option("--max-failures <pct>", "abort when failures exceed this share of finished devices", "100%")
    .option("--min-finished <n>", "judge the failure rate only after this many finished", "1")
    .option("--bake <d>", "wait this long after a wave before the next", "0")
    .option("--timeout <d>", "a device that has not finished in time ends TIMED_OUT (counts as failed)")
    .option("--gate <g>", "health gate through the bake: online | telemetry:<metric><op><value>")
    .option("--continuous", "devices that match later get the job too")
    .option("--force", "on abort, cancel running tasks too")
    .option("--wait", "wait until SUCCEEDED or ABORTED; exit 1 if aborted")
    .action(async (o: OperatorOptions & Record<string, string | boolean | undefined>) => {
      const ctx = loadContext(o);
      const selector = o.selector as string;
      const spec = buildSpec(readJobFile(o.file as string), { deviceIds: [], selector });
      const signed = Buffer.from(
        pb.SignedJob.encode(signJob(spec, ctx.signingKeyPem, ctx.keyId)).finish(),
      ).toString("base64");
      const params = {
        signedJob: signed,
        selector,
        waves: o.exponential ? undefined : (o.waves as string),
        exponential: o.exponential as string | undefined,
        maxFailuresPct: pct(o.maxFailures as string),
        minFinished: Number.parseInt(o.minFinished as string, 10),
        bakeS: parseDuration(o.bake as string, "--bake"),
        timeoutS: o.timeout ? parseDuration(o.timeout as string, "--timeout") : 0,
        gate: o.gate as string | undefined,
        continuous: Boolean(o.continuous),
        force: Boolean(o.force),
      };
      const r = await withRpc(ctx, async (rpc) => {
        const created = await rpc.call("rollout.create", params);
        if (!o.wait) return created;
        if (!o.json) process.stderr.write(`rollout ${created.id} started; waiting\n`);
        return waitRollout(rpc, created.id);
      });
      if (o.json) printJson(r);
      else process.stdout.write(renderRollout(r));
      if (o.wait && r.state !== "SUCCEEDED") process.exitCode = EXIT.FAILED;
    });
  listOptions(operatorOptions(rollout.command("ls")))
    .description("list rollouts, newest first")
    .option("--active", "only running and paused rollouts")
    .action(async (o: ListOptions & { active?: boolean }) => {
      await withRpc(loadContext(o), (rpc) =>
        printList(rpc.pages("rollout.ls", { active: Boolean(o.active) }, o.limit), o, (x) => ({
          id: x.id,
          name: x.name,
          state: x.state,
          wave: `${x.currentWave}/${x.waves.length}`,
          succeeded: x.counts.succeeded,
          failed: x.counts.failed,
          total: x.counts.total,
        })),
      );
    });
  for (const [name, desc] of [
    ["show", "a rollout: waves, counts, latest failures"],
    ["pause", "start no further wave (the current one goes on)"],
    ["resume", "continue a paused rollout"],
    ["abort", "stop: withdraw undelivered assignments, cancel queued ones (running ones with --force)"],
  ] as const) {
    const cmd = operatorOptions(rollout.command(`${name} <id>`)).description(desc);
    if (name === "abort")
      cmd.option("--force", "cancel running tasks too").option("--reason <text>", "reason");
    cmd.action(async (id: string, o: OperatorOptions & { force?: boolean; reason?: string }) => {
      const params = name === "abort" ? { id, force: o.force, reason: o.reason } : { id };
      const r = await withRpc(loadContext(o), (rpc) => rpc.call(`rollout.${name}`, params));
      if (o.json) return printJson(r);
      process.stdout.write(renderRollout(r));
    });
  }
}
