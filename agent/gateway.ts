// A site gateway (DESIGN.md §11): an agent that also runs an embedded aedes for the devices of
// its site. It authenticates them offline — the center sends the credentials of exactly the
// devices that name this gateway (SiteCredentials on the gateway's ctl topic), kept in LevelDB —
// applies the same per-device ACL as the center (broker/gate.ts), and relays over the agent's
// one upstream connection, as itself: what the devices publish (status, sync, state, telemetry)
// goes up unchanged; what the center sends them (job, ctl) comes down. The delivery protocol
// stays end to end: jobs are signed by operators and statuses are acknowledged by the
// controller, so the gateway can delay but not forge; a status lost in a gateway crash is sent
// again by the device's outbox.

import { readFileSync } from "node:fs";
import { createServer as createTlsServer, type Server as TlsServer } from "node:tls";
import type { AbstractSublevel } from "abstract-level";
import { Aedes, type Client } from "aedes";
import type { Logger } from "pino";
import { tokenMatches, verifyPassword } from "../broker/credentials.js";
import { BrokerGate, type FleetClient } from "../broker/gate.js";
import { limitPackets, type PacketLimits } from "../broker/packet-limit.js";
import { PasswordGate } from "../broker/password-gate.js";
import type { Counters } from "../common/counters.js";
import { aedesClient, aedesClients, destroyConnection } from "../common/internals.js";
import { settlesWithin } from "../common/timeout.js";
import { decodeEnvelope, encodeEnvelope } from "../proto/envelope.js";
import type { JobAssignment, SiteCredentials, StatusBatch } from "../proto/index.js";
import { deviceTopic, parseDeviceTopic } from "../proto/topics.js";
import type { Db } from "./store.js";

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
  /** The agent's upstream connection (undefined while it is down). */
  upstream: {
    publish(topic: string, payload: Buffer, qos: 0 | 1, retain: boolean): boolean;
    subscribe(topics: string[]): void;
  };
}

const UP = new Set(["status", "sync", "state", "telemetry"]);
const CONNECT_TIMEOUT_MS = 10_000;
const MAX_KEEPALIVE_S = 600; // as the server's default limits.maxKeepaliveS
/** How long the site's status batches are collected before they go up together. */
const SITE_STATUS_WINDOW_MS = 20;
const DOWN = new Set(["job", "ctl"]);

type Sub<V> = AbstractSublevel<Db, string | Buffer | Uint8Array, string, V>;

export class SiteGateway {
  private readonly devices = new Map<string, SiteDeviceRecord>();
  /** Each site device's last DeviceState (retained), to announce again upstream after an outage. */
  private readonly states = new Map<string, Buffer>();
  private pending: Array<{ deviceId: string; batch: StatusBatch }> = [];
  private pendingBytes = 0;
  private statusTimer: NodeJS.Timeout | undefined;
  private readonly store: Sub<SiteDeviceRecord>;
  private aedes: Aedes | undefined;
  private server: TlsServer | undefined;
  port = 0;

  constructor(private readonly opts: GatewayOptions) {
    this.store = opts.db.sublevel<string, SiteDeviceRecord>("site", {
      valueEncoding: "json",
    }) as Sub<SiteDeviceRecord>;
  }

  get siteSize(): number {
    return this.devices.size;
  }

  async start(): Promise<void> {
    const o = this.opts;
    for await (const d of this.store.values()) this.devices.set(d.id, d);
    const gate = new BrokerGate({
      config: {
        prefix: o.prefix,
        operators: [],
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
    aedes.on("publish", (packet, client) => {
      // Up: what the site's devices publish on their own topics (wills included).
      const t = parseDeviceTopic(o.prefix, packet.topic);
      if (!t || !UP.has(t.channel) || !this.devices.has(t.deviceId)) return;
      if (client && (client as FleetClient).fleet?.id !== t.deviceId) return;
      if (t.channel === "state" && packet.retain)
        this.states.set(t.deviceId, Buffer.from(packet.payload as Buffer));
      if (t.channel === "status" && this.collect(t.deviceId, packet.payload as Buffer)) return;
      const sent = o.upstream.publish(
        packet.topic,
        packet.payload as Buffer,
        packet.qos === 0 ? 0 : 1,
        packet.retain,
      );
      o.counters.inc(sent ? "gateway_relayed_up" : "gateway_up_dropped");
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
  }

  async stop(): Promise<void> {
    this.flushStatus();
    this.server?.close();
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
    const room = Math.floor(this.opts.maxPayloadBytes * 0.8);
    if (!batch || payload.length > room / 2) return false;
    if (this.pendingBytes + payload.length > room) this.flushStatus();
    this.pending.push({ deviceId, batch });
    this.pendingBytes += payload.length + deviceId.length + 8;
    this.statusTimer ??= setTimeout(() => this.flushStatus(), SITE_STATUS_WINDOW_MS);
    return true;
  }

  private flushStatus(): void {
    if (this.statusTimer) clearTimeout(this.statusTimer);
    this.statusTimer = undefined;
    if (!this.pending.length) return;
    const batches = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    const payload = Buffer.from(encodeEnvelope({ siteStatus: { batches } }));
    const topic = deviceTopic(this.opts.prefix, this.opts.deviceId, "status");
    const sent = this.opts.upstream.publish(topic, payload, 1, false);
    // Lost with a down uplink: each device's outbox sends it again (no StatusAck came).
    this.opts.counters.inc(sent ? "gateway_site_status_sent" : "gateway_up_dropped");
    this.opts.counters.inc("gateway_site_status_batches", batches.length);
    this.opts.log.debug({ batches: batches.length, bytes: payload.length }, "site statuses sent up");
  }

  /**
   * The upstream connection is (back) up: listen for the site's devices there and announce
   * their states again (a restarted center has lost its retained ones). What they have not
   * received the center re-sends when this gateway syncs (a site sync, broker/controller).
   */
  onUpstream(): void {
    this.opts.upstream.subscribe(this.topicsOf([...this.devices.keys()]));
    for (const [id, state] of this.states)
      if (this.devices.has(id))
        this.opts.upstream.publish(deviceTopic(this.opts.prefix, id, "state"), state, 1, true);
  }

  /** Down: a message from the center on one of the site's devices' job/ctl topics. */
  fromUpstream(topic: string, payload: Buffer): boolean {
    const t = parseDeviceTopic(this.opts.prefix, topic);
    if (!t || !DOWN.has(t.channel) || !this.devices.has(t.deviceId) || !this.aedes) return false;
    this.aedes.publish({ cmd: "publish", topic, payload, qos: 1, retain: false, dup: false }, () => {});
    this.opts.counters.inc("gateway_relayed_down");
    return true;
  }

  /**
   * A job for several devices of the site, sent once over the uplink (on this gateway's own job
   * topic): each device gets its own assignment here. Devices not of this site are skipped.
   */
  fanOut(a: JobAssignment): void {
    if (!this.aedes) return;
    let n = 0;
    for (const id of a.siteDevices ?? []) {
      if (!this.devices.has(id)) continue;
      const payload = Buffer.from(
        encodeEnvelope({
          jobAssignment: { job: a.job, deviceId: id, ...(a.rolloutId ? { rolloutId: a.rolloutId } : {}) },
        }),
      );
      this.aedes.publish(
        {
          cmd: "publish",
          topic: deviceTopic(this.opts.prefix, id, "job"),
          payload,
          qos: 1,
          retain: false,
          dup: false,
        },
        () => {},
      );
      n++;
    }
    this.opts.counters.inc("gateway_site_jobs_in");
    this.opts.counters.inc("gateway_fanned_out", n);
    this.opts.log.info({ devices: n, of: a.siteDevices?.length ?? 0 }, "handed a job to the site's devices");
  }

  /** The center's list of the devices behind this gateway (full, or changes). */
  async apply(sc: SiteCredentials): Promise<void> {
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
