// The agent's MQTT connection: one broker URL at a time, tried in turn, with exponential
// backoff and full jitter between attempts (MQTT.js alone retries every second, which turns
// a broker restart into a reconnect storm).
import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import mqtt, { type IClientOptions, type IPublishPacket, type MqttClient } from "mqtt";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { wrapSendPacket } from "../common/internals.js";
import { settlesWithin } from "../common/timeout.js";
import { type BackoffOptions, backoffDelay } from "./retry.js";

export interface ConnectionOptions {
  brokers: string[];
  clientId: string;
  username?: string;
  password?: string;
  caCertFile?: string;
  certFile?: string;
  keyFile?: string;
  will: { topic: string; payload: Buffer };
  backoff: BackoffOptions;
  /**
   * Connected to a later broker of the list (the center, when the site gateway was gone): after
   * this long, leave it cleanly and try the first one again (0 = stay).
   */
  preferFirstAfterMs?: number;
  log: Logger;
  counters: Counters;
  /** Count packets by kind too (`packets`; the simulator's `--packet-kinds`, for the cost table). */
  countPacketKinds?: boolean;
  /** Called for every incoming PUBLISH; the PUBACK is sent when the promise settles. */
  onMessage: (topic: string, payload: Buffer, qos: number) => Promise<void>;
}

const MQTT_TRACE = /mqttjs/.test(process.env.DEBUG ?? "");

export interface ConnectionEvents {
  up: [client: MqttClient, sessionPresent: boolean];
  down: [];
}

export class Connection extends EventEmitter<ConnectionEvents> {
  private client: MqttClient | undefined;
  private attempt = 0;
  private returnTimer: NodeJS.Timeout | undefined;
  private brokerIndex = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private isUp = false;
  readonly attemptTimes: number[] = [];
  /** MQTT packets each way over every session so far (what the cost benchmark counts). */
  readonly wire = { packetsIn: 0, packetsOut: 0, bytesIn: 0, bytesOut: 0, pingsIn: 0, pingsOut: 0 };
  /**
   * Packets by direction, kind and (publishes) channel: "in publish job", "out puback", ...
   * (only with `countPacketKinds`: a string per packet).
   */
  readonly packets = new Map<string, number>();

  constructor(private readonly opts: ConnectionOptions) {
    super();
  }

  get connected(): boolean {
    return this.isUp && Boolean(this.client?.connected);
  }

  /** `wire` with the bytes of the session still open. */
  wireStats(): Record<string, number> {
    const socket = this.client?.stream as { bytesRead?: number; bytesWritten?: number } | undefined;
    const open = this.client?.connected ? socket : undefined;
    return {
      ...Object.fromEntries(this.packets),
      ...this.wire,
      bytesIn: this.wire.bytesIn + (open?.bytesRead ?? 0),
      bytesOut: this.wire.bytesOut + (open?.bytesWritten ?? 0),
    };
  }

  get current(): MqttClient | undefined {
    return this.connected ? this.client : undefined;
  }

  start(): void {
    this.stopped = false;
    this.connectNext();
  }

  private connectNext(): void {
    if (this.stopped) return;
    const url = this.opts.brokers[this.brokerIndex % this.opts.brokers.length]!;
    this.brokerIndex++;
    this.opts.counters.inc("connect_attempts");
    this.attemptTimes.push(Date.now());
    if (this.attemptTimes.length > 100) this.attemptTimes.shift();
    const opts: IClientOptions = {
      clientId: this.opts.clientId,
      username: this.opts.username ?? this.opts.clientId,
      password: this.opts.password,
      clean: false,
      protocolVersion: 4,
      reconnectPeriod: 0, // we schedule reconnects ourselves
      connectTimeout: 10_000,
      keepalive: KEEPALIVE_S,
      will: { topic: this.opts.will.topic, payload: this.opts.will.payload, qos: 1, retain: true },
      // MQTT.js's own trace (the `debug` module) costs a call per packet step even when off;
      // DEBUG=mqttjs* still turns it on.
      ...(MQTT_TRACE ? {} : { log: () => {} }),
      ...(this.opts.caCertFile ? { ca: readFileSync(this.opts.caCertFile) } : {}),
      ...(this.opts.certFile && this.opts.keyFile
        ? { cert: readFileSync(this.opts.certFile), key: readFileSync(this.opts.keyFile) }
        : {}),
    };
    const client = mqtt.connect(url, opts);
    this.client = client;
    const wire = this.wire;
    const count = this.opts.countPacketKinds
      ? (dir: string, p: { cmd: string; topic?: string }) => {
          const key = `${dir} ${p.cmd}${p.topic ? ` ${p.topic.slice(p.topic.lastIndexOf("/") + 1)}` : ""}`;
          this.packets.set(key, (this.packets.get(key) ?? 0) + 1);
        }
      : undefined;
    client.on("packetreceive", (p) => {
      wire.packetsIn++;
      if (p.cmd === "pingresp") wire.pingsIn++;
      count?.("in", p as { cmd: string; topic?: string });
    });
    client.on("packetsend", (p) => {
      wire.packetsOut++;
      if (p.cmd === "pingreq") wire.pingsOut++;
      count?.("out", p as { cmd: string; topic?: string });
    });
    client.on("close", () => {
      const socket = client.stream as { bytesRead?: number; bytesWritten?: number } | undefined;
      wire.bytesIn += socket?.bytesRead ?? 0;
      wire.bytesOut += socket?.bytesWritten ?? 0;
    });
    pipelineAcks(client, (packet) =>
      this.opts
        .onMessage(
          packet.topic,
          Buffer.isBuffer(packet.payload) ? packet.payload : Buffer.from(packet.payload),
          packet.qos,
        )
        .then(
          () => true,
          (err: Error) => {
            // Not acknowledged: the broker re-delivers it, and sync re-sends it anyway.
            this.opts.counters.inc("message_not_acked");
            this.opts.log.error(
              { err, topic: packet.topic },
              "could not handle message; not acknowledging it",
            );
            return false;
          },
        ),
    );
    client.on("connect", (connack) => {
      this.attempt = 0;
      this.isUp = true;
      this.opts.log.info({ broker: url, sessionPresent: connack.sessionPresent }, "connected");
      this.emit("up", client, connack.sessionPresent);
      const fallback = url !== this.opts.brokers[0];
      if (fallback && this.opts.preferFirstAfterMs) {
        if (this.returnTimer) clearTimeout(this.returnTimer);
        this.returnTimer = setTimeout(() => {
          if (this.client !== client || !client.connected || this.stopped) return;
          this.opts.log.info({ from: url, to: this.opts.brokers[0] }, "trying the preferred broker again");
          this.opts.counters.inc("broker_return_attempts");
          this.brokerIndex = 0;
          client.end(); // a clean DISCONNECT: no Last Will announces this device offline
        }, this.opts.preferFirstAfterMs);
      }
    });
    client.on("error", (err) => {
      this.opts.counters.inc("connection_errors");
      this.opts.log.warn({ broker: url, err: err.message }, "connection error");
    });
    client.on("close", () => {
      if (this.client !== client) return;
      if (this.returnTimer) clearTimeout(this.returnTimer);
      if (this.isUp) {
        this.isUp = false;
        this.emit("down");
      }
      client.removeAllListeners("close");
      client.end(true);
      if (this.stopped) return;
      const delay = backoffDelay(this.attempt++, this.opts.backoff);
      this.opts.log.info(
        { delayMs: delay, attempt: this.attempt },
        "disconnected; reconnecting after backoff",
      );
      this.timer = setTimeout(() => this.connectNext(), delay);
    });
  }

  async stop(beforeClose?: (client: MqttClient) => Promise<void>): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    if (this.returnTimer) clearTimeout(this.returnTimer);
    const c = this.client;
    if (!c) return;
    if (c.connected && beforeClose)
      await settlesWithin(
        beforeClose(c).catch(() => {}),
        2000,
      );
    // A graceful end waits for in-flight QoS 1 publishes, which never finish while offline.
    await settlesWithin(new Promise<void>((resolve) => c.end(!c.connected, {}, () => resolve())), 2000);
    if (c.connected || !c.disconnected) c.end(true);
    this.isUp = false;
  }
}

/** MQTT keepalive: a PINGREQ after this long without a packet sent. */
const KEEPALIVE_S = 30;

/**
 * A QoS 1 message is acknowledged only after `handle` has stored it (DESIGN.md §4.2), but
 * without waiting for one message's fsync before reading the next: MQTT.js reads the next
 * PUBLISH only once the PUBACK of the previous one is sent, so its PUBACK is held here instead
 * (MQTT.js's internal `_sendPacket`, the one place PUBACKs leave) until the message is durable,
 * and released in the order the messages arrived (MQTT 3.1.1 §4.6). The agent's store then
 * writes many messages with one fsync (group commit). A message that could not be stored gets
 * no PUBACK: the broker delivers it again.
 */
export function pipelineAcks(client: MqttClient, handle: (packet: IPublishPacket) => Promise<boolean>): void {
  const held = new Map<number, Promise<boolean>>();
  let order: Promise<unknown> = Promise.resolve();
  wrapSendPacket(client, (send) => (packet, cb, ...rest) => {
    const stored =
      packet.cmd === "puback" && packet.messageId !== undefined ? held.get(packet.messageId) : undefined;
    if (!stored) return send(packet, cb, ...rest);
    held.delete(packet.messageId!);
    order = order
      .then(() => stored)
      .then((ok) => {
        if (ok && client.connected) send(packet);
      });
    cb?.(); // read the next message now
  });
  client.handleMessage = (packet: IPublishPacket, done: (err?: Error) => void) => {
    const stored = handle(packet);
    if (packet.qos === 1 && packet.messageId !== undefined) {
      held.set(packet.messageId, stored);
      done();
    } else void stored.then(() => done());
  };
}
