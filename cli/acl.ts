// `fleet acl export --format mosquitto --out DIR`: Mosquitto's password_file, acl_file and a
// listener snippet equivalent to the embedded broker's authentication and ACL, for
// `fleet server --external-broker`. Through the running server (HTTP, operator password), or
// with --dir straight from a stopped server's data directory (the first export, before the
// broker can let the controller in).
import { resolve } from "node:path";
import type { Command } from "commander";
import { paths, readJsonFile, serverConfigSchema } from "../broker/config.js";
import { ControllerStore, type DeviceRecord } from "../broker/controller/store.js";
import { type MosquittoExport, mosquittoExport, writeMosquittoExport } from "../broker/mosquitto.js";
import { loadContext, operatorOptions } from "./context.js";
import { CliError, EXIT } from "./exit.js";
import { printJson } from "./format.js";
import { type HttpOptions, httpBase, request } from "./http.js";

async function fromDataDir(dir: string): Promise<MosquittoExport> {
  const p = paths(dir);
  const config = readJsonFile(p.server, serverConfigSchema);
  const store = new ControllerStore(p.db);
  try {
    await store.open();
  } catch (err) {
    const cause = String((err as { cause?: Error }).cause?.message ?? (err as Error).message);
    if (/lock/i.test(cause))
      throw new CliError(
        `${p.db} is in use by a running fleet server: export through it (without --dir)`,
        EXIT.USAGE,
      );
    throw new CliError(`cannot open ${p.db}: ${cause}`, EXIT.USAGE);
  }
  try {
    const devices: DeviceRecord[] = [];
    for await (const d of store.devices.values()) devices.push(d);
    return mosquittoExport(config, devices);
  } finally {
    await store.close();
  }
}

export function registerAcl(program: Command): void {
  const acl = program.command("acl").description("the broker's authentication and ACL, for external brokers");
  operatorOptions(acl.command("export"))
    .description("write Mosquitto's password_file, acl_file and fleet.conf into DIR")
    .requiredOption("--out <dir>", "directory to write into (created; password_file is 0600)")
    .option("--format <format>", "broker format (only mosquitto)", "mosquitto")
    .option("--dir <dir>", "read a stopped server's data directory instead of asking the server")
    .option("--http <url>", "the server's HTTP URL (default: asked from the server)")
    .action(async (o: HttpOptions & { out: string; format: string; dir?: string }) => {
      if (o.format !== "mosquitto") throw new CliError(`--format ${o.format}: only "mosquitto" is supported`);
      let e: MosquittoExport;
      if (o.dir) e = await fromDataDir(resolve(o.dir));
      else {
        const ctx = loadContext(o);
        e = (await request(ctx, await httpBase(ctx, o), "/v1/acl/mosquitto", {
          method: "GET",
        })) as unknown as MosquittoExport;
      }
      const files = writeMosquittoExport(resolve(o.out), e);
      if (o.json) return printJson({ files, devices: e.devices, skipped: e.skipped });
      process.stdout.write(`wrote ${files.join(", ")} (${e.devices} devices)\n`);
      for (const s of e.skipped) process.stderr.write(`skipped ${s.username}: ${s.reason}\n`);
      process.stdout.write("reload a running Mosquitto with: kill -HUP $(pidof mosquitto)\n");
    });
}
