// Who may connect to the embedded broker, and what they may do there: connection limits (total
// and per address), authentication of the controller, operators and devices, and the ACL on
// every publish, subscribe and Last Will. Independent of where device credentials live (the
// registry, a cluster's Redis mirror), so any embedded aedes can use it.
import type { TLSSocket } from "node:tls";
import type { AedesOptions, AuthenticateError, Client } from "aedes";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { clientWill, remoteAddress } from "../common/internals.js";
import { DEVICE_ID_RE } from "../proto/topics.js";
import { type Behind, canPublish, canSubscribe, type Identity } from "./acl.js";
import type { ServerConfig } from "./config.js";
import { tokenHash, tokenMatches } from "./credentials.js";
import type { PasswordGate, Verdict } from "./password-gate.js";

/** Where device credentials are checked. */
export interface DeviceCredentials {
  verify(id: string, password: Buffer | undefined): Promise<"ok" | "unknown" | "bad">;
  /** The device's current certificate serial (M9). */
  certAllowed(id: string, serial: string | undefined): Promise<boolean>;
}

export type FleetClient = Client & { fleet?: Identity };

export function authError(message: string, returnCode: number): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

/** What the gate needs of a server's config (a gateway has no controller and no operators yet). */
export type GateConfig = Pick<ServerConfig, "prefix" | "operators"> & {
  controller?: ServerConfig["controller"];
  limits: Pick<ServerConfig["limits"], "maxConnections" | "connectsPerSecondPerAddress" | "maxPayloadBytes">;
};

export interface GateOptions {
  config: GateConfig;
  devices: DeviceCredentials;
  passwords: PasswordGate;
  counters: Counters;
  log: Logger;
  /** Clients connected now (for the connection limit). */
  connected(): number;
  /** Called first for every connecting client. */
  prepare?(client: Client): void;
  /** Whether a device is behind a gateway (its topics are the gateway's too). */
  behind?: Behind;
}

/** The aedes hooks, ready to spread into `Aedes.createBroker`. */
export class BrokerGate {
  private readonly rate = new Map<string, { tokens: number; at: number }>();
  private readonly controllerHash: string;

  constructor(private readonly opts: GateOptions) {
    this.controllerHash = opts.config.controller ? tokenHash(opts.config.controller.password) : "";
  }

  /** Forgets per-address connection rates (call every minute). */
  prune(): void {
    this.rate.clear();
    this.opts.passwords.prune();
  }

  readonly hooks: Required<
    Pick<AedesOptions, "preConnect" | "authenticate" | "authorizePublish" | "authorizeSubscribe">
  > = {
    preConnect: (client, _packet, done) => this.preConnect(client, done),
    authenticate: (client, username, password, done) => {
      this.authenticate(client as FleetClient, username, password).then(
        (who) => {
          // The Last Will is a publish like any other (M11): checked now, before it is kept.
          const will = clientWill(client);
          if (will && !this.mayPublish(who, will.topic, Boolean(will.retain))) {
            this.opts.counters.inc("acl_will_denied");
            this.opts.log.warn(
              { clientId: client.id, topic: will.topic },
              "connection refused: will topic not allowed",
            );
            return done(authError(`not authorized to leave a will on ${will.topic}`, 5), false);
          }
          (client as FleetClient).fleet = who;
          done(null, true);
        },
        (err: AuthenticateError) => {
          this.opts.counters.inc("auth_failed");
          this.opts.log.warn({ clientId: client.id, username, reason: err.message }, "connection refused");
          done(err, false);
        },
      );
    },
    authorizePublish: (client, packet, done) => {
      const who = (client as FleetClient | null)?.fleet;
      if (!who) return done(null); // the broker itself (will messages are checked at connect)
      if (!this.mayPublish(who, packet.topic, packet.retain)) {
        this.opts.counters.inc("acl_publish_denied");
        this.opts.log.warn(
          { clientId: client?.id, topic: packet.topic },
          "publish denied; closing the connection",
        );
        return done(new Error(`not authorized to publish to ${packet.topic}`));
      }
      if (packet.payload.length > this.opts.config.limits.maxPayloadBytes) {
        this.opts.counters.inc("payload_too_large");
        return done(new Error(`payload of ${packet.payload.length} bytes exceeds the limit`));
      }
      done(null);
    },
    authorizeSubscribe: (client, sub, done) => {
      const who = (client as FleetClient).fleet;
      if (who && canSubscribe(who, this.opts.config.prefix, sub.topic, this.opts.behind))
        return done(null, sub);
      this.opts.counters.inc("acl_subscribe_denied");
      this.opts.log.warn({ clientId: client.id, topic: sub.topic }, "subscription denied");
      done(null, null);
    },
  };

  /** The ACL, and retained messages only on a device's own `state`. */
  mayPublish(who: Identity, topic: string, retain: boolean): boolean {
    return (
      canPublish(who, this.opts.config.prefix, topic, this.opts.behind) &&
      (!retain || topic.endsWith("/state"))
    );
  }

  private preConnect(client: Client, done: (err: Error | null, ok: boolean) => void): void {
    this.opts.prepare?.(client);
    this.opts.counters.inc("connect_attempts");
    if (this.opts.connected() >= this.opts.config.limits.maxConnections) {
      this.opts.counters.inc("connections_refused_max");
      done(new Error("too many connections"), false);
      return;
    }
    const addr = remoteAddress(client);
    const limit = this.opts.config.limits.connectsPerSecondPerAddress;
    const now = Date.now();
    const b = this.rate.get(addr) ?? { tokens: limit, at: now };
    b.tokens = Math.min(limit, b.tokens + ((now - b.at) / 1000) * limit);
    b.at = now;
    if (b.tokens < 1) {
      this.opts.counters.inc("connections_refused_rate");
      done(new Error(`connection rate from ${addr} over ${limit}/s`), false);
      return;
    }
    b.tokens -= 1;
    this.rate.set(addr, b);
    done(null, true);
  }

  private async authenticate(
    client: FleetClient,
    username: Readonly<string | undefined>,
    password: Readonly<Buffer | undefined>,
  ): Promise<Identity> {
    const cfg = this.opts.config;
    if (cfg.controller && username === cfg.controller.username) {
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
    const devices = this.opts.devices;
    if (password?.length) {
      const verdict = await devices.verify(deviceId, password as Buffer);
      // Unknown and wrong look the same to the client (no enumeration of device ids); the log tells.
      if (verdict === "unknown") throw authError(`unknown device ${deviceId}`, 4);
      if (verdict === "ok") return { kind: "device", id: deviceId };
      throw authError("bad device credentials", 4);
    }
    if ((await devices.verify(deviceId, undefined)) === "unknown")
      throw authError(`unknown device ${deviceId}`, 4);
    if (certCn && certCn === deviceId) {
      const serial = tls.getPeerCertificate?.().serialNumber;
      if (await devices.certAllowed(deviceId, serial)) return { kind: "device", id: deviceId };
      this.opts.counters.inc("cert_revoked");
      throw authError("client certificate revoked", 4);
    }
    throw authError("no credentials", 4);
  }

  private async passwordCheck(address: string, password: string, stored: string): Promise<Verdict> {
    const v = await this.opts.passwords.check(address, password, stored);
    if (v !== "ok") this.opts.counters.inc(`operator_login_${v}`);
    return v;
  }
}
