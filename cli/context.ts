// The operator context (DESIGN.md §7): --context FILE, else $FLEET_CONTEXT, else ./fleet-data/operator.json.
import { createPrivateKey, createPublicKey } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import type { Command } from "commander";
import {
  BadConfigError,
  listeningSchema,
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
  return { ...ctx, server: o.server ?? runningServer(file, ctx.server), file, signingKeyPem, caPem };
}

/**
 * A server started on other ports than the context names records where it listens in
 * listening.json in its data directory; a context kept in that directory follows it: the same
 * host and scheme, the running server's port. Anything unreadable or stale leaves `server`.
 */
function runningServer(contextFile: string, server: string): string {
  const file = join(dirname(contextFile), "listening.json");
  if (!existsSync(file)) return server;
  try {
    const l = readJsonFile(file, listeningSchema);
    process.kill(l.pid, 0); // throws if that server is gone
    const url = new URL(server);
    const scheme = url.protocol.replace(":", "");
    const recorded = { mqtt: l.mqtt, mqtts: l.mqtts, ws: l.ws, wss: undefined }[scheme];
    const port = recorded ? new URL(recorded).port : "";
    if (!port) return server;
    url.port = port;
    return url.toString().replace(/\/$/, "");
  } catch {
    return server;
  }
}

/**
 * What a device flashed from this context trusts (H4): the operator's own key, the keys the
 * context lists, and the context's CA — never what a server says. A server whose CA is not
 * the context's is refused.
 */
export function contextTrust(
  ctx: LoadedContext,
  serverCa: string,
): { trustedKeys: Array<{ keyId: string; publicKey: string }>; caCert: string } {
  if (!ctx.caPem)
    throw new CliError(`operator context ${ctx.file} has no caCert: devices would not know whom to trust`);
  if (serverCa.trim() !== ctx.caPem.trim())
    throw new CliError(
      `the server at ${ctx.server} presents another fleet CA than ${ctx.file} names; refusing (is it your server?)`,
      EXIT.CONNECT,
    );
  const own = createPublicKey(createPrivateKey(ctx.signingKeyPem))
    .export({ type: "spki", format: "pem" })
    .toString();
  const others = ctx.trustedKeys.filter((k) => k.keyId !== ctx.keyId);
  return { trustedKeys: [{ keyId: ctx.keyId, publicKey: own }, ...others], caCert: ctx.caPem };
}
