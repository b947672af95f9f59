// `fleet server --cluster redis://HOST:PORT` (DESIGN.md §9): several broker nodes share
// subscriptions (mqemitter-redis) and sessions, retained messages and wills
// (aedes-persistence-redis), and exactly one of them runs the controller, the node holding a
// lease in Redis. The controller's LevelDB lives in the data directory that all nodes share
// (shared storage); only the lease holder opens it, so LevelDB's own lock backs the lease.
// Device credentials are mirrored into a Redis hash by the active controller, so every node
// can authenticate devices without the registry.
//
// Fail-stop: a leader that cannot renew its lease stops (the process exits and its supervisor
// restarts it as a standby), and a standby takes over once the lease has expired.

import persistence from "aedes-persistence-redis";
import { Redis } from "ioredis";
import MQEmitterRedis from "mqemitter-redis";
import type { Logger } from "pino";
import { tokenMatches } from "./credentials.js";

const RENEW = `if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("pexpire", KEYS[1], ARGV[2])
else
  return 0
end`;

export interface ClusterOptions {
  url: string;
  nodeId: string;
  /** Key namespace, so several fleets can share one Redis. */
  prefix: string;
  leaseMs: number;
  log: Logger;
}

type MirroredDevice = { id: string; tokenHash?: string; certSerials?: string[] };

export class Cluster {
  readonly redis: Redis;
  private renewTimer: NodeJS.Timeout | undefined;
  private acquireTimer: NodeJS.Timeout | undefined;
  private readonly leaseKey: string;
  private readonly devicesKey: string;
  private leader = false;
  private renewedAt = 0;

  constructor(private readonly opts: ClusterOptions) {
    this.redis = new Redis(opts.url, { lazyConnect: true, maxRetriesPerRequest: 2 });
    this.redis.on("error", (err) => opts.log.warn({ err: err.message }, "redis connection error"));
    this.leaseKey = `${opts.prefix}:controller-lease`;
    this.devicesKey = `${opts.prefix}:device-tokens`;
  }

  async connect(): Promise<void> {
    try {
      await this.redis.connect();
      await this.redis.ping();
    } catch (err) {
      this.redis.disconnect();
      throw new Error(`cannot reach the cluster's Redis at ${this.opts.url}: ${(err as Error).message}`);
    }
  }

  /** The shared message bus and persistence for aedes. */
  brokerParts(): { mq: unknown; persistence: unknown } {
    // A subscriber connection must not run ioredis' ready check (INFO) once it has subscribed.
    const mq = MQEmitterRedis({
      subConn: new Redis(this.opts.url, { enableReadyCheck: false }),
      pubConn: new Redis(this.opts.url),
    });
    const p = persistence({ conn: new Redis(this.opts.url) }) as Record<string, unknown>;
    // aedes 1.2 calls addSubscriptions once per topic of a SUBSCRIBE, each time with the whole
    // list; the Redis persistence then waits for one broadcast per call under the same key, and
    // all but the last wait forever (a multi-topic SUBSCRIBE never gets its SUBACK). One call
    // per packet stores the same thing and lets them all finish.
    for (const m of ["addSubscriptions", "removeSubscriptions"]) {
      const orig = (p[m] as (c: unknown, s: object) => Promise<unknown>).bind(p);
      const inflight = new WeakMap<object, Promise<unknown>>();
      p[m] = (client: unknown, subs: object) => {
        let pr = inflight.get(subs);
        if (!pr) {
          pr = orig(client, subs);
          inflight.set(subs, pr);
        }
        return pr;
      };
    }
    return { mq, persistence: p };
  }

  /**
   * Calls `onLeader` once this node holds the lease (now or after the current holder's lease
   * expires), then keeps renewing it; `onLost` when it is lost or cannot be kept.
   */
  campaign(onLeader: () => Promise<void>, onLost: (why: string) => void): void {
    const every = Math.max(100, Math.floor(this.opts.leaseMs / 3));
    const attempt = async () => {
      let got: string | null = null;
      try {
        got = await this.redis.set(this.leaseKey, this.opts.nodeId, "PX", this.opts.leaseMs, "NX");
      } catch (err) {
        this.opts.log.warn({ err: (err as Error).message }, "lease: cannot reach Redis");
      }
      if (got !== "OK") {
        this.acquireTimer = setTimeout(() => void attempt(), every);
        return;
      }
      this.leader = true;
      this.renewedAt = Date.now();
      this.opts.log.info({ node: this.opts.nodeId }, "lease acquired: this node runs the controller");
      this.renewTimer = setInterval(() => void this.renew(onLost, every), every);
      try {
        await onLeader();
      } catch (err) {
        onLost(`could not start the controller: ${(err as Error).message}`);
      }
    };
    void attempt();
  }

  /**
   * Renews the lease. Lost for certain (another holder, or it expired): stop at once. Redis
   * unreachable: try again at the next interval, unless the lease could expire before then —
   * a leader must stop before another node can take over.
   */
  private async renew(onLost: (why: string) => void, every: number): Promise<void> {
    let why: string;
    try {
      const ok = (await this.redis.eval(
        RENEW,
        1,
        this.leaseKey,
        this.opts.nodeId,
        this.opts.leaseMs,
      )) as number;
      if (ok) {
        this.renewedAt = Date.now();
        return;
      }
      why = "the controller lease is held by another node or expired";
    } catch (err) {
      this.opts.log.warn({ err: (err as Error).message }, "lease: renewal failed");
      if (Date.now() + every < this.renewedAt + this.opts.leaseMs) return;
      why = `the controller lease could not be renewed in time: ${(err as Error).message}`;
    }
    this.leader = false;
    if (this.renewTimer) clearInterval(this.renewTimer);
    onLost(why);
  }

  /** The token hash of a device, from the mirror every node reads. */
  async deviceTokenHash(id: string): Promise<string | undefined> {
    return (await this.redis.hget(this.devicesKey, id)) ?? undefined;
  }

  async verifyDevice(id: string, password: Buffer | string): Promise<"ok" | "unknown" | "bad"> {
    const hash = await this.deviceTokenHash(id);
    if (!hash) return "unknown";
    return tokenMatches(password, hash) ? "ok" : "bad";
  }

  /** The device's current client certificate serials (M9), from the mirror. */
  async certAllowed(id: string, serial: string | undefined): Promise<boolean> {
    if (!serial) return false;
    const serials = (await this.redis.hget(this.certsKey, id)) ?? "";
    return serials.split(",").includes(serial.toUpperCase());
  }

  private get certsKey(): string {
    return `${this.devicesKey}:certs`;
  }

  /** Replaces the mirror with the registry's devices (at takeover). */
  async mirrorAll(devices: Iterable<MirroredDevice>): Promise<void> {
    const m = this.redis.multi().del(this.devicesKey).del(this.certsKey);
    const tokens: string[] = [];
    const certs: string[] = [];
    for (const d of devices) {
      if (d.tokenHash) tokens.push(d.id, d.tokenHash);
      if (d.certSerials?.length) certs.push(d.id, d.certSerials.join(","));
    }
    for (let i = 0; i < tokens.length; i += 2000) m.hset(this.devicesKey, ...tokens.slice(i, i + 2000));
    for (let i = 0; i < certs.length; i += 2000) m.hset(this.certsKey, ...certs.slice(i, i + 2000));
    await m.exec();
  }

  async mirror(devices: ReadonlyArray<MirroredDevice>): Promise<void> {
    const m = this.redis.multi();
    for (const d of devices) {
      if (d.tokenHash) m.hset(this.devicesKey, d.id, d.tokenHash);
      if (d.certSerials?.length) m.hset(this.certsKey, d.id, d.certSerials.join(","));
      else m.hdel(this.certsKey, d.id);
    }
    await m.exec();
  }

  async unmirror(id: string): Promise<void> {
    await this.redis.multi().hdel(this.devicesKey, id).hdel(this.certsKey, id).exec();
  }

  async stop(): Promise<void> {
    if (this.acquireTimer) clearTimeout(this.acquireTimer);
    if (this.renewTimer) clearInterval(this.renewTimer);
    if (this.leader) {
      // Hand over at once instead of letting the lease run out.
      await this.redis
        .eval(
          `if redis.call("get", KEYS[1]) == ARGV[1] then return redis.call("del", KEYS[1]) end return 0`,
          1,
          this.leaseKey,
          this.opts.nodeId,
        )
        .catch(() => 0);
      this.leader = false;
    }
    this.redis.disconnect();
  }
}
