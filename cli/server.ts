import { hostname } from "node:os";
import { resolve } from "node:path";
import type { Command } from "commander";
import { createLogger } from "../agent/log.js";
import { BadConfigError } from "../broker/config.js";
import { FleetServer, type ServerOptions } from "../broker/server.js";
import { CliError, EXIT } from "./exit.js";

const port = (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new CliError(`"${v}" is not a port`);
  return n;
};

export function registerServer(program: Command): void {
  program
    .command("server")
    .description("run the fleet server: embedded MQTT broker (TCP, TLS, WebSocket), controller, HTTP")
    .option("--dir <dir>", "data directory (initialized on first start)", "fleet-data")
    .option("--host <host>", "address the TLS listeners (MQTT/TLS, HTTPS) listen on", "0.0.0.0")
    .option(
      "--plain-host <host>",
      "address the plain listeners (MQTT, WebSocket, HTTP) listen on; beyond loopback they carry secrets in clear",
      "127.0.0.1",
    )
    .option("--mqtt-port <port>", "MQTT over TCP", port, 1883)
    .option("--mqtts-port <port>", "MQTT over TLS", port, 8883)
    .option("--ws-port <port>", "MQTT over WebSocket", port, 8083)
    .option("--http-port <port>", "HTTP: artifacts, /healthz, /metrics", port, 8080)
    .option("--https-port <port>", "HTTPS: artifacts for devices with client certificates", port, 8443)
    .option(
      "--external-broker <url>",
      "use this MQTT 3.1.1 broker (e.g. Mosquitto, see `fleet acl export`) instead of the embedded one",
    )
    .option("--cluster <redis-url>", "join a cluster of broker nodes sharing this Redis (redis://HOST:PORT)")
    .option("--node-id <id>", "this node's name in the cluster (default: host name and MQTT port)")
    .option(
      "--lease-ms <ms>",
      "controller lease: a standby takes over this long after the leader dies",
      (v: string) => {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1000) throw new CliError(`--lease-ms ${v}: a whole number >= 1000`);
        return n;
      },
      10_000,
    )
    .action(
      async (
        o: Omit<ServerOptions, "log" | "cluster" | "onFatal"> & {
          cluster?: string;
          nodeId?: string;
          leaseMs: number;
        },
      ) => {
        if (o.cluster && o.externalBroker)
          throw new CliError("--cluster and --external-broker exclude each other");
        if (o.cluster && !/^rediss?:\/\/[^/]+/.test(o.cluster))
          throw new CliError(`--cluster ${o.cluster}: expected redis://HOST:PORT`);
        if (o.externalBroker && !/^(mqtts?|wss?):\/\/[^/]+/.test(o.externalBroker))
          throw new CliError(
            `--external-broker ${o.externalBroker}: expected mqtt://HOST:PORT or mqtts://...`,
          );
        const log = createLogger();
        const server = new FleetServer({
          ...o,
          dir: resolve(o.dir),
          log,
          cluster: o.cluster
            ? { url: o.cluster, nodeId: o.nodeId ?? `${hostname()}-${o.mqttPort}`, leaseMs: o.leaseMs }
            : undefined,
          // Fail-stop: the supervisor (systemd) restarts the process as a standby.
          onFatal: () => process.exit(1),
        });
        const l = await server.start().catch((err: Error) => {
          // One line, no stack: a bad data directory is a usage error, the rest cannot start.
          throw new CliError(
            `cannot start the server: ${err.message}`,
            err instanceof BadConfigError ? EXIT.USAGE : EXIT.FAILED,
          );
        });
        // One line on stdout for scripts (and tests using port 0); logs go to stderr.
        process.stdout.write(`fleet server listening ${l.mqtt} ${l.mqtts} ${l.ws} ${l.http} ${l.https}\n`);
        await new Promise<void>((done) => {
          const stop = () => {
            process.removeAllListeners("SIGTERM");
            process.removeAllListeners("SIGINT");
            // Every step of stop() is bounded; this is the last resort (LevelDB writes that
            // were acknowledged are synced already).
            setTimeout(() => {
              log.error("shutdown did not finish within 10 s; exiting");
              process.exit(EXIT.FAILED);
            }, 10_000).unref();
            server.stop().then(done, (err) => {
              log.error({ err }, "shutdown failed");
              done();
            });
          };
          process.once("SIGTERM", stop);
          process.once("SIGINT", stop);
        });
      },
    );
}
