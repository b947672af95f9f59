// `fleet flash`: registers a device and writes its root (DESIGN.md §7): a self-contained agent
// (one esbuild bundle plus classic-level's prebuilt binaries), config.json (0600), a systemd
// unit and the data directory. The root has no absolute symlinks and runs wherever it is moved.
import { chmodSync, cpSync, existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { Command } from "commander";
import { create as createTar } from "tar";
import { parseAgentConfig } from "../agent/config.js";
import { writeFileAtomic, writeSecretJson } from "../common/files.js";
import { isLoopback } from "../common/net.js";
import { contextTrust, loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { CliError, EXIT } from "./exit.js";
import { collect, parseKv, printJson } from "./format.js";
import { withRpc } from "./rpc.js";

const RUN_SCRIPT = `#!/bin/sh
# Starts the EdgeFleet agent of this root: run --root ROOT
DIR=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec node "$DIR/agent.cjs" agent "$@"
`;

const UNIT = `[Unit]
Description=EdgeFleet device agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/opt/fleet-agent/run --root /
Restart=always
RestartSec=5
# Stopping the agent also stops what its shell tasks started.
KillMode=control-group
TimeoutStopSec=20
# Logs go to the journal (bounded by journald's SystemMaxUse); a task or device in a loop cannot
# flood it either.
LogRateLimitIntervalSec=30s
LogRateLimitBurst=2000

[Install]
WantedBy=multi-user.target
`;

/** dist/agent, next to the CLI bundle (dist/fleet.js). */
function agentBundleDir(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  const dir = [join(here, "agent"), join(here, "..", "dist", "agent")].find((d) =>
    existsSync(join(d, "agent.cjs")),
  );
  if (!dir) throw new CliError("agent bundle not found: run `npm run build`", EXIT.FAILED);
  return dir;
}

interface FlashOptions extends OperatorOptions {
  root?: string;
  tar?: string;
  broker?: string;
  label: string[];
  allowShell: string[];
  allowPath: string[];
  mtls?: boolean;
  peerPort: string;
  gatewayDashboardPort?: string;
  peerHost?: string;
  artifactsUrl?: string;
  dryRunSystem?: boolean;
  insecure?: boolean;
  gateway?: boolean;
  gatewayHost: string[];
  gatewayPort?: string;
  via?: string;
}

function hostOf(url: string): string {
  try {
    return new URL(url).hostname.replace(/^\[|\]$/g, "");
  } catch {
    return "";
  }
}

export function registerFlash(program: Command): void {
  operatorOptions(program.command("flash <id>"))
    .description(
      "register a device (if needed) and write its agent root: a directory (--root) or a .tar.gz (--tar)",
    )
    .option("--root <dir>", "write the root into this directory")
    .option("--tar <file>", "write the root as a .tar.gz (for an SD card image)")
    .option(
      "--broker <urls>",
      "broker URL(s) the device connects to, comma-separated, tried in turn (default: the context's server)",
    )
    .option("--label <k=v>", "a device label (repeatable)", collect, [])
    .option("--allow-shell <cmd>", "an absolute path the shell task may run (repeatable)", collect, [])
    .option(
      "--allow-path <path>",
      "where config, backup and software-update may write, relative to the root (repeatable; default anywhere)",
      collect,
      [],
    )
    .option("--mtls", "authenticate with a client certificate from the fleet CA instead of a token")
    .option(
      "--artifacts-url <url>",
      "the server's HTTP URL as the device sees it (default: the server's own)",
    )
    .option("--dry-run-system", "the device's reboots are only logged (demos, tests)")
    .option("--insecure", "allow a plain (unencrypted) broker URL beyond loopback")
    .option("--gateway", "this device is its site's gateway: it also runs a broker for the site (TLS)")
    .option(
      "--gateway-host <name>",
      "a name or address the site's devices reach the gateway at (repeatable)",
      collect,
      [],
    )
    .option("--gateway-port <port>", "the gateway's MQTT/TLS port (default 8883)")
    .option("--gateway-dashboard-port <port>", "the gateway's site dashboard, HTTPS (default 8443; 0 = none)")
    .option("--via <gateway>", "connect through this site gateway (it comes first in the broker list)")
    .option(
      "--peer-port <port>",
      "where it serves update chunks to its site's peers (HTTPS; 0 = any free port)",
      "8445",
    )
    .option(
      "--peer-host <name>",
      "the name or address its peers reach it at (default: its first network address)",
    )
    .action(async (id: string, o: FlashOptions) => {
      if (!o.root === !o.tar) throw new CliError("give exactly one of --root DIR or --tar FILE");
      const labels = parseKv(o.label, "--label") as Record<string, string>;
      const ctx = loadContext(o);
      if (o.gateway && o.via)
        throw new CliError("--gateway and --via: a gateway connects to the center itself");
      const gatewayPort = o.gatewayPort === undefined ? 8883 : Number(o.gatewayPort);
      if (!Number.isInteger(gatewayPort) || gatewayPort < 1 || gatewayPort > 65535)
        throw new CliError(`--gateway-port: "${o.gatewayPort}" is not a port (1-65535)`);
      if (!o.gateway && (o.gatewayHost.length || o.gatewayPort !== undefined))
        throw new CliError("--gateway-host and --gateway-port go with --gateway");
      const gatewayHosts = o.gatewayHost.length ? o.gatewayHost : [id];
      const dashboardPort = o.gatewayDashboardPort === undefined ? 8443 : Number(o.gatewayDashboardPort);
      if (!Number.isInteger(dashboardPort) || dashboardPort < 0 || dashboardPort > 65535)
        throw new CliError(`--gateway-dashboard-port: "${o.gatewayDashboardPort}" is not a port (0-65535)`);
      const peerPort = Number(o.peerPort);
      if (!Number.isInteger(peerPort) || peerPort < 0 || peerPort > 65535)
        throw new CliError(`--peer-port: "${o.peerPort}" is not a port (0-65535)`);
      const center = (o.broker ?? ctx.server)
        .split(",")
        .map((u) => u.trim())
        .filter(Boolean);
      // Behind a gateway: its URL first, the center after it (the fallback).
      const via = o.via ? await withRpc(ctx, (rpc) => rpc.call("device.show", { id: o.via! })) : undefined;
      if (via && !via.gateway) throw new CliError(`${o.via} is not a gateway (flash it with --gateway)`);
      const brokers = via ? [`mqtts://${via.gateway!.hosts[0]}:${via.gateway!.port}`, ...center] : center;
      // A device's token (or the operator's view of it) must not cross a network in clear (M13).
      const clear = brokers.filter((b) => /^(mqtt|ws):\/\//.test(b) && !isLoopback(hostOf(b)));
      if (clear.length && !o.insecure)
        throw new CliError(
          `${clear.join(", ")}: plain MQTT beyond loopback would carry the device's secret in clear; use mqtts:// (or --insecure)`,
        );
      const secure = brokers.every((b) => /^(mqtts|wss):\/\//.test(b));
      const bundle = agentBundleDir();
      const { info, secret, cert, serverCert } = await withRpc(ctx, async (rpc) => {
        const info = await rpc.call("server.info", {});
        const secret = await rpc.call("device.add", {
          id,
          labels,
          rotate: true,
          ...(o.via ? { via: o.via } : {}),
          ...(o.gateway ? { gateway: { hosts: gatewayHosts, port: gatewayPort } } : {}),
        });
        // Every device gets a certificate: its peers check it when it fetches chunks from them,
        // it serves them with it (DESIGN.md §11); with --mtls it also logs in with it.
        const cert = await rpc.call("device.cert", { id });
        const serverCert = o.gateway ? await rpc.call("device.cert", { id, hosts: gatewayHosts }) : undefined;
        return { info, secret, cert, serverCert };
      });
      const trust = contextTrust(ctx, info.caCert);
      const config = {
        deviceId: id,
        brokers,
        username: id,
        ...(o.mtls
          ? { cert: "etc/fleet-agent/client.pem", key: "etc/fleet-agent/client.key" }
          : { password: secret.password }),
        peer: {
          port: peerPort,
          ...(o.peerHost ? { host: o.peerHost } : {}),
          cert: "etc/fleet-agent/client.pem",
          key: "etc/fleet-agent/client.key",
        },
        caCert: "etc/fleet-agent/ca.pem",
        trustedKeys: trust.trustedKeys,
        labels,
        dataDir: "var/lib/fleet-agent",
        allowShell: o.allowShell,
        ...(o.allowPath.length ? { allowPaths: o.allowPath } : {}),
        telemetryIntervalS: 60,
        ...(o.dryRunSystem ? { systemDryRun: true } : {}),
        topicPrefix: info.prefix,
        ...(serverCert
          ? {
              gateway: {
                port: gatewayPort,
                bind: "0.0.0.0",
                cert: "etc/fleet-agent/gateway.pem",
                key: "etc/fleet-agent/gateway.key",
                dashboardPort: dashboardPort,
              },
            }
          : {}),
        // Artifacts over HTTPS for mTLS devices (no token) and for devices that reach the server
        // over TLS (their token must not cross in clear); plain HTTP only beside a plain broker.
        ...((o.artifactsUrl ?? (o.mtls || secure ? info.https : info.http))
          ? { artifactsUrl: o.artifactsUrl ?? (o.mtls || secure ? info.https : info.http) }
          : {}),
      };
      parseAgentConfig(config, "/"); // what we write must be what the agent accepts
      const target = o.root ? resolve(o.root) : mkdtempSync(join(tmpdir(), "fleet-flash-"));
      try {
        const opt = join(target, "opt", "fleet-agent");
        mkdirSync(opt, { recursive: true, mode: 0o755 });
        cpSync(bundle, opt, { recursive: true });
        writeFileAtomic(join(opt, "run"), RUN_SCRIPT, 0o755);
        const etc = join(target, "etc", "fleet-agent");
        writeSecretJson(join(etc, "config.json"), config);
        writeFileAtomic(join(etc, "ca.pem"), trust.caCert);
        writeFileAtomic(join(etc, "client.pem"), cert.certPem);
        writeFileAtomic(join(etc, "client.key"), cert.keyPem, 0o600);
        if (serverCert) {
          writeFileAtomic(join(etc, "gateway.pem"), serverCert.certPem);
          writeFileAtomic(join(etc, "gateway.key"), serverCert.keyPem, 0o600);
        }
        writeFileAtomic(join(target, "etc", "systemd", "system", "fleet-agent.service"), UNIT);
        mkdirSync(join(target, "var", "lib", "fleet-agent"), { recursive: true, mode: 0o700 });
        chmodSync(join(target, "var", "lib", "fleet-agent"), 0o700);
        // Only our own entries: none for /, /etc, /var, /var/lib, /opt, /etc/systemd/system, so
        // unpacking onto a device's file system leaves its directories as they are (H7).
        if (o.tar)
          await createTar({ gzip: true, file: resolve(o.tar), cwd: target, portable: false }, [
            "opt/fleet-agent",
            "etc/fleet-agent",
            "etc/systemd/system/fleet-agent.service",
            "var/lib/fleet-agent",
          ]);
      } finally {
        if (o.tar) rmSync(target, { recursive: true, force: true });
      }
      const out = {
        id,
        root: o.root ? resolve(o.root) : undefined,
        tar: o.tar ? resolve(o.tar) : undefined,
        brokers,
        auth: o.mtls ? "mtls" : "token",
        ...(o.gateway ? { gateway: { hosts: gatewayHosts, port: gatewayPort } } : {}),
        ...(o.via ? { via: o.via } : {}),
      };
      if (o.json) return printJson(out);
      process.stdout.write(
        `flashed ${id} into ${out.root ?? out.tar}\n  start it with: ${o.root ? `${out.root}/opt/fleet-agent/run --root ${out.root}` : "/opt/fleet-agent/run --root / (systemd unit fleet-agent.service)"}\n`,
      );
    });
}
