// A site gateway (DESIGN.md §11): an agent that also runs an embedded aedes for the devices of
// its site. It authenticates them offline — the center sends the credentials of exactly the
// devices that name this gateway (SiteCredentials on the gateway's ctl topic), kept in LevelDB —
// applies the same per-device ACL as the center (broker/gate.ts), and relays over the agent's
// one upstream connection, as itself: what the devices publish (status, sync, state, telemetry)
// goes up unchanged; what the center sends them (job, ctl) comes down. The delivery protocol
// stays end to end: jobs are signed by operators and statuses are acknowledged by the
// controller, so the gateway can delay but not forge; a status lost in a gateway crash is sent
// again by the device's outbox.

import type { KeyObject } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer as createHttpsServer, type Server as HttpsServer } from "node:https";
import { createServer as createTlsServer, type Server as TlsServer } from "node:tls";
import type { AbstractSublevel } from "abstract-level";
import { Aedes, type Client } from "aedes";
import type { Logger } from "pino";
import { tokenMatches, verifyPassword } from "../broker/credentials.js";
import { Dashboard } from "../broker/dashboard.js";
import { BrokerGate, type FleetClient } from "../broker/gate.js";
import { limitPackets, type PacketLimits } from "../broker/packet-limit.js";
import { PasswordGate } from "../broker/password-gate.js";
import type { Counters } from "../common/counters.js";
import { aedesClient, aedesClients, destroyConnection } from "../common/internals.js";
import { settlesWithin } from "../common/timeout.js";
import { decodeEnvelope, encodeEnvelope } from "../proto/envelope.js";
import {
  type DeviceState,
  type JobAssignment,
  pb,
  type SiteAck,
  type SiteCredentials,
  type SiteJob,
  type SiteState,
  type StatusBatch,
} from "../proto/index.js";
import { deviceTopic, parseDeviceTopic, rpcRequestTopic } from "../proto/topics.js";
import { SiteControl, type SiteDeviceView } from "./site-control.js";
import type { Db } from "./store.js";
import { type UplinkKind, UplinkQueue } from "./uplink-queue.js";

export interface SiteDeviceRecord {
  id: string;
  tokenHash: string;
  certSerials: string[];
  labels: Record<string, string>;
}

export interface GatewayOptions {
  deviceId: string;
  prefix: string;
  port: number;
  bind: string;
  certFile: string;
  keyFile: string;
  caFile: string;
  maxPayloadBytes: number;
  db: Db;
  log: Logger;
  counters: Counters;
  /** The operator keys this agent trusts (for local control, agent/site-control.ts). */
  trustedKeys: ReadonlyMap<string, KeyObject>;
  /** Its figures changed (connected devices, queue, uplink): the agent reports its state soon. */
  onChange(): void;
  /** Bound of the store-and-forward queue (agent/uplink-queue.ts). */
  queueBytes: number;
  /** The site's dashboard over HTTPS (0 = none). */
  dashboardPort: number;
  /** The agent's upstream connection. */
  upstream: {
    /** False when it is down; `done` once the broker has it (QoS 1) or it was written (QoS 0). */
    publish(
      topic: string,
      payload: Buffer,
      qos: 0 | 1,
      retain: boolean,
      done?: (err?: Error) => void,
    ): boolean;
    subscribe(topics: string[]): void;
    /** Sends the gateway's SyncRequest again (site jobs were added since the last one). */
    resync(): void;
  };
}

const UP = new Set(["status", "sync", "state", "telemetry"]);
const CONNECT_TIMEOUT_MS = 10_000;
const MAX_KEEPALIVE_S = 600; // as the server's default limits.maxKeepaliveS
/** How long the site's status batches are collected before they go up together. */
const SITE_STATUS_WINDOW_MS = 50;
const DOWN = new Set(["job", "ctl"]);

type Sub<V> = AbstractSublevel<Db, string | Buffer | Uint8Array, string, V>;

export class SiteGateway {
  private readonly devices = new Map<string, SiteDeviceRecord>();
  /** Each site device's last DeviceState, to announce again upstream after an outage. */
  private readonly states = new Map<string, DeviceState>();
  private pending: Array<{ deviceId: string; batch: StatusBatch }> = [];
  /** States not yet sent up: the latest per device (coalesced within the window). */
  private readonly pendingStates = new Map<string, DeviceState>();
  private pendingBytes = 0;
  private statusTimer: NodeJS.Timeout | undefined;
  private readonly store: Sub<SiteDeviceRecord>;
  private readonly control: SiteControl;
  private readonly queue: UplinkQueue;
  /** The uplink is up and the center answered this gateway's sync: the site's messages go up. */
  private ready = false;
  private aedes: Aedes | undefined;
  private server: TlsServer | undefined;
  private web: HttpsServer | undefined;
  port = 0;
  dashboardUrl = "";

  constructor(private readonly opts: GatewayOptions) {
    this.store = opts.db.sublevel<string, SiteDeviceRecord>("site", {
      valueEncoding: "json",
    }) as Sub<SiteDeviceRecord>;
    this.queue = new UplinkQueue({
      db: opts.db,
      maxBytes: opts.queueBytes,
      log: opts.log.child({ component: "uplink-queue" }),
      counters: opts.counters,
      onChange: () => opts.onChange(),
    });
    this.control = new SiteControl({
      gatewayId: opts.deviceId,
      prefix: opts.prefix,
      maxPayloadBytes: opts.maxPayloadBytes,
      db: opts.db,
      log: opts.log.child({ component: "site-control" }),
      counters: opts.counters,
      trustedKeys: opts.trustedKeys,
      centerReachable: () => this.ready,
      devices: () => this.siteDevices(),
      publish: (topic, payload) => this.local(topic, payload),
    });
  }

  get siteSize(): number {
    return this.devices.size;
  }

  async start(): Promise<void> {
    const o = this.opts;
    for await (const d of this.store.values()) this.devices.set(d.id, d);
    await this.control.load();
    await this.queue.load();
    this.gauges();
    const gate = new BrokerGate({
      config: {
        prefix: o.prefix,
        // LAN operators (local control): the center's list, changed in place as it changes.
        operators: this.control.operators,
        limits: {
          maxConnections: 10_000,
          connectsPerSecondPerAddress: 50,
          maxPayloadBytes: o.maxPayloadBytes,
        },
      },
      devices: {
        verify: async (id, password) => {
          const d = this.devices.get(id);
          if (!d) return "unknown";
          return password && d.tokenHash && tokenMatches(password, d.tokenHash) ? "ok" : "bad";
        },
        certAllowed: async (id, serial) =>
          Boolean(serial && this.devices.get(id)?.certSerials.includes(serial.toUpperCase())),
      },
      passwords: new PasswordGate({ verify: verifyPassword }),
      counters: o.counters,
      log: o.log.child({ component: "gateway-gate" }),
      connected: () => this.aedes?.connectedClients ?? 0,
    });
    // The center's limits (issue 16) hold at the gateway too: a client on the site's LAN can
    // neither announce a huge packet nor hold a connection open without logging in.
    const aedes = await Aedes.createBroker({
      id: `gateway-${o.deviceId}`,
      connectTimeout: CONNECT_TIMEOUT_MS,
      keepaliveLimit: MAX_KEEPALIVE_S,
      ...gate.hooks,
    });
    const limits: PacketLimits = {
      maxPacketBytes: o.maxPayloadBytes + 64 * 1024 + 16,
      maxPreAuthBytes: 64 * 1024,
      onRefuse: (reason) => {
        o.counters.inc("packet_too_large");
        o.log.warn({ reason }, "closing a site connection: packet over the limit");
      },
    };
    this.aedes = aedes;
    aedes.on("client", () => this.gauges());
    aedes.on("clientDisconnect", () => this.gauges());
    aedes.on("publish", (packet, client) => {
      const who = (client as FleetClient | null)?.fleet;
      const payload = packet.payload as Buffer;
      // A LAN operator's request (local control); the ACL let only operators publish there.
      if (packet.topic === rpcRequestTopic(o.prefix) && who?.kind === "operator") {
        void this.control.onRpc(payload).catch((err) => o.log.error({ err }, "local rpc failed"));
        return;
      }
      // Up: what the site's devices publish on their own topics (wills included).
      const t = parseDeviceTopic(o.prefix, packet.topic);
      if (!t || !UP.has(t.channel) || !this.devices.has(t.deviceId)) return;
      if (client && who?.id !== t.deviceId) return;
      if (t.channel === "state" && this.collectState(t.deviceId, payload)) return;
      if (t.channel === "status" && this.collect(t.deviceId, payload)) return;
      if (t.channel === "sync" && !this.ready) return this.answerSync(t.deviceId, payload);
      const kind = t.channel === "status" ? "status" : t.channel === "telemetry" ? "telemetry" : undefined;
      if (this.up(packet.topic, payload, packet.qos === 0 ? 0 : 1, packet.retain, kind))
        o.counters.inc("gateway_relayed_up");
    });
    this.server = createTlsServer(
      {
        cert: readFileSync(o.certFile),
        key: readFileSync(o.keyFile),
        ca: readFileSync(o.caFile),
        requestCert: true, // a device may log in with its fleet-CA client certificate
        rejectUnauthorized: false,
        handshakeTimeout: CONNECT_TIMEOUT_MS,
      },
      (socket) => limitPackets(aedes.handle(socket), limits),
    );
    await new Promise<void>((resolve, reject) => {
      this.server!.once("error", reject);
      this.server!.listen(o.port, o.bind, () => resolve());
    });
    this.port = (this.server.address() as { port: number }).port;
    o.log.info({ port: this.port, devices: this.devices.size }, "site gateway listening");
    if (o.dashboardPort) await this.startDashboard();
  }

  /**
   * The site's dashboard (DESIGN.md §12): the same pages as the center's, for this site — its
   * devices, the jobs run here, live — with the operators the center sent, over HTTPS.
   */
  private async startDashboard(): Promise<void> {
    const o = this.opts;
    const control = this.control;
    const dashboard = new Dashboard({
      source: () => ({
        operators: () => control.operators,
        devices: () =>
          [...this.siteDevices()].map((d) => ({
            ...d,
            lastSeen: 0,
            via: o.deviceId,
          })),
        call: (m, p, op) => control.call(m, p, op),
        onEvent: (l) => control.onEvent(l),
        telemetryOf: () => [],
        artifacts: async () => [],
      }),
      passwords: new PasswordGate({ verify: verifyPassword }),
      counters: o.counters,
      log: () => o.log,
    });
    this.web = createHttpsServer(
      { cert: readFileSync(o.certFile), key: readFileSync(o.keyFile) },
      (req, res) => {
        dashboard
          .handle(req, res)
          .then((handled) => {
            if (!handled) res.writeHead(404).end("not found\n");
          })
          .catch((err) => {
            o.log.warn({ err: (err as Error).message }, "dashboard request failed");
            if (!res.headersSent) res.writeHead(500).end();
          });
      },
    );
    await new Promise<void>((resolve) => {
      this.web!.once("error", (err) => {
        o.log.error({ err: err.message }, "cannot serve the site's dashboard");
        resolve();
      });
      this.web!.listen(o.dashboardPort, o.bind, () => resolve());
    });
    const addr = this.web.address() as { port: number } | null;
    if (addr) {
      this.dashboardUrl = `https://${o.bind === "0.0.0.0" ? "127.0.0.1" : o.bind}:${addr.port}/`;
      o.log.info({ url: this.dashboardUrl }, "site dashboard listening");
    }
  }

  async stop(): Promise<void> {
    this.flushStatus();
    this.server?.close();
    this.web?.close();
    this.web?.closeAllConnections();
    const aedes = this.aedes;
    if (!aedes) return;
    const closed = new Promise<void>((r) => aedes.close(() => r()));
    if (!(await settlesWithin(closed, 2000))) for (const c of aedesClients(aedes)) destroyConnection(c);
  }

  /**
   * Status batches of the site go up together: collected for a few milliseconds into one
   * SiteStatus on this gateway's status topic. False when this one must go up as it is
   * (undecodable — the center counts it — or too large to share a message).
   */
  private collect(deviceId: string, payload: Buffer): boolean {
    let batch: StatusBatch | undefined;
    try {
      batch = decodeEnvelope(payload, this.opts.maxPayloadBytes).statusBatch ?? undefined;
    } catch {
      return false;
    }
    if (batch) this.control.observe(deviceId, batch);
    const room = Math.floor(this.opts.maxPayloadBytes * 0.8);
    if (!batch || payload.length > room / 2) return false;
    if (this.pendingBytes + payload.length > room) this.flushStatus();
    this.pending.push({ deviceId, batch });
    this.pendingBytes += payload.length + deviceId.length + 8;
    this.statusTimer ??= setTimeout(() => this.flushStatus(), SITE_STATUS_WINDOW_MS);
    return true;
  }

  /**
   * A device's DeviceState goes up in the next SiteStatus, only the latest of the window (queue
   * depth changes of a thousand devices running a job are a thousand states a second). False
   * when it must go up as it is (undecodable, or a cleared retained message).
   */
  private collectState(deviceId: string, payload: Buffer): boolean {
    let state: DeviceState | undefined;
    try {
      state = payload.length
        ? (decodeEnvelope(payload, this.opts.maxPayloadBytes).deviceState ?? undefined)
        : undefined;
    } catch {
      return false;
    }
    if (!state) return false;
    this.states.set(deviceId, state);
    this.pendingStates.set(deviceId, state);
    this.statusTimer ??= setTimeout(() => this.flushStatus(), SITE_STATUS_WINDOW_MS);
    return true;
  }

  private flushStatus(): void {
    if (this.statusTimer) clearTimeout(this.statusTimer);
    this.statusTimer = undefined;
    if (!this.pending.length && !this.pendingStates.size) return;
    const batches = this.pending;
    let bytes = this.pendingBytes;
    this.pending = [];
    this.pendingBytes = 0;
    // States share the message with the batches while they fit; the rest go in more messages.
    const room = Math.floor(this.opts.maxPayloadBytes * 0.8);
    let states: SiteState[] = [];
    const send = () => {
      if (!batches.length && !states.length) return;
      const payload = Buffer.from(encodeEnvelope({ siteStatus: { batches: batches.splice(0), states } }));
      if (payload.length > this.opts.maxPayloadBytes) {
        this.opts.counters.inc("gateway_site_status_too_large");
        this.opts.log.error({ bytes: payload.length }, "a site status message over the payload limit");
      }
      const topic = deviceTopic(this.opts.prefix, this.opts.deviceId, "status");
      // Not ready: queued (statuses) — states are announced again, all of them, when it is.
      if (this.up(topic, payload, 1, false, "status")) this.opts.counters.inc("gateway_site_status_sent");
      this.opts.log.debug({ states: states.length, bytes: payload.length }, "site statuses sent up");
      states = [];
      bytes = 0;
    };
    this.opts.counters.inc("gateway_site_status_batches", batches.length);
    if (!this.ready) this.pendingStates.clear();
    for (const [deviceId, state] of this.pendingStates) {
      const size = pb.DeviceState.encode(state).len + deviceId.length + 16;
      if (bytes + size > room) send();
      states.push({ deviceId, state });
      bytes += size;
    }
    this.pendingStates.clear();
    send();
  }

  /** The center's acks of a SiteStatus: each device gets its own StatusAck, as if sent to it. */
  onSiteAck(ack: SiteAck, bytes: number): void {
    for (const a of ack.acks ?? []) {
      const id = a.deviceId ?? "";
      if (!this.devices.has(id) || !a.ack) continue;
      this.local(deviceTopic(this.opts.prefix, id, "ctl"), encodeEnvelope({ statusAck: a.ack }));
    }
    this.opts.counters.inc("gateway_site_acks_in");
    this.opts.counters.inc("gateway_down_bytes", bytes);
  }

  /**
   * The upstream connection is (back) up: listen for the site's devices there and announce
   * their states again (a restarted center has lost its retained ones). What they have not
   * received the center re-sends when this gateway syncs (a site sync, broker/controller).
   */
  onUpstream(): void {
    this.opts.upstream.subscribe(this.topicsOf([...this.devices.keys()]));
  }

  /** The uplink went down: the site's messages are queued until the next sync is answered. */
  onUpstreamDown(): void {
    this.ready = false;
    this.gauges();
  }

  /** What this gateway's SyncRequest carries: the jobs run at the site the center lacks. */
  siteJobs(): SiteJob[] {
    return this.control.toRegister();
  }

  /**
   * The center answered this gateway's sync, so it has recorded the site jobs that sync
   * carried (`registered`): the site's messages go up again — first what was queued, then
   * every device's state. With jobs run here since, it syncs again first.
   */
  async onSynced(registered: readonly string[]): Promise<void> {
    await this.control.registered(registered);
    if (this.control.pendingJobs) {
      this.opts.upstream.resync();
      return;
    }
    if (this.ready) return;
    this.ready = true;
    this.gauges();
    await this.queue.drain(
      (topic, payload, qos) =>
        new Promise<boolean>((resolve) => {
          const ok = this.opts.upstream.publish(topic, payload, qos, false, (err) => resolve(!err));
          if (!ok) resolve(false);
          else this.count(payload.length);
        }),
    );
    for (const [id, state] of this.states) if (this.devices.has(id)) this.pendingStates.set(id, state);
    this.flushStatus();
  }

  /**
   * Sends up now, or — not ready, or the uplink just went — queues what must not be lost
   * (`kind`); anything else waits for the next sync (states) or is answered here (syncs).
   */
  private up(topic: string, payload: Buffer, qos: 0 | 1, retain: boolean, kind?: UplinkKind): boolean {
    if (this.ready && this.opts.upstream.publish(topic, payload, qos, retain)) {
      this.count(payload.length);
      return true;
    }
    if (kind)
      void this.queue
        .push(topic, payload, kind, qos)
        .catch((err) => this.opts.log.error({ err }, "cannot queue for the uplink"));
    else this.opts.counters.inc("gateway_up_dropped");
    return false;
  }

  private count(bytes: number): void {
    this.opts.counters.inc("gateway_up_bytes", bytes);
  }

  /**
   * A device's SyncRequest while the center cannot answer: the gateway does, with the jobs run
   * here it should hold (so a device that restarted meanwhile gets them, and sends again what
   * it has not had acknowledged — into the queue).
   */
  private answerSync(deviceId: string, request: Buffer): void {
    let requestId = 0;
    try {
      requestId = Number(decodeEnvelope(request, this.opts.maxPayloadBytes).syncRequest?.requestId ?? 0);
    } catch {
      // Not a SyncRequest: the center, once back, tells the device what it is missing.
    }
    this.local(
      deviceTopic(this.opts.prefix, deviceId, "ctl"),
      encodeEnvelope({
        syncResponse: { assignments: this.control.assignmentsFor(deviceId), requestId },
      }),
    );
    this.opts.counters.inc("gateway_syncs_answered");
  }

  /** Publishes on the gateway's own broker. */
  private local(topic: string, payload: Uint8Array): void {
    this.aedes?.publish(
      { cmd: "publish", topic, payload: Buffer.from(payload), qos: 1, retain: false, dup: false },
      () => {},
    );
  }

  private *siteDevices(): Iterable<SiteDeviceView> {
    for (const d of this.devices.values()) {
      const s = this.states.get(d.id);
      yield {
        id: d.id,
        labels: d.labels,
        online: Boolean(this.aedes && aedesClient(this.aedes, d.id)),
        agentVersion: s?.agentVersion ?? "",
      };
    }
  }

  private gauges(): void {
    const c = this.opts.counters;
    c.set("gateway_devices", this.devices.size);
    c.set("gateway_connected_clients", this.aedes?.connectedClients ?? 0);
    c.set("gateway_uplink_ready", this.ready ? 1 : 0);
    this.opts.onChange();
  }

  /** Down: a message from the center on one of the site's devices' job/ctl topics. */
  fromUpstream(topic: string, payload: Buffer): boolean {
    const t = parseDeviceTopic(this.opts.prefix, topic);
    if (!t || !DOWN.has(t.channel) || !this.devices.has(t.deviceId)) return false;
    this.local(topic, payload);
    this.opts.counters.inc("gateway_relayed_down");
    this.opts.counters.inc("gateway_down_bytes", payload.length);
    return true;
  }

  /**
   * A job for several devices of the site, sent once over the uplink (on this gateway's own job
   * topic): each device gets its own assignment here. Devices not of this site are skipped.
   */
  fanOut(a: JobAssignment, bytes: number): void {
    let n = 0;
    for (const id of a.siteDevices ?? []) {
      if (!this.devices.has(id)) continue;
      this.local(
        deviceTopic(this.opts.prefix, id, "job"),
        encodeEnvelope({
          jobAssignment: { job: a.job, deviceId: id, ...(a.rolloutId ? { rolloutId: a.rolloutId } : {}) },
        }),
      );
      n++;
    }
    this.opts.counters.inc("gateway_site_jobs_in");
    this.opts.counters.inc("gateway_down_bytes", bytes);
    this.opts.counters.inc("gateway_fanned_out", n);
    this.opts.log.info({ devices: n, of: a.siteDevices?.length ?? 0 }, "handed a job to the site's devices");
  }

  /** The center's list of the devices behind this gateway (full, or changes). */
  async apply(sc: SiteCredentials): Promise<void> {
    if (sc.full)
      await this.control.setOperators(
        (sc.operators ?? []).map((op) => ({
          username: op.username ?? "",
          passwordHash: op.passwordHash ?? "",
          keyId: op.keyId ?? "",
          publicKey: "",
        })),
      );
    const ops: Array<{ type: "put" | "del"; key: string; value?: SiteDeviceRecord }> = [];
    const incoming = new Set((sc.devices ?? []).map((d) => d.id ?? ""));
    const shutOut: string[] = [];
    if (sc.full)
      for (const id of this.devices.keys())
        if (!incoming.has(id)) {
          ops.push({ type: "del", key: id });
          shutOut.push(id);
        }
    const fresh: string[] = [];
    for (const d of sc.devices ?? []) {
      const id = d.id ?? "";
      if (!id) continue;
      if (d.removed) {
        ops.push({ type: "del", key: id });
        shutOut.push(id);
        continue;
      }
      const rec: SiteDeviceRecord = {
        id,
        tokenHash: d.tokenHash ?? "",
        certSerials: (d.certSerials ?? []).map((s) => s.toUpperCase()),
        labels: Object.fromEntries(Object.entries(d.labels ?? {})),
      };
      const before = this.devices.get(id);
      // A new secret or certificate (re-flashed): connections made with the old one go.
      if (
        before &&
        (before.tokenHash !== rec.tokenHash || before.certSerials.join() !== rec.certSerials.join())
      )
        shutOut.push(id);
      if (!before) fresh.push(id);
      ops.push({ type: "put", key: id, value: rec });
    }
    await this.store.batch(
      ops.map((op) =>
        op.type === "put" ? { type: "put", key: op.key, value: op.value! } : { type: "del", key: op.key },
      ) as never,
      { sync: true } as never,
    );
    for (const op of ops) {
      if (op.type === "put") this.devices.set(op.key, op.value!);
      else {
        this.devices.delete(op.key);
        this.states.delete(op.key);
      }
    }
    for (const id of shutOut) this.disconnect(id);
    if (fresh.length) this.opts.upstream.subscribe(this.topicsOf(fresh));
    this.opts.log.info(
      { devices: this.devices.size, full: Boolean(sc.full), shutOut },
      "site credentials updated",
    );
  }

  private disconnect(id: string): void {
    const client = this.aedes && aedesClient(this.aedes, id);
    if (client) {
      this.opts.counters.inc("gateway_disconnected_removed");
      this.opts.log.info({ deviceId: id }, "device no longer of this site: closing its connection");
      (client as Client).close();
    }
  }

  private topicsOf(ids: string[]): string[] {
    return ids.flatMap((id) => [
      deviceTopic(this.opts.prefix, id, "job"),
      deviceTopic(this.opts.prefix, id, "ctl"),
    ]);
  }
}
