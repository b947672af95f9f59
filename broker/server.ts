// The fleet server: embedded aedes (MQTT over TCP, TLS and WebSocket) with authentication
// and the ACL, the controller as a client of it, and an HTTP port for health and metrics.

import { createPublicKey } from "node:crypto";
import { readFileSync, rmSync } from "node:fs";
import { createServer as createHttpServer, type Server as HttpServer, type IncomingMessage } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { type AddressInfo, createServer as createNetServer, type Server as NetServer } from "node:net";
import { createServer as createTlsServer } from "node:tls";
import { Aedes, type Client } from "aedes";
import type { Logger } from "pino";
import { createWebSocketStream, WebSocketServer } from "ws";
import { Counters } from "../common/counters.js";
import { writeFileAtomic } from "../common/files.js";
import { aedesClient, aedesClients, destroyConnection, disableDedupe } from "../common/internals.js";
import { isLoopback } from "../common/net.js";
import { settlesWithin } from "../common/timeout.js";
import type { Identity } from "./acl.js";
import { ArtifactStore } from "./artifacts.js";
import { Cluster } from "./cluster.js";
import { paths, readJsonFile, type ServerConfig, serverConfigSchema } from "./config.js";
import { Controller, type ControllerOptions } from "./controller/controller.js";
import { JobStore } from "./controller/job-store.js";
import { Registry } from "./controller/registry.js";
import { ControllerStore } from "./controller/store.js";
import { verifyPassword } from "./credentials.js";
import { Dashboard, fleetSource } from "./dashboard.js";
import { BrokerGate, type DeviceCredentials } from "./gate.js";
import { httpHandler } from "./http-routes.js";
import { initFleet } from "./init.js";
import { brokerLink } from "./link.js";
import { serverMetrics } from "./metrics.js";
import { limitPackets, type PacketLimits } from "./packet-limit.js";
import { PasswordGate } from "./password-gate.js";
import { indexedMemoryPersistence } from "./retained.js";

export interface ServerOptions {
  dir: string;
  /** Where the TLS listeners (MQTT/TLS, HTTPS) bind. */
  host: string;
  /**
   * Where the plain listeners (MQTT, MQTT/WebSocket, HTTP) bind: loopback by default (M13), as
   * they carry passwords and tokens in clear.
   */
  plainHost?: string;
  mqttPort: number;
  mqttsPort: number;
  wsPort: number;
  httpPort: number;
  httpsPort?: number;
  /** Run the controller against this MQTT 3.1.1 broker instead of the embedded aedes. */
  externalBroker?: string;
  /** Join a cluster of broker nodes sharing this Redis; the lease holder runs the controller. */
  cluster?: { url: string; nodeId: string; leaseMs: number };
  /** Called when this node must stop (it lost the controller lease); the CLI exits. */
  onFatal?: (why: string) => void;
  log: Logger;
}

export interface Listening {
  mqtt: string;
  mqtts: string;
  ws: string;
  http: string;
  https: string;
}

type FleetClient = Client & { fleet?: Identity };

function _authError(message: string, returnCode: number): Error {
  return Object.assign(new Error(message), { returnCode });
}

export class FleetServer {
  readonly counters = new Counters();
  /** The embedded broker; undefined with --external-broker. */
  private aedes: Aedes | undefined;
  // The controller's side: undefined on a cluster node that does not hold the lease.
  private store: ControllerStore | undefined;
  private registry: Registry | undefined;
  private controller: Controller | undefined;
  private artifacts: ArtifactStore | undefined;
  private cluster: Cluster | undefined;
  private config!: ServerConfig;
  private gate: BrokerGate | undefined;
  private servers: Array<NetServer | HttpServer> = [];
  private wss: WebSocketServer | undefined;
  /** Every operator password check (MQTT and HTTP) goes through this. */
  readonly passwords = new PasswordGate({ verify: verifyPassword });
  private rateTimer: NodeJS.Timeout | undefined;
  private wroteListening: string | undefined;
  private readonly log: Logger;
  readonly metrics = serverMetrics({
    counters: this.counters,
    clients: () => this.aedes?.connectedClients ?? 0,
    devices: () => this.registry?.size ?? 0,
    gateways: () =>
      [...(this.registry?.all() ?? [])]
        .filter((d) => d.gateway)
        .map((d) => ({ id: d.id, counters: d.counters ?? {} })),
    leveldb: () => ({ ...(this.store?.writeStats ?? {}) }),
  });
  private readonly serveHttp = httpHandler({
    config: () => this.config,
    artifacts: () => this.artifacts,
    registry: () => this.registry,
    controllerConnected: () => this.controller?.connected,
    health: () => ({
      broker: this.opts.externalBroker ? "external" : "embedded",
      clients: this.aedes?.connectedClients ?? null,
      devices: this.registry?.size ?? null,
      ...(this.opts.cluster ? { node: this.opts.cluster.nodeId } : {}),
    }),
    metrics: this.metrics,
    counters: this.counters,
    log: () => this.log,
    dashboard: new Dashboard({
      source: fleetSource({
        config: () => this.config,
        registry: () => this.registry,
        artifacts: () => this.artifacts,
        controller: () => this.controller,
      }),
      passwords: this.passwords,
      counters: this.counters,
      log: () => this.log,
    }),
  });
  listening!: Listening;

  constructor(private readonly opts: ServerOptions) {
    this.log = opts.log.child({ component: "server" });
  }

  /** Starts everything; if any part fails, what was started is stopped again before the error. */
  async start(): Promise<Listening> {
    try {
      return await this.boot();
    } catch (err) {
      await this.stop().catch(() => {});
      throw err;
    }
  }

  private async boot(): Promise<Listening> {
    const init = await initFleet(this.opts.dir);
    if (init.created) this.log.info({ dir: this.opts.dir }, "initialized a new fleet data directory");
    const p = paths(this.opts.dir);
    this.config = readJsonFile(p.server, serverConfigSchema);
    if (this.opts.cluster) {
      this.cluster = new Cluster({
        ...this.opts.cluster,
        prefix: `edgefleet:${this.config.prefix}`,
        log: this.opts.log.child({ component: "cluster" }),
      });
      await this.cluster.connect();
    }
    const host = this.opts.host;
    const plainHost = this.opts.plainHost ?? "127.0.0.1";
    if (!isLoopback(plainHost))
      this.log.warn(
        { plainHost },
        "plain MQTT, WebSocket and HTTP listen beyond loopback: passwords and tokens cross the network in clear",
      );
    const tlsOpts = {
      key: readFileSync(p.serverKey),
      cert: readFileSync(p.serverCert),
      ca: readFileSync(p.caCert),
      requestCert: true, // a device may present a fleet-CA client certificate instead of a token
      rejectUnauthorized: false,
    };
    const http = createHttpServer(this.serveHttp);
    const https = createHttpsServer(tlsOpts, this.serveHttp);
    const [httpPort, httpsPort] = await Promise.all([
      listen(http, this.opts.httpPort, plainHost),
      listen(https, this.opts.httpsPort ?? 8443, host),
    ]);
    this.servers = [http, https];
    const shown = (h: string) => (h === "0.0.0.0" || h === "::" ? "127.0.0.1" : h);
    let mqtt = { mqtt: this.opts.externalBroker ?? "", mqtts: "-", ws: "-" };
    if (!this.opts.externalBroker) mqtt = await this.startBroker(tlsOpts, { host, plainHost }, shown);
    this.listening = {
      ...mqtt,
      http: `http://${shown(plainHost)}:${httpPort}`,
      https: `https://${shown(host)}:${httpsPort}`,
    };
    if (this.cluster) {
      this.cluster.campaign(
        () => this.startController(p),
        (why) => this.fatal(why),
      );
    } else await this.startController(p);
    this.rateTimer = setInterval(() => (this.gate ? this.gate.prune() : this.passwords.prune()), 60_000);
    // CLIs using this data directory reach the server wherever it listens (cli/context.ts).
    writeFileAtomic(p.listening, `${JSON.stringify({ pid: process.pid, ...this.listening }, null, 2)}\n`);
    this.wroteListening = p.listening;
    this.log.info(this.listening, "fleet server listening");
    return this.listening;
  }

  /** Registry, artifact store and controller, on the one node that runs them. */
  private async startController(p: ReturnType<typeof paths>): Promise<void> {
    const store = new ControllerStore(p.db);
    await openStore(store, this.cluster ? this.opts.cluster!.leaseMs * 3 : 0);
    this.store = store;
    const registry = new Registry(store);
    // A removed device loses its live connection too, not only its next login.
    registry.onRemoved = (id) => {
      if (!this.aedes) return; // an external broker drops it at the next ACL export + reload
      const client = aedesClient(this.aedes, id);
      if (client && (client as FleetClient).fleet?.kind === "device") {
        this.log.info({ deviceId: id }, "device removed: closing its connection");
        client.close();
      }
    };
    await registry.load();
    const cluster = this.cluster;
    if (cluster) {
      await cluster.mirrorAll(registry.all());
      registry.mirror = { put: (d) => cluster.mirror(d), del: (id) => cluster.unmirror(id) };
    }
    this.registry = registry;
    const jobs = new JobStore(store);
    this.artifacts = new ArtifactStore({
      dir: this.opts.dir,
      store: store,
      jobs,
      registry,
      config: this.config,
      operatorKeys: new Map(this.config.operators.map((op) => [op.keyId, createPublicKey(op.publicKey)])),
      log: this.opts.log.child({ component: "artifacts" }),
      counters: this.counters,
      passwords: this.passwords,
    });
    const controller = new Controller({
      config: this.config,
      store: store,
      jobs,
      registry,
      brokerUrl: this.listening.mqtt,
      ca: { certPem: readFileSync(p.caCert, "utf8"), keyPem: readFileSync(p.caKey, "utf8") },
      log: this.opts.log,
      counters: this.counters,
      httpUrl: this.listening.http,
      httpsUrl: this.listening.https,
      link: this.brokerLink(),
    });
    await controller.start();
    this.controller = controller;
    this.artifacts.onPushed = (a) => controller.notifier.emit("artifact.pushed", a);
  }

  /** The embedded single-node broker in-process for the controller (ControllerOptions.link). */
  private brokerLink(): ControllerOptions["link"] {
    if (!this.aedes || this.cluster) return undefined;
    return brokerLink(this.aedes, {
      prefix: this.config.prefix,
      log: this.log,
      fromDevice: (client) => (client as FleetClient | null)?.fleet?.kind === "device",
    });
  }

  private fatal(why: string): void {
    this.log.error({ reason: why }, "this node must stop");
    if (this.opts.onFatal) this.opts.onFatal(why);
    else throw new Error(why);
  }

  /** The embedded aedes on TCP, TLS and WebSocket, with our authentication and ACL. */
  private async startBroker(
    tlsOpts: Parameters<typeof createTlsServer>[0],
    { host, plainHost }: { host: string; plainHost: string },
    shown: (h: string) => string,
  ): Promise<{ mqtt: string; mqtts: string; ws: string }> {
    const gate = new BrokerGate({
      config: this.config,
      devices: this.deviceCredentials(),
      passwords: this.passwords,
      counters: this.counters,
      log: this.opts.log.child({ component: "gate" }),
      connected: () => this.aedes?.connectedClients ?? 0,
      // Cluster: aedes drops a message whose per-node counter is not above the last one it
      // forwarded to the client ("dedupe"), but through Redis a retained message (stored first)
      // is overtaken by the next one from the same node, so the retained DeviceState was lost.
      // No dedupe: overlapping subscriptions may then see a message twice, which every consumer
      // of ours tolerates (status and jobs are applied idempotently).
      prepare: this.cluster ? disableDedupe : undefined,
      behind: (gateway, device) => this.registry?.get(device)?.via === gateway,
    });
    this.gate = gate;
    const aedes = await Aedes.createBroker({
      ...(this.cluster ? this.cluster.brokerParts() : { persistence: indexedMemoryPersistence() }),
      id: this.opts.cluster ? `fleet-${this.opts.cluster.nodeId}` : "fleet",
      connectTimeout: this.config.limits.connectTimeoutMs,
      keepaliveLimit: this.config.limits.maxKeepaliveS,
      ...gate.hooks,
    });
    this.aedes = aedes;
    const { maxPayloadBytes, connectTimeoutMs } = this.config.limits;
    const limits: PacketLimits = {
      // The payload, a topic of up to 64 KiB and the fixed header.
      maxPacketBytes: maxPayloadBytes + 64 * 1024 + 16,
      maxPreAuthBytes: 64 * 1024,
      onRefuse: (reason) => {
        this.counters.inc("packet_too_large");
        this.log.warn({ reason }, "closing a connection: packet over the limit");
      },
    };
    const handle = (stream: Parameters<Aedes["handle"]>[0], req?: IncomingMessage) =>
      limitPackets(aedes.handle(stream, req), limits);
    const mqttServer = createNetServer((s) => handle(s));
    const tlsServer = createTlsServer({ ...tlsOpts, handshakeTimeout: connectTimeoutMs }, (s) => handle(s));
    const wsHttp = createHttpServer((_req, res) => res.writeHead(426).end("MQTT over WebSocket only\n"));
    this.wss = new WebSocketServer({ server: wsHttp, maxPayload: limits.maxPacketBytes });
    this.wss.on("connection", (ws, req) => handle(createWebSocketStream(ws) as never, req));
    const ports = await Promise.all([
      listen(mqttServer, this.opts.mqttPort, plainHost),
      listen(tlsServer, this.opts.mqttsPort, host),
      listen(wsHttp, this.opts.wsPort, plainHost),
    ]);
    this.servers.push(mqttServer, tlsServer, wsHttp);
    return {
      mqtt: `mqtt://${shown(plainHost)}:${ports[0]}`,
      mqtts: `mqtts://${shown(host)}:${ports[1]}`,
      ws: `ws://${shown(plainHost)}:${ports[2]}`,
    };
  }

  /** Device credentials: the registry, or on a cluster node the credentials mirrored in Redis. */
  private deviceCredentials(): DeviceCredentials {
    return {
      verify: async (id, password) => {
        if (this.cluster) {
          if (password) return this.cluster.verifyDevice(id, password);
          return (await this.cluster.deviceTokenHash(id)) ? "bad" : "unknown";
        }
        if (!this.registry?.get(id)) return "unknown";
        return password && this.registry.verifyToken(id, password) ? "ok" : "bad";
      },
      certAllowed: async (id, serial) =>
        this.cluster ? this.cluster.certAllowed(id, serial) : Boolean(this.registry?.certAllowed(id, serial)),
    };
  }

  /**
   * Graceful and bounded: stop accepting, stop the controller (flushes the registry; its
   * connection is given up after 2 s), close the broker (clients are dropped after 3 s), then
   * LevelDB. Everything acknowledged was written before its acknowledgement, so cutting the
   * waits short loses nothing.
   */
  async stop(): Promise<void> {
    const started = Date.now();
    if (this.rateTimer) clearInterval(this.rateTimer);
    if (this.wroteListening) rmSync(this.wroteListening, { force: true });
    for (const s of this.servers) {
      s.close();
      (s as { closeAllConnections?: () => void }).closeAllConnections?.();
    }
    this.wss?.close();
    await this.controller?.stop();
    await this.cluster?.stop();
    const aedes = this.aedes;
    if (aedes) {
      const closed = new Promise<void>((resolve) => aedes.close(() => resolve()));
      if (!(await settlesWithin(closed, 3000))) {
        this.log.warn(
          { clients: aedes.connectedClients },
          "broker close is slow; dropping the remaining clients",
        );
        for (const c of aedesClients(aedes)) destroyConnection(c);
      }
    }
    await this.store?.close();
    this.log.info({ ms: Date.now() - started }, "fleet server stopped");
  }
}

/** Opens LevelDB; on a cluster node, waits up to `waitMs` for the previous holder's lock to go. */
async function openStore(store: ControllerStore, waitMs: number): Promise<void> {
  const until = Date.now() + waitMs;
  for (;;) {
    try {
      return await store.open();
    } catch (err) {
      const locked = /lock/i.test(String((err as { cause?: Error }).cause?.message ?? ""));
      if (!locked || Date.now() > until) throw err;
      await new Promise((r) => setTimeout(r, 250));
    }
  }
}

function listen(server: NetServer | HttpServer, port: number, host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve((server.address() as AddressInfo).port));
  });
}
