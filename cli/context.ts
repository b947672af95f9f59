// The operator context (DESIGN.md §7): --context FILE, else $FLEET_CONTEXT, else ./fleet-data/operator.json.
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import type { Command } from "commander";
import {
  BadConfigError,
  type OperatorContext,
  operatorContextSchema,
  readJsonFile,
} from "../broker/config.js";
import { contextPath } from "../broker/init.js";
import { CliError, EXIT } from "./exit.js";

export interface OperatorOptions {
  context?: string;
  server?: string;
  json?: boolean;
}

/** Adds the options every operator command takes. */
export function operatorOptions(cmd: Command): Command {
  return cmd
    .option("--context <file>", "operator context (default $FLEET_CONTEXT, else ./fleet-data/operator.json)")
    .option("--server <url>", "server URL, overriding the context's")
    .option("--json", "machine-readable output on stdout");
}

export interface LoadedContext extends OperatorContext {
  file: string;
  signingKeyPem: string;
  caPem?: string;
}

export function loadContext(o: OperatorOptions): LoadedContext {
  const file = resolve(o.context ?? process.env.FLEET_CONTEXT ?? "fleet-data/operator.json");
  let ctx: OperatorContext;
  try {
    ctx = readJsonFile(file, operatorContextSchema);
  } catch (err) {
    if (err instanceof BadConfigError) {
      throw new CliError(
        `operator context: ${err.message} (run \`fleet init\` or pass --context)`,
        EXIT.USAGE,
      );
    }
    throw err;
  }
  const read = (p: string, what: string) => {
    try {
      return readFileSync(contextPath(file, p), "utf8");
    } catch (err) {
      throw new CliError(`operator context: cannot read ${what} ${p}: ${(err as Error).message}`, EXIT.USAGE);
    }
  };
  const signingKeyPem = ctx.signingKey.includes("BEGIN")
    ? ctx.signingKey
    : read(ctx.signingKey, "signing key");
  const caPem = ctx.caCert
    ? ctx.caCert.includes("BEGIN")
      ? ctx.caCert
      : read(ctx.caCert, "CA certificate")
    : undefined;
  return { ...ctx, server: o.server ?? ctx.server, file, signingKeyPem, caPem };
}
