import type { Command } from "commander";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { printJson, table } from "./format.js";
import { type RpcClient, withRpc } from "./rpc.js";

export interface JobJson {
  id: string;
  name: string;
  state: string;
  devices: Array<{
    deviceId: string;
    state: string;
    reason?: string;
    message?: string;
    tasks: Array<{ id: string; type: string; state: string; attempt: number; message: string }>;
  }>;
}

export const TERMINAL_JOB_STATES = new Set(["SUCCEEDED", "FAILED", "CANCELED"]);

export function printJob(j: JobJson): void {
  process.stdout.write(`job ${j.id} ${j.name ? `(${j.name}) ` : ""}${j.state}\n`);
  const rows = j.devices.flatMap(
    (d): Array<Record<string, unknown>> =>
      d.tasks.length && d.state !== "REJECTED"
        ? d.tasks.map((t) => ({
            device: d.deviceId,
            deviceState: d.state,
            task: t.id,
            type: t.type,
            state: t.state,
            attempt: t.attempt,
            message: t.message,
          }))
        : [
            {
              device: d.deviceId,
              deviceState: d.state,
              task: "",
              type: "",
              state: "",
              attempt: "",
              message: [d.reason, d.message].filter(Boolean).join(": "),
            },
          ],
  );
  process.stdout.write(table(rows));
}

/** Polls until the job is terminal on every target. */
export async function waitForJob(
  rpc: RpcClient,
  id: string,
  onChange?: (j: JobJson) => void,
): Promise<JobJson> {
  let last = "";
  for (;;) {
    const j = await rpc.call<JobJson>("jobs.show", { id });
    const sig = JSON.stringify(j.devices.map((d) => [d.state, d.tasks.map((t) => t.state)]));
    if (sig !== last) {
      last = sig;
      onChange?.(j);
    }
    if (TERMINAL_JOB_STATES.has(j.state)) return j;
    await new Promise((r) => setTimeout(r, 250));
  }
}

export function registerJobs(program: Command): void {
  const jobs = program.command("jobs").description("list, show and cancel jobs");
  operatorOptions(jobs.command("ls"))
    .description("list jobs, newest first")
    .option("--device <id>", "only jobs for this device")
    .action(async (o: OperatorOptions & { device?: string }) => {
      const r = await withRpc(loadContext(o), (rpc) =>
        rpc.call<Array<Record<string, unknown>>>("jobs.ls", { device: o.device }),
      );
      if (o.json) return printJson(r);
      process.stdout.write(table(r, ["id", "name", "state", "devices", "createdAt"]));
    });
  operatorOptions(jobs.command("show <job>"))
    .description("a job's state on every device, task by task")
    .action(async (id: string, o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), (rpc) => rpc.call<JobJson>("jobs.show", { id }));
      if (o.json) return printJson(r);
      printJob(r);
    });
  operatorOptions(jobs.command("cancel <job>"))
    .description("cancel a job: undelivered assignments are withdrawn, devices cancel the rest")
    .option("--reason <text>", "reason shown in the statuses", "canceled by operator")
    .action(async (id: string, o: OperatorOptions & { reason: string }) => {
      const r = await withRpc(loadContext(o), (rpc) =>
        rpc.call<JobJson>("jobs.cancel", { id, reason: o.reason }),
      );
      if (o.json) return printJson(r);
      printJob(r);
    });
}
