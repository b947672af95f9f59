import { resolve } from "node:path";
import type { Command } from "commander";
import { defaultKeyDir, initFleet } from "../broker/init.js";
import { CliError } from "./exit.js";
import { printJson } from "./format.js";

export function registerInit(program: Command): void {
  program
    .command("init")
    .description(
      "create a fleet data directory: operator key, CA + server certificate, credentials, operator.json",
    )
    .option("--dir <dir>", "data directory", "fleet-data")
    .option("--server <url>", "server URL written into operator.json", "mqtt://127.0.0.1:1883")
    .option("--host <name...>", "host names/IPs the server certificate is valid for", [
      "localhost",
      "127.0.0.1",
    ])
    .option("--force", "overwrite an existing directory's keys and credentials")
    .option(
      "--key-dir <dir>",
      "where the operator's signing key goes (never the data directory; default $FLEET_KEY_DIR, else ~/.config/edgefleet/keys)",
    )
    .option("--json", "machine-readable output on stdout")
    .action(
      async (o: {
        dir: string;
        server: string;
        host: string[];
        force?: boolean;
        keyDir?: string;
        json?: boolean;
      }) => {
        const dir = resolve(o.dir);
        const keyDir = resolve(o.keyDir ?? defaultKeyDir());
        if (keyDir === dir || keyDir.startsWith(`${dir}/`))
          throw new CliError(
            `--key-dir ${keyDir} is inside the data directory; keep the signing key elsewhere`,
          );
        const r = await initFleet(dir, { server: o.server, hosts: o.host, force: o.force, keyDir });
        if (o.json)
          return printJson({
            dir,
            created: r.created,
            operator: r.operator,
            context: `${dir}/operator.json`,
            ...(r.keyFile ? { signingKey: r.keyFile } : {}),
          });
        process.stdout.write(
          r.created
            ? `initialized ${dir}\n  operator context: ${dir}/operator.json (operator ${r.operator.username}, key ${r.operator.keyId})\n  signing key: ${r.keyFile} (keep it safe; the server never reads it)\n`
            : `${dir} already initialized (operator ${r.operator.username}, key ${r.operator.keyId}); --force replaces it\n`,
        );
      },
    );
}
