import { hostname } from "node:os";
import { resolve } from "node:path";
import { isMainThread, type MessagePort, parentPort, Worker, workerData } from "node:worker_threads";
import type { Command } from "commander";
import { createLogger, logDrained } from "../agent/log.js";
import { BadConfigError } from "../broker/config.js";
import { FleetServer, type Listening, type ServerOptions } from "../broker/server.js";
import { CliError, EXIT } from "./exit.js";
import { SERVER_YOUNG_GENERATION_MB } from "./young-generation.js";

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
        await serveInThread({
          ...o,
          dir: resolve(o.dir),
          cluster: o.cluster
            ? { url: o.cluster, nodeId: o.nodeId ?? `${hostname()}-${o.mqttPort}`, leaseMs: o.leaseMs }
            : undefined,
        });
      },
    );
}

type ThreadArgs = Omit<ServerOptions, "log" | "onFatal">;
type FromThread =
  | { listening: string }
  | { failed: string; exitCode: number }
  | { fatal: string }
  | { stopped: true };

/**
 * Runs the server in a worker thread of this process, for its young generation
 * (./young-generation.ts): with the main thread's default a 2,000-job rollout cost the server
 * about six scavenges of 4-17 ms (B1, `--trace-gc`). The main thread relays what the server
 * would have done itself: the "listening" line, SIGTERM and SIGINT, the exit code. One
 * process, one pid.
 */
async function serveInThread(args: ThreadArgs): Promise<void> {
  const worker = new Worker(new URL(import.meta.url), {
    workerData: { fleetServer: args },
    resourceLimits: { maxYoungGenerationSizeMb: SERVER_YOUNG_GENERATION_MB },
  });
  const stop = () => worker.postMessage("stop");
  // Why the thread is about to end by itself. Its messages are drained before "exit" is
  // emitted; its last log lines, written asynchronously, may not be (seen in CI).
  let fatal: string | undefined;
  try {
    await new Promise<void>((resolve, reject) => {
      worker.on("message", (m: FromThread) => {
        if ("listening" in m) {
          // One line on stdout for scripts (and tests using port 0); logs go to stderr.
          process.stdout.write(m.listening);
          process.once("SIGTERM", stop);
          process.once("SIGINT", stop);
        } else if ("failed" in m) reject(new CliError(m.failed, m.exitCode));
        else if ("fatal" in m) fatal = m.fatal;
        else resolve();
      });
      worker.on("error", reject);
      // The thread ended by itself: fail-stop (lost the controller lease) or the shutdown bound.
      worker.on("exit", (code) =>
        code === 0
          ? resolve()
          : reject(new CliError(`the server stopped (exit code ${code})${fatal ? `: ${fatal}` : ""}`, code)),
      );
    });
  } finally {
    process.removeListener("SIGTERM", stop);
    process.removeListener("SIGINT", stop);
    await worker.terminate();
  }
}

/** The server thread: starts the server, reports, and stops when told to. */
async function serve(args: ThreadArgs, port: MessagePort): Promise<void> {
  const send = (m: FromThread) => port.postMessage(m);
  const log = createLogger();
  // The thread's log is written asynchronously: what says why it ends goes out before it does
  // (bounded: a stuck stderr does not keep a failed server alive).
  const exit = (code: number) => {
    setTimeout(() => process.exit(code), 2000);
    void logDrained(log).then(() => process.exit(code));
  };
  // Fail-stop: the supervisor (systemd) restarts the process as a standby.
  const server = new FleetServer({
    ...args,
    log,
    onFatal: (why) => {
      send({ fatal: why });
      exit(EXIT.FAILED);
    },
  });
  let l: Listening;
  try {
    l = await server.start();
  } catch (err) {
    // One line, no stack: a bad data directory is a usage error, the rest cannot start.
    const exitCode = err instanceof BadConfigError ? EXIT.USAGE : EXIT.FAILED;
    return send({ failed: `cannot start the server: ${(err as Error).message}`, exitCode });
  }
  send({ listening: `fleet server listening ${l.mqtt} ${l.mqtts} ${l.ws} ${l.http} ${l.https}\n` });
  port.once("message", () => {
    // Every step of stop() is bounded; this is the last resort (LevelDB writes that were
    // acknowledged are synced already).
    setTimeout(() => {
      log.error("shutdown did not finish within 10 s; exiting");
      send({ fatal: "shutdown did not finish within 10 s" });
      exit(EXIT.FAILED);
    }, 10_000).unref();
    server
      .stop()
      .catch((err) => log.error({ err }, "shutdown failed"))
      .then(() => logDrained(log))
      .then(() => send({ stopped: true }));
  });
}

if (!isMainThread && (workerData as { fleetServer?: ThreadArgs } | null)?.fleetServer)
  void serve((workerData as { fleetServer: ThreadArgs }).fleetServer, parentPort!);
