import type { Command } from "commander";
import { decodeEnvelope } from "../proto/envelope.js";
import { eventsTopic } from "../proto/topics.js";
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
    tasks: Array<{
      id: string;
      type: string;
      state: string;
      attempt: number;
      message: string;
      reason?: string;
      output?: string;
    }>;
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
  for (const d of j.devices) {
    for (const t of d.tasks) {
      if (t.output)
        process.stdout.write(
          `--- ${d.deviceId}/${t.id} output ---\n${t.output}${t.output.endsWith("\n") ? "" : "\n"}`,
        );
    }
  }
}

/**
 * Waits for jobs to be terminal on every target: re-reads a job on each of its events, and at
 * least every 2 s. Subscribe (create it) before submitting, so no event is missed.
 */
export class JobWaiter {
  private readonly seen = new Map<string, number>();
  private wake: (() => void) | undefined;

  private constructor(private readonly rpc: RpcClient) {}

  static async open(rpc: RpcClient, prefix: string): Promise<JobWaiter> {
    const w = new JobWaiter(rpc);
    rpc.client.on("message", (topic, payload) => {
      if (topic !== eventsTopic(prefix)) return;
      try {
        const id = decodeEnvelope(payload).fleetEvent?.jobId;
        if (!id) return;
        w.seen.set(id, (w.seen.get(id) ?? 0) + 1);
        w.wake?.();
      } catch {
        // not ours to judge; the poll catches up
      }
    });
    await rpc.client.subscribeAsync(eventsTopic(prefix), { qos: 0 });
    return w;
  }

  async wait(id: string): Promise<JobJson> {
    for (;;) {
      const before = this.seen.get(id) ?? 0;
      const j = await this.rpc.call<JobJson>("jobs.show", { id });
      if (TERMINAL_JOB_STATES.has(j.state)) return j;
      if ((this.seen.get(id) ?? 0) !== before) continue;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 2000);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = undefined;
    }
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
