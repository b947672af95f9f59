import type { Command } from "commander";
import type { JobJson } from "../proto/api.js";
import { decodeEnvelope } from "../proto/envelope.js";
import { eventsTopic } from "../proto/topics.js";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { type ListOptions, listOptions, printable, printJson, printList, table } from "./format.js";
import { type RpcClient, withRpc } from "./rpc.js";

/** A job with all of its devices: its first page, then the rest, page by page. */
export async function wholeJob(rpc: RpcClient, first: JobJson): Promise<JobJson> {
  const devices = [...first.devices];
  let next = first.next;
  while (next) {
    const page = await rpc.call("jobs.show", { id: first.id, cursor: next });
    devices.push(...page.devices);
    next = page.next;
  }
  const { next: _, ...rest } = first;
  return { ...rest, devices };
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
          `--- ${d.deviceId}/${t.id} output ---\n${printable(t.output, true)}${t.output.endsWith("\n") ? "" : "\n"}`,
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

  /** Polls the job's state and counts only (small at any size); the devices once it is done. */
  async wait(id: string): Promise<JobJson> {
    for (;;) {
      const before = this.seen.get(id) ?? 0;
      const j = await this.rpc.call("jobs.show", { id, limit: 0 });
      if (TERMINAL_JOB_STATES.has(j.state))
        return wholeJob(this.rpc, await this.rpc.call("jobs.show", { id }));
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
  listOptions(operatorOptions(jobs.command("ls")))
    .description("list jobs, newest first")
    .option("--device <id>", "only jobs for this device")
    .action(async (o: ListOptions & { device?: string }) => {
      await withRpc(loadContext(o), (rpc) =>
        printList(
          rpc.pages("jobs.ls", { device: o.device }, o.limit),
          o,
          // origin: "site" for a job a LAN operator ran at a gateway (DESIGN.md §11).
          (j) => ({ ...j, origin: j.origin ?? "center" }),
          ["id", "name", "state", "devices", "origin", "createdAt"],
        ),
      );
    });
  operatorOptions(jobs.command("show <job>"))
    .description("a job's state on every device, task by task")
    .action(async (id: string, o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), async (rpc) =>
        wholeJob(rpc, await rpc.call("jobs.show", { id })),
      );
      if (o.json) return printJson(r);
      printJob(r);
    });
  operatorOptions(jobs.command("cancel <job>"))
    .description("cancel a job: undelivered assignments are withdrawn, devices cancel the rest")
    .option("--reason <text>", "reason shown in the statuses", "canceled by operator")
    .action(async (id: string, o: OperatorOptions & { reason: string }) => {
      const r = await withRpc(loadContext(o), async (rpc) => {
        await rpc.call("jobs.cancel", { id, reason: o.reason });
        return wholeJob(rpc, await rpc.call("jobs.show", { id }));
      });
      if (o.json) return printJson(r);
      printJob(r);
    });
}
