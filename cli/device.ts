import type { Command } from "commander";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { collect, type ListOptions, listOptions, parseKv, printJson, printList } from "./format.js";
import { withRpc } from "./rpc.js";

export function registerDevice(program: Command): void {
  const device = program.command("device").description("register, list, show and remove devices");
  operatorOptions(device.command("add <id>"))
    .description("register a device; prints its secret once")
    .option("--label <k=v>", "a label (repeatable)", collect, [])
    .action(async (id: string, o: OperatorOptions & { label: string[] }) => {
      const labels = parseKv(o.label, "--label") as Record<string, string>;
      const r = await withRpc(loadContext(o), (rpc) => rpc.call("device.add", { id, labels }));
      if (o.json) return printJson(r);
      process.stdout.write(
        `device ${r.id} registered\n  username: ${r.username}\n  password: ${r.password}\n(the password is shown only now)\n`,
      );
    });
  listOptions(operatorOptions(device.command("ls")))
    .description("list devices (the whole fleet, page by page; --limit N stops early)")
    .option("--selector <s>", "label selector, e.g. env=prod,region in (eu,us)")
    .action(async (o: ListOptions & { selector?: string }) => {
      await withRpc(loadContext(o), (rpc) =>
        printList(rpc.pages("device.ls", { selector: o.selector }, o.limit), o, (d) => ({
          id: d.id,
          online: d.online ? "yes" : "no",
          labels: Object.entries(d.labels)
            .map(([k, v]) => `${k}=${v}`)
            .join(","),
          agent: d.agentVersion,
          via: d.via ?? (d.gateway ? "(gateway)" : ""),
          lastSeen: d.lastSeen ?? "never",
        })),
      );
    });
  operatorOptions(device.command("show <id>"))
    .description("show one device: labels, presence, facts, jobs")
    .action(async (id: string, o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), (rpc) => rpc.call("device.show", { id }));
      if (o.json) return printJson(r);
      process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
    });
  operatorOptions(device.command("rm <id>"))
    .description("remove a device and its credentials")
    .action(async (id: string, o: OperatorOptions) => {
      const r = await withRpc(loadContext(o), (rpc) => rpc.call("device.rm", { id }));
      if (o.json) return printJson(r);
      process.stdout.write(`device ${id} removed\n`);
    });
}
