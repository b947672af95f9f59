// The fleet server: embedded aedes (MQTT over TCP, TLS and WebSocket) with authentication
// and the ACL, the controller as a client of it, and an HTTP port for health and metrics.

import { createPublicKey } from "node:crypto";
import { readFileSync, rmSync } from "node:fs";
import {
  createServer as createHttpServer,
  type Server as HttpServer,
  type IncomingMessage,
  type ServerResponse,
} from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { type AddressInfo, createServer as createNetServer, type Server as NetServer } from "node:net";
import type { TLSSocket } from "node:tls";
import { createServer as createTlsServer } from "node:tls";
import { Aedes, type Client } from "aedes";
import type { Logger } from "pino";
import { Counter, collectDefaultMetrics, Gauge, Registry as Metrics } from "prom-client";
import { createWebSocketStream, WebSocketServer } from "ws";
import { Counters } from "../common/counters.js";
import { writeFileAtomic } from "../common/files.js";
import { isLoopback } from "../common/net.js";
import { settlesWithin } from "../common/timeout.js";
import { DEVICE_ID_RE } from "../proto/topics.js";
import { canPublish, canSubscribe, type Identity } from "./acl.js";
import { ArtifactStore } from "./artifacts.js";
import { Cluster } from "./cluster.js";
import { paths, readJsonFile, type ServerConfig, serverConfigSchema } from "./config.js";
import { Controller, type ControllerOptions } from "./controller/controller.js";
import { JobStore } from "./controller/job-store.js";
import { Registry } from "./controller/registry.js";
import { ControllerStore } from "./controller/store.js";
import { tokenHash, tokenMatches, verifyPassword } from "./credentials.js";
import { initFleet } from "./init.js";
import { mosquittoExport } from "./mosquitto.js";
import { limitPackets, type PacketLimits } from "./packet-limit.js";
import { PasswordGate, type Verdict } from "./password-gate.js";
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

function authError(message: string, returnCode: number): Error {
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
  private controllerHash = "";
  private servers: Array<NetServer | HttpServer> = [];
  private wss: WebSocketServer | undefined;
  private readonly rate = new Map<string, { tokens: number; at: number }>();
  /** Every operator password check (MQTT and HTTP) goes through this. */
  readonly passwords = new PasswordGate({ verify: verifyPassword });
  private rateTimer: NodeJS.Timeout | undefined;
  private wroteListening: string | undefined;
  private readonly log: Logger;
  readonly metrics = new Metrics();
  listening!: Listening;

  constructor(private readonly o: ServerOptions) {
    this.log = o.log.child({ component: "server" });
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
    const init = await initFleet(this.o.dir);
    if (init.created) this.log.info({ dir: this.o.dir }, "initialized a new fleet data directory");
    const p = paths(this.o.dir);
    this.config = readJsonFile(p.server, serverConfigSchema);
    this.controllerHash = tokenHash(this.config.controller.password);
    if (this.o.cluster) {
      this.cluster = new Cluster({
        ...this.o.cluster,
        prefix: `edgefleet:${this.config.prefix}`,
        log: this.o.log.child({ component: "cluster" }),
      });
      await this.cluster.connect();
    }
    const host = this.o.host;
    const plainHost = this.o.plainHost ?? "127.0.0.1";
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
    const http = createHttpServer((req, res) => this.serveHttp(req, res));
    const https = createHttpsServer(tlsOpts, (req, res) => this.serveHttp(req, res));
    const [httpPort, httpsPort] = await Promise.all([
      listen(http, this.o.httpPort, plainHost),
      listen(https, this.o.httpsPort ?? 8443, host),
    ]);
    this.servers = [http, https];
    const shown = (h: string) => (h === "0.0.0.0" || h === "::" ? "127.0.0.1" : h);
    let mqtt = { mqtt: this.o.externalBroker ?? "", mqtts: "-", ws: "-" };
    if (!this.o.externalBroker) mqtt = await this.startBroker(tlsOpts, { host, plainHost }, shown);
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
    this.setupMetrics();
    this.rateTimer = setInterval(() => {
      this.rate.clear();
      this.passwords.prune();
    }, 60_000);
    // CLIs using this data directory reach the server wherever it listens (cli/context.ts).
    writeFileAtomic(p.listening, `${JSON.stringify({ pid: process.pid, ...this.listening }, null, 2)}\n`);
    this.wroteListening = p.listening;
    this.log.info(this.listening, "fleet server listening");
    return this.listening;
  }

  /** Registry, artifact store and controller, on the one node that runs them. */
  private async startController(p: ReturnType<typeof paths>): Promise<void> {
    const store = new ControllerStore(p.db);
    await openStore(store, this.cluster ? this.o.cluster!.leaseMs * 3 : 0);
    this.store = store;
    const registry = new Registry(store);
    // A removed device loses its live connection too, not only its next login.
    registry.onRemoved = (id) => {
      if (!this.aedes) return; // an external broker drops it at the next ACL export + reload
      const client = (this.aedes as unknown as { clients: Record<string, Client | undefined> }).clients[id];
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
      dir: this.o.dir,
      store: store,
      jobs,
      registry,
      config: this.config,
      operatorKeys: new Map(this.config.operators.map((op) => [op.keyId, createPublicKey(op.publicKey)])),
      log: this.o.log.child({ component: "artifacts" }),
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
      log: this.o.log,
      counters: this.counters,
      httpUrl: this.listening.http,
      httpsUrl: this.listening.https,
      telemetryTap: this.telemetryTap(),
    });
    await controller.start();
    this.controller = controller;
  }

  /** Device telemetry straight from the embedded (single-node) broker's publish pipeline. */
  private telemetryTap(): ControllerOptions["telemetryTap"] {
    const aedes = this.aedes;
    if (!aedes || this.cluster) return undefined;
    return (deliver) =>
      aedes.on("publish", (packet, client) => {
        if ((client as FleetClient | null)?.fleet?.kind === "device" && packet.topic.endsWith("/telemetry"))
          deliver(packet.topic, packet.payload as Buffer);
      });
  }

  private fatal(why: string): void {
    this.log.error({ reason: why }, "this node must stop");
    if (this.o.onFatal) this.o.onFatal(why);
    else throw new Error(why);
  }

  /** The embedded aedes on TCP, TLS and WebSocket, with our authentication and ACL. */
  private async startBroker(
    tlsOpts: Parameters<typeof createTlsServer>[0],
    { host, plainHost }: { host: string; plainHost: string },
    shown: (h: string) => string,
  ): Promise<{ mqtt: string; mqtts: string; ws: string }> {
    const aedes = await Aedes.createBroker({
      ...(this.cluster ? this.cluster.brokerParts() : { persistence: indexedMemoryPersistence() }),
      id: this.o.cluster ? `fleet-${this.o.cluster.nodeId}` : "fleet",
      connectTimeout: this.config.limits.connectTimeoutMs,
      keepaliveLimit: this.config.limits.maxKeepaliveS,
      preConnect: (client, _packet, done) => this.preConnect(client, done),
      authenticate: (client, username, password, done) => {
        this.authenticate(client as FleetClient, username, password).then(
          (who) => {
            // The Last Will is a publish like any other (M11): checked now, before it is kept.
            const will = (client as unknown as { _will?: { topic: string; retain?: boolean } | null })._will;
            if (will && !this.mayPublish(who, will.topic, Boolean(will.retain))) {
              this.counters.inc("acl_will_denied");
              this.log.warn(
                { clientId: client.id, topic: will.topic },
                "connection refused: will topic not allowed",
              );
              return done(authError(`not authorized to leave a will on ${will.topic}`, 5) as never, false);
            }
            (client as FleetClient).fleet = who;
            done(null, true);
          },
          (err: Error) => {
            this.counters.inc("auth_failed");
            this.log.warn({ clientId: client.id, username, reason: err.message }, "connection refused");
            done(err as never, false);
          },
        );
      },
      authorizePublish: (client, packet, done) => {
        const who = (client as FleetClient | null)?.fleet;
        if (!who) return done(null); // the broker itself (will messages are checked at connect)
        if (!this.mayPublish(who, packet.topic, packet.retain)) {
          this.counters.inc("acl_publish_denied");
          this.log.warn(
            { clientId: client?.id, topic: packet.topic },
            "publish denied; closing the connection",
          );
          return done(new Error(`not authorized to publish to ${packet.topic}`));
        }
        if (packet.payload.length > this.config.limits.maxPayloadBytes) {
          this.counters.inc("payload_too_large");
          return done(new Error(`payload of ${packet.payload.length} bytes exceeds the limit`));
        }
        done(null);
      },
      authorizeSubscribe: (client, sub, done) => {
        const who = (client as FleetClient).fleet;
        if (who && canSubscribe(who, this.config.prefix, sub.topic)) return done(null, sub);
        this.counters.inc("acl_subscribe_denied");
        this.log.warn({ clientId: client.id, topic: sub.topic }, "subscription denied");
        done(null, null as never);
      },
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
      listen(mqttServer, this.o.mqttPort, plainHost),
      listen(tlsServer, this.o.mqttsPort, host),
      listen(wsHttp, this.o.wsPort, plainHost),
    ]);
    this.servers.push(mqttServer, tlsServer, wsHttp);
    return {
      mqtt: `mqtt://${shown(plainHost)}:${ports[0]}`,
      mqtts: `mqtts://${shown(host)}:${ports[1]}`,
      ws: `ws://${shown(plainHost)}:${ports[2]}`,
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
        for (const c of Object.values((aedes as unknown as { clients: Record<string, Client> }).clients))
          (c.conn as { destroy?: () => void }).destroy?.();
      }
    }
    await this.store?.close();
    this.log.info({ ms: Date.now() - started }, "fleet server stopped");
  }

  private preConnect(client: Client, done: (err: Error | null, ok: boolean) => void): void {
    // Cluster: aedes drops a message whose per-node counter is not above the last one it
    // forwarded to the client ("dedupe"), but through Redis a retained message (stored first)
    // is overtaken by the next one from the same node, so the retained DeviceState was lost.
    // No dedupe: overlapping subscriptions may then see a message twice, which every consumer
    // of ours tolerates (status and jobs are applied idempotently).
    if (this.cluster) (client as unknown as { duplicates: unknown }).duplicates = NO_DEDUPE;
    this.counters.inc("connect_attempts");
    if ((this.aedes?.connectedClients ?? 0) >= this.config.limits.maxConnections) {
      this.counters.inc("connections_refused_max");
      done(new Error("too many connections"), false);
      return;
    }
    const addr = remoteAddress(client);
    const limit = this.config.limits.connectsPerSecondPerAddress;
    const now = Date.now();
    const b = this.rate.get(addr) ?? { tokens: limit, at: now };
    b.tokens = Math.min(limit, b.tokens + ((now - b.at) / 1000) * limit);
    b.at = now;
    if (b.tokens < 1) {
      this.counters.inc("connections_refused_rate");
      done(new Error(`connection rate from ${addr} over ${limit}/s`), false);
      return;
    }
    b.tokens -= 1;
    this.rate.set(addr, b);
    done(null, true);
  }

  private async authenticate(
    client: FleetClient,
    username: string | undefined,
    password: Buffer | undefined,
  ): Promise<Identity> {
    const cfg = this.config;
    if (username === cfg.controller.username) {
      const id = cfg.controller.clientId ?? cfg.controller.username;
      if (client.id === id && password && tokenMatches(password, this.controllerHash)) {
        return { kind: "controller", id: username };
      }
      throw authError("bad controller credentials", 4);
    }
    const op = cfg.operators.find((x) => x.username === username);
    if (op) {
      if (!client.id.startsWith(`op-${op.username}-`))
        throw authError("operator client id must start with op-<username>-", 2);
      const verdict = password
        ? await this.passwordCheck(remoteAddress(client), password.toString(), op.passwordHash)
        : "bad";
      if (verdict === "ok") return { kind: "operator", id: op.username, clientId: client.id };
      if (verdict === "bad") throw authError("bad operator password", 4);
      throw authError(`operator login ${verdict}: too many failed or concurrent logins from this address`, 3);
    }
    // A device: client id = username = device id (no session takeover of another device).
    const tls = client.conn as Partial<TLSSocket>;
    const cn = tls.authorized && tls.getPeerCertificate ? tls.getPeerCertificate().subject?.CN : undefined;
    const certCn = Array.isArray(cn) ? undefined : cn;
    const deviceId = username ?? certCn;
    if (!deviceId || !DEVICE_ID_RE.test(deviceId) || client.id !== deviceId) {
      throw authError("client id must equal the device id (username)", 2);
    }
    if (password?.length) {
      const verdict = await this.verifyDevice(deviceId, password);
      // Unknown and wrong look the same to the client (no enumeration of device ids); the log tells.
      if (verdict === "unknown") throw authError(`unknown device ${deviceId}`, 4);
      if (verdict === "ok") return { kind: "device", id: deviceId };
      throw authError("bad device credentials", 4);
    }
    if ((await this.verifyDevice(deviceId, undefined)) === "unknown")
      throw authError(`unknown device ${deviceId}`, 4);
    if (certCn && certCn === deviceId) {
      const serial = tls.getPeerCertificate?.().serialNumber;
      if (await this.certAllowed(deviceId, serial)) return { kind: "device", id: deviceId };
      this.counters.inc("cert_revoked");
      throw authError("client certificate revoked", 4);
    }
    throw authError("no credentials", 4);
  }

  private async passwordCheck(address: string, password: string, stored: string): Promise<Verdict> {
    const v = await this.passwords.check(address, password, stored);
    if (v !== "ok") this.counters.inc(`operator_login_${v}`);
    return v;
  }

  /** The ACL, and retained messages only on a device's own `state`. */
  private mayPublish(who: Identity, topic: string, retain: boolean): boolean {
    return canPublish(who, this.config.prefix, topic) && (!retain || topic.endsWith("/state"));
  }

  /** The device's current certificate (M9); on a cluster node, from the mirrored record. */
  private async certAllowed(id: string, serial: string | undefined): Promise<boolean> {
    if (this.cluster) return this.cluster.certAllowed(id, serial);
    return Boolean(this.registry?.certAllowed(id, serial));
  }

  /** Against the registry, or on a cluster node against the credentials mirrored in Redis. */
  private async verifyDevice(id: string, password: Buffer | undefined): Promise<"ok" | "unknown" | "bad"> {
    if (this.cluster) {
      if (password) return this.cluster.verifyDevice(id, password);
      return (await this.cluster.deviceTokenHash(id)) ? "bad" : "unknown";
    }
    if (!this.registry?.get(id)) return "unknown";
    return password && this.registry.verifyToken(id, password) ? "ok" : "bad";
  }

  private setupMetrics(): void {
    collectDefaultMetrics({ register: this.metrics });
    const server = this;
    new Gauge({
      name: "fleet_connected_clients",
      help: "MQTT clients connected to the embedded broker",
      registers: [this.metrics],
      collect() {
        this.set(server.aedes?.connectedClients ?? 0);
      },
    });
    new Gauge({
      name: "fleet_registered_devices",
      help: "Devices in the registry",
      registers: [this.metrics],
      collect() {
        this.set(server.registry?.size ?? 0);
      },
    });
    new Counter({
      name: "fleet_events_total",
      help: "Server counters by name: auth failures, ACL denials, dropped payloads, ...",
      labelNames: ["name"],
      registers: [this.metrics],
      collect() {
        this.reset();
        for (const [name, v] of Object.entries(server.counters.toObject())) this.inc({ name }, v);
      },
    });
  }

  /** Every HTTP request ends in a reply: no error of any route reaches the process. */
  private serveHttp(req: IncomingMessage, res: ServerResponse): void {
    this.http(req, res).catch((err: Error) => {
      const bad = err instanceof URIError || (err as { code?: string }).code === "ERR_INVALID_URL";
      this.counters.inc(bad ? "http_400" : "http_500");
      if (!bad) this.log.error({ err, url: req.url }, "HTTP request failed");
      if (res.headersSent) return void res.destroy();
      res.writeHead(bad ? 400 : 500, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: bad ? `malformed URL: ${err.message}` : "internal error" }));
    });
  }

  private async http(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = req.url ?? "/";
    if (!this.artifacts || !this.registry) {
      if (url.startsWith("/v1/")) {
        res.writeHead(503, { "content-type": "application/json", "retry-after": "5" });
        res.end(
          JSON.stringify({ error: "this cluster node does not run the controller; ask the active node" }),
        );
        return;
      }
    } else if (await this.artifacts.handle(req, res)) return;
    if (url === "/healthz") {
      // Unhealthy while the controller that should run here has lost its broker connection.
      const down = Boolean(this.controller && !this.controller.connected);
      res.writeHead(down ? 503 : 200, { "content-type": "application/json" });
      res.end(
        JSON.stringify({
          ok: !down,
          broker: this.o.externalBroker ? "external" : "embedded",
          clients: this.aedes?.connectedClients ?? null,
          devices: this.registry?.size ?? null,
          controller: this.controller ? (this.controller.connected ? "active" : "disconnected") : "standby",
          ...(this.o.cluster ? { node: this.o.cluster.nodeId } : {}),
        }),
      );
      return;
    }
    if (url === "/v1/acl/mosquitto" && req.method === "GET" && this.artifacts && this.registry) {
      const registry = this.registry;
      return this.artifacts.operatorJson(req, res, () => mosquittoExport(this.config, registry.all()));
    }
    if (url === "/metrics") {
      // Open by default (the HTTP port is on loopback unless --plain-host); operators only with
      // server.json "metricsAuth": true.
      if (this.config.metricsAuth && !(await this.artifacts?.operatorGate(req, res))) {
        if (!res.headersSent) res.writeHead(503).end("not the active node\n");
        return;
      }
      res.writeHead(200, { "content-type": this.metrics.contentType });
      res.end(await this.metrics.metrics());
      return;
    }
    res.writeHead(404).end("not found\n");
  }
}

/** The peer address of an MQTT client (TCP, TLS or WebSocket). */
function remoteAddress(client: Client): string {
  const conn = client.conn as { remoteAddress?: string };
  return (
    conn.remoteAddress ??
    (client as unknown as { req?: { socket?: { remoteAddress?: string } } }).req?.socket?.remoteAddress ??
    "?"
  );
}

const NO_DEDUPE = new Proxy(
  {},
  {
    get: () => Number.NEGATIVE_INFINITY,
    set: () => true,
  },
);

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
