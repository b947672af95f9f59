// `fleet notify` (webhook receivers of fleet events) and `fleet audit` (the operator request log).
import type { Command } from "commander";
import { NOTIFY_EVENTS } from "../proto/api.js";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { CliError, EXIT } from "./exit.js";
import { type ListOptions, listOptions, parseDuration, printJson, printList } from "./format.js";
import { withRpc } from "./rpc.js";

/** `--on job.failed,device.offline`: every name checked here, with the list of valid ones. */
export function parseEvents(v: string): Array<(typeof NOTIFY_EVENTS)[number]> {
  const names = v
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);
  const bad = names.filter((n) => !(NOTIFY_EVENTS as readonly string[]).includes(n));
  if (bad.length || !names.length)
    throw new CliError(
      `--on: unknown event${bad.length > 1 ? "s" : ""} ${bad.join(", ") || "(none given)"}; one or more of ${NOTIFY_EVENTS.join(", ")}`,
    );
  return names as Array<(typeof NOTIFY_EVENTS)[number]>;
}

/** `--since 2026-11-28T10:00:00Z` or a duration back from now (`2h`, `30m`, `7d`). */
export function parseSince(v: string): number {
  const at = Date.parse(v);
  if (!Number.isNaN(at) && /\d{4}-\d{2}-\d{2}/.test(v)) return at;
  return Date.now() - parseDuration(v, "--since") * 1000;
}

export function registerNotify(program: Command): void {
  const notify = program.command("notify").description("send fleet events to webhooks (signed, retried)");
  operatorOptions(notify.command("add <name>"))
    .description("add (or replace) a receiver of events")
    .requiredOption("--url <url>", "where to POST the events (http:// or https://)")
    .requiredOption("--on <events>", `comma-separated: ${NOTIFY_EVENTS.join(", ")}`)
    .option("--selector <s>", "only device events of devices matching this label selector")
    .option("--secret <s>", "HMAC-SHA256 key: each request carries X-Fleet-Signature: sha256=<hex>")
    .action(
      async (
        name: string,
        o: OperatorOptions & { url: string; on: string; selector?: string; secret?: string },
      ) => {
        const events = parseEvents(o.on);
        const r = await withRpc(loadContext(o), (rpc) =>
          rpc.call("notify.add", {
            name,
            url: o.url,
            events,
            selector: o.selector ?? "",
            secret: o.secret ?? "",
          }),
        );
        if (o.json) return printJson(r);
        process.stdout.write(
          `receiver ${r.name} added: ${r.events.join(", ")} → ${r.url}${r.signed ? " (signed)" : ""}\n`,
        );
      },
    );
  operatorOptions(notify.command("ls"))
    .description("list receivers: last success, last error, queue length")
    .action(async (o: OperatorOptions) => {
      const list = await withRpc(loadContext(o), (rpc) => rpc.call("notify.ls", {}));
      if (o.json) return printJson(list);
      if (!list.length) return void process.stdout.write("no receivers\n");
      for (const r of list)
        process.stdout.write(
          `${r.name}  ${r.url}\n  on: ${r.events.join(", ")}${r.selector ? `  selector: ${r.selector}` : ""}${r.signed ? "  signed" : ""}\n` +
            `  queued: ${r.queued}  delivered: ${r.delivered}  dropped: ${r.dropped}\n` +
            `  last success: ${r.lastSuccess ?? "never"}\n  last error: ${r.lastError ?? "none"}\n`,
        );
    });
  operatorOptions(notify.command("rm <name>"))
    .description("remove a receiver and its queue")
    .action(async (name: string, o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), (rpc) => rpc.call("notify.rm", { name }));
      if (o.json) return printJson(r);
      process.stdout.write(`receiver ${name} removed\n`);
    });
  operatorOptions(notify.command("test <name>"))
    .description("send a notify.test event now; exit 1 if the receiver does not accept it")
    .action(async (name: string, o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), (rpc) => rpc.call("notify.test", { name }));
      if (o.json) printJson(r);
      else if (r.ok) process.stdout.write(`${name}: delivered (HTTP ${r.status}) in ${r.ms} ms\n`);
      if (!r.ok) throw new CliError(`${name}: not delivered: ${r.error}`, EXIT.FAILED);
    });

  const audit = program.command("audit").description("the log of operator requests (hash-chained)");
  listOptions(operatorOptions(audit.command("ls")))
    .description("list operator requests, oldest first")
    .option("--since <when>", "an ISO time, or how long ago (2h, 7d)")
    .option("--operator <name>", "only this operator's requests")
    .action(async (o: ListOptions & { since?: string; operator?: string }) => {
      const since = o.since !== undefined ? parseSince(o.since) : undefined;
      await withRpc(loadContext(o), (rpc) =>
        printList(rpc.pages("audit.ls", { since, operator: o.operator }, o.limit), o, (e) => ({
          seq: String(e.seq),
          at: e.at,
          operator: e.operator,
          method: e.method,
          result: e.result,
        })),
      );
    });
  operatorOptions(audit.command("verify"))
    .description("recompute the hash chain; exit 1 naming the first entry that does not fit")
    .action(async (o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), (rpc) => rpc.call("audit.verify", {}));
      if (o.json) printJson(r);
      else if (r.ok) process.stdout.write(`audit log intact: ${r.entries} entries\n`);
      if (!r.ok)
        throw new CliError(`audit log broken at entry ${r.broken?.seq}: ${r.broken?.reason}`, EXIT.FAILED);
    });
}
