// The controller: an ordinary MQTT client of the broker (so the broker stays replaceable),
// with the registry, job store, delivery and operator RPC. State lives in LevelDB; the only
// timers are global (registry flush, nonce and history pruning), none per device.
import { createPublicKey, type KeyObject } from "node:crypto";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import type { Logger } from "pino";
import { Counters } from "../../common/counters.js";
import { settlesWithin } from "../../common/timeout.js";
import { ApiError, api, formatIssues, type Method } from "../../proto/api.js";
import { decodeEnvelope, encodeEnvelope, PayloadError } from "../../proto/envelope.js";
import { pb, type SiteJob, stateName, TaskState } from "../../proto/index.js";
import { deviceTopic, eventsTopic, rpcRequestTopic, rpcResponseTopic } from "../../proto/topics.js";
import type { ServerConfig } from "../config.js";
import type { CertPair } from "../pki.js";
import { answerRpc } from "../rpc-answer.js";
import { checkSignedJob, type Handlers, operatorApi } from "./api.js";
import { AuditLog } from "./audit.js";
import { Delivery } from "./delivery.js";
import { deviceInbox } from "./device-inbox.js";
import { WorkQueue } from "./dispatch.js";
import { FAILED_OUTCOMES } from "./job-state.js";
import { JobStore } from "./job-store.js";
import { Notifier } from "./notify.js";
import { dropRefusedPublishes } from "./refused.js";
import type { Registry } from "./registry.js";
import { Rollouts, type TelemetrySample } from "./rollouts.js";
import type { ControllerStore, DeviceRecord } from "./store.js";
import { jobCounts } from "./views.js";

/** Telemetry samples kept per device for the dashboard (2 h at the default 60 s interval). */
const TELEMETRY_HISTORY = 120;
/** Dashboard calls that change nothing (not audited). */
const READ_ONLY = new Set<Method>([
  "server.info",
  "device.ls",
  "device.show",
  "jobs.ls",
  "jobs.show",
  "rollout.ls",
  "rollout.show",
  "notify.ls",
  "audit.ls",
]);

export interface ControllerOptions {
  config: ServerConfig;
  store: ControllerStore;
  /** Shared with the artifact server; made from `store` when absent. */
  jobs?: JobStore;
  registry: Registry;
  brokerUrl: string;
  ca: CertPair;
  log: Logger;
  counters?: Counters;
  /** The server's HTTP URL (artifacts), told to operators and flashed devices. */
  httpUrl?: string;
  httpsUrl?: string;
  /**
   * The embedded single-node broker, in-process (issue 17): what devices publish on their
   * status, sync, state and telemetry topics is handed to the controller from the broker's
   * publish pipeline, and the controller's publishes enter the broker directly — not one more
   * MQTT hop over loopback (socket writes, parsing and a PUBACK each way per message). End to
   * end delivery does not change: a status is acknowledged only after it is persisted (StatusAck),
   * a sync is re-sent until answered. RPC requests still come over the MQTT connection. With
   * an external or clustered broker everything goes through MQTT.
   */
  link?: BrokerLink;
}

/** The embedded broker as the controller sees it in-process. */
export interface BrokerLink {
  /** Calls `deliver` for each message a device publishes on its status/sync/state/telemetry topic. */
  tap(deliver: (topic: string, payload: Buffer) => void): void;
  publish(topic: string, payload: Buffer, qos: 0 | 1, retain: boolean): void;
  /** Whether any client may be subscribed to `topic` (never a stale "no"). */
  subscribed(topic: string): boolean;
}

export class Controller {
  readonly counters: Counters;
  readonly delivery: Delivery;
  readonly rollouts: Rollouts;
  readonly workQueue: WorkQueue;
  /** Latest telemetry per device, for health-gated rollout waves. */
  private readonly telemetry = new Map<string, TelemetrySample>();
  /** The last TELEMETRY_HISTORY samples per device, for the dashboard's charts. */
  private readonly history = new Map<string, TelemetrySample[]>();
  /** Listeners to the controller's events (the dashboard's live pages). */
  private readonly eventListeners = new Set<(payload: Uint8Array) => void>();
  private client: MqttClient | undefined;
  private readonly log: Logger;
  private readonly prefix: string;
  private readonly operatorKeys: Map<string, KeyObject>;
  private readonly operatorNames: Map<string, string>;
  private readonly api: Handlers;
  private timers: NodeJS.Timeout[] = [];
  private soon: NodeJS.Timeout | undefined;
  /** Whether the step `soon` runs includes the rollouts (see stepSoon). */
  private soonRollouts = false;
  /** Nonces being recorded right now (the LevelDB check alone races with itself). */
  private readonly nonces = new Set<string>();
  private lastStep = 0;
  private readonly inbox: (topic: string, payload: Buffer) => Promise<void>;
  /** Operator requests, accepted and refused (hash-chained). */
  readonly audit: AuditLog;
  readonly notifier: Notifier;

  constructor(private readonly opts: ControllerOptions) {
    this.log = opts.log.child({ component: "controller" });
    this.counters = opts.counters ?? new Counters();
    this.prefix = opts.config.prefix;
    this.operatorKeys = new Map(opts.config.operators.map((op) => [op.keyId, createPublicKey(op.publicKey)]));
    this.operatorNames = new Map(opts.config.operators.map((op) => [op.keyId, op.username]));
    const jobs = opts.jobs ?? new JobStore(opts.store);
    this.audit = new AuditLog(opts.store);
    this.notifier = new Notifier({
      store: opts.store,
      registry: opts.registry,
      log: this.log.child({ component: "notify" }),
      counters: this.counters,
      now: () => Date.now(),
    });
    this.delivery = new Delivery({
      store: opts.store,
      jobs,
      registry: opts.registry,
      prefix: this.prefix,
      log: this.log.child({ component: "delivery" }),
      counters: this.counters,
      publish: (topic, payload, qos) => this.publish(topic, payload, qos),
      ackQos: opts.link ? 0 : 1,
      maxPayloadBytes: opts.config.limits.maxPayloadBytes,
      now: () => Date.now(),
      onFinished: (jobId, f) => {
        // A job's last device: its rollout steps now (the wave or rollout is done now).
        if (f.last) void this.rollouts.jobSettled(jobId);
        // Any other device that did not succeed may abort a rollout (its failure rate) soon. A
        // success may not: the rollouts wait for the last device (or for the 1 s tick, when
        // nobody will say which is last) — each step goes over all of a rollout's assignments,
        // and 20 a second of those cost a 10,000-device rollout 12% of the server's CPU.
        this.stepSoon(!f.last && (f.state !== TaskState.SUCCEEDED || !f.lastKnown));
      },
      // Events are built only when someone may get them: the dashboard's tap, a subscriber
      // of the events topic (asked of the embedded broker), or any with an external broker.
      wantsEvents: () =>
        this.eventListeners.size > 0 ||
        !this.opts.link ||
        this.opts.link.subscribed(eventsTopic(this.prefix)),
      wantsJobEnds: () => this.notifier.wants("job.succeeded") || this.notifier.wants("job.failed"),
      onJobEnded: (job, state, asgs) =>
        this.notifier.ops(state === "SUCCEEDED" ? "job.succeeded" : "job.failed", {
          jobId: job.id,
          name: job.name,
          state,
          ...(job.rolloutId ? { rolloutId: job.rolloutId } : {}),
          counts: jobCounts(job, asgs),
          failed: asgs
            .filter((a) => FAILED_OUTCOMES.has(a.state))
            .slice(0, 20)
            .map((a) => ({ deviceId: a.deviceId, state: stateName(a.state), message: a.message })),
        }),
    });
    const parts = {
      store: opts.store,
      jobs,
      registry: opts.registry,
      delivery: this.delivery,
      counters: this.counters,
      now: () => Date.now(),
    };
    this.rollouts = new Rollouts({
      ...parts,
      log: this.log.child({ component: "rollouts" }),
      telemetry: (d) => this.telemetry.get(d),
      notifyOps: (event, r, detail) =>
        event === "rollout.succeeded" || event === "rollout.aborted" || event === "rollout.paused"
          ? this.notifier.ops(event, {
              rolloutId: r.id,
              jobId: r.jobId,
              name: r.name,
              state: r.state,
              ...detail,
            })
          : [],
    });
    this.workQueue = new WorkQueue({ ...parts, log: this.log.child({ component: "work-queue" }) });
    opts.registry.onCredentials = (devices, removed) => {
      // One message (or a few pages) per gateway, however many of its devices changed.
      const bySite = new Map<string, DeviceRecord[]>();
      for (const d of devices) if (d.via) bySite.set(d.via, [...(bySite.get(d.via) ?? []), d]);
      for (const [gateway, site] of bySite) this.sendSite(gateway, site, false, removed);
      if (removed)
        for (const d of devices) {
          this.telemetry.delete(d.id);
          this.history.delete(d.id);
        }
    };
    opts.registry.onBadFacts = (deviceId) => {
      this.counters.inc("device_facts_refused");
      this.log.warn(
        { deviceId },
        "refused a device's facts (over 32 KiB, over 6 levels deep, or not an object)",
      );
    };
    this.api = operatorApi({
      config: opts.config,
      jobs,
      registry: opts.registry,
      delivery: this.delivery,
      rollouts: this.rollouts,
      workQueue: this.workQueue,
      notifier: this.notifier,
      audit: this.audit,
      ca: opts.ca,
      operatorKeys: this.operatorKeys,
      httpUrl: opts.httpUrl,
      httpsUrl: opts.httpsUrl,
    });
    this.inbox = deviceInbox({
      prefix: this.opts.config.prefix,
      maxPayloadBytes: this.opts.config.limits.maxPayloadBytes,
      registry: this.opts.registry,
      delivery: this.delivery,
      onDeviceChange: async (deviceId, change) => {
        await this.notifier.emit(`device.${change}`, {}, deviceId);
        // A gateway gone takes its site's connections with it: their Last Wills died with it.
        if (change !== "offline" || !opts.registry.get(deviceId)?.gateway) return;
        for (const d of opts.registry.behind(deviceId)) {
          if (opts.registry.observeState(d.id, { online: false }, Date.now()) !== "offline") continue;
          this.delivery.event({
            kind: "device.offline",
            deviceId: d.id,
            detailJson: JSON.stringify({ via: deviceId }),
          });
          await this.notifier.emit("device.offline", { via: deviceId }, d.id);
        }
      },
      onSiteJobs: (gatewayId, jobs) => this.recordSiteJobs(gatewayId, jobs),
      onSync: async (deviceId) => {
        if (!opts.registry.get(deviceId)?.gateway) return;
        const site = opts.registry.behind(deviceId);
        this.sendSite(deviceId, site, true);
        // A site sync: the devices behind a gateway do not notice the center's outages, so what
        // they have not acknowledged goes again through the gateway (idempotent on the device).
        for (const d of site) await this.delivery.onSync(d.id);
      },
      onTelemetry: (deviceId, m) => {
        const memPct = m.memTotal ? ((m.memUsed ?? 0) * 100) / m.memTotal : 0;
        const sample = {
          at: Date.now(),
          values: {
            "cpu.load": m.cpuLoad ?? 0,
            "mem.used_pct": memPct,
            "disk.free": m.diskFree ?? 0,
            temperature: m.temperatureC ?? Number.NaN,
            uptime: m.uptimeS ?? 0,
          },
        };
        this.telemetry.set(deviceId, sample);
        const h = this.history.get(deviceId) ?? [];
        h.push(sample);
        if (h.length > TELEMETRY_HISTORY) h.shift();
        this.history.set(deviceId, h);
      },
      publish: (topic, payload, qos, retain) => this.publish(topic, payload, qos, retain),
      drop: (reason, detail) => this.drop(reason, detail),
      now: () => Date.now(),
    });
  }

  async start(): Promise<void> {
    const client = mqtt.connect(this.opts.brokerUrl, {
      clientId: this.opts.config.controller.clientId ?? this.opts.config.controller.username,
      username: this.opts.config.controller.username,
      password: this.opts.config.controller.password,
      clean: false,
      reconnectPeriod: 1000,
      protocolVersion: 4,
    });
    this.client = client;
    // Acknowledge to the broker at once and work asynchronously: end-to-end delivery is the
    // device outbox + StatusAck (sent only after persisting), not the broker's PUBACK.
    client.handleMessage = (packet: IPublishPacket, done) => {
      this.route(packet.topic, packet.payload as Buffer).catch((err) =>
        this.log.error({ err, topic: packet.topic }, "message handling failed"),
      );
      done();
    };
    client.on("error", (err) => this.log.warn({ err: err.message }, "controller connection error"));
    client.on("offline", () => this.log.warn("the controller lost its broker connection; reconnecting"));
    dropRefusedPublishes(client, { log: this.log, counters: this.counters });
    await new Promise<void>((resolve, reject) => {
      client.once("connect", () => resolve());
      client.once("error", (err) => {
        client.end(true);
        reject(new Error(`the controller cannot connect to ${this.opts.brokerUrl}: ${err.message}`));
      });
    });
    const p = this.prefix;
    await this.audit.open();
    await this.notifier.open();
    this.notifier.start();
    await this.rollouts.load();
    await this.workQueue.load();
    const link = this.opts.link;
    if (link) {
      await client.subscribeAsync(rpcRequestTopic(p), { qos: 1 });
      link.tap((topic, payload) =>
        this.route(topic, payload).catch((err) => this.log.error({ err, topic }, "message handling failed")),
      );
    } else {
      const topics = [`${p}/d/+/status`, `${p}/d/+/sync`, `${p}/d/+/state`, rpcRequestTopic(p)];
      await client.subscribeAsync(topics, { qos: 1 });
      await client.subscribeAsync(`${p}/d/+/telemetry`, { qos: 0 });
    }
    this.timers.push(setInterval(() => this.step(), 1000));
    this.timers.push(
      setInterval(
        () =>
          void this.opts.registry.flush().catch((err) => this.log.error({ err }, "registry flush failed")),
        5000,
      ),
    );
    this.timers.push(setInterval(() => void this.pruneNonces(), 60_000));
    this.timers.push(
      setInterval(() => {
        const before = Date.now() - this.opts.config.historyRetentionDays * 86_400_000;
        this.delivery.prune(before).catch((err) => this.log.error({ err }, "history pruning failed"));
      }, 3600_000),
    );
    this.log.info("controller started");
  }

  private step(rollouts = true): void {
    this.lastStep = Date.now();
    if (rollouts) void this.rollouts.tick();
    void this.workQueue.tick();
  }

  /**
   * Work queues (and, with `rollouts`, rollouts) also step shortly after devices finish, not
   * only on the 1 s tick: a failed device is re-dispatched, a rollout past its failure limit is
   * aborted, soon. One timer for all.
   */
  private stepSoon(rollouts: boolean): void {
    this.soonRollouts ||= rollouts;
    if (this.soon) return;
    // Soon, but not more than 20 times a second: a step goes over the rollout's assignments
    // (in memory: JobStore caches them).
    const wait = Math.max(20, this.lastStep + 50 - Date.now());
    this.soon = setTimeout(() => {
      this.soon = undefined;
      const withRollouts = this.soonRollouts;
      this.soonRollouts = false;
      this.step(withRollouts);
    }, wait);
  }

  /** Whether the controller holds its broker connection (for /healthz). */
  get connected(): boolean {
    return Boolean(this.client?.connected);
  }

  /**
   * Bounded: a graceful end waits for in-flight QoS 1 publishes, which never finish while the
   * broker is gone; after `graceMs` the connection is dropped (what matters is on disk already:
   * every acknowledgement was sent after its LevelDB write).
   */
  async stop(graceMs = 2000): Promise<void> {
    if (this.soon) clearTimeout(this.soon);
    for (const t of this.timers) clearInterval(t);
    this.notifier.stop();
    await this.opts.registry.flush().catch((err) => this.log.error({ err }, "registry flush failed"));
    const client = this.client;
    if (!client) return;
    if (!(await settlesWithin(client.endAsync(), graceMs))) client.end(true);
  }

  /**
   * One operator API call made in this process (the dashboard), with the same params schema
   * as over MQTT; `operator` is the logged-in operator.
   */
  async call(method: Method, params: unknown, operator: string): Promise<unknown> {
    const parsed = api[method].params.safeParse(params);
    if (!parsed.success) throw new ApiError(formatIssues(parsed.error));
    const handler = this.api[method] as (p: unknown, operator: string) => Promise<unknown>;
    const result = await handler(parsed.data, operator);
    if (!READ_ONLY.has(method))
      await this.audited(operator, method, JSON.stringify(params ?? {}), "ok (dashboard)");
    return result;
  }

  /** Each FleetEvent the controller publishes, as published; returns an unsubscribe. */
  onEvent(listener: (payload: Uint8Array) => void): () => void {
    this.eventListeners.add(listener);
    return () => this.eventListeners.delete(listener);
  }

  /** A device's recent telemetry (oldest first). */
  telemetryOf(deviceId: string): readonly TelemetrySample[] {
    return this.history.get(deviceId) ?? [];
  }

  /** Never publishes what the broker would refuse (it would close our connection instead). */
  private publish(topic: string, payload: Uint8Array, qos: 0 | 1, retain = false): boolean {
    if (this.eventListeners.size && topic === eventsTopic(this.prefix))
      for (const l of this.eventListeners) l(payload);
    const limit = this.opts.config.limits.maxPayloadBytes;
    if (payload.length > limit) {
      this.counters.inc("publish_too_large");
      this.log.error(
        { topic, bytes: payload.length, limit },
        "not publishing a message over the payload limit",
      );
      return false;
    }
    const buf = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
    if (this.opts.link) this.opts.link.publish(topic, buf, qos, retain);
    else
      this.client?.publish(topic, buf, { qos, retain }, (err) => {
        if (err) this.log.debug({ err: err.message, topic }, "publish not completed");
      });
    return true;
  }

  private drop(reason: string, detail: string): void {
    this.counters.inc(`dropped_${reason}`);
    this.log.warn({ reason, detail }, "dropped a payload");
  }

  private async route(topic: string, payload: Buffer): Promise<void> {
    if (topic === rpcRequestTopic(this.prefix)) return this.onRpc(payload);
    return this.inbox(topic, payload);
  }

  // ---- site gateways ----------------------------------------------------------------------------

  /**
   * Tells a gateway the credentials of devices behind it (DESIGN.md §11): the whole list after
   * its sync (`full`), else each change as it happens; a removed device is shut out at once.
   */
  private sendSite(
    gatewayId: string,
    devices: readonly DeviceRecord[],
    full: boolean,
    removed = false,
  ): void {
    const site = devices.map((d) => ({
      id: d.id,
      tokenHash: removed ? "" : (d.tokenHash ?? ""),
      certSerials: removed ? [] : (d.certSerials ?? []),
      removed,
      labels: d.labels,
    }));
    // LAN operators for local control: who may log in at the gateway (DESIGN.md §11).
    const operators = this.opts.config.operators.map((op) => ({
      username: op.username,
      passwordHash: op.passwordHash,
      keyId: op.keyId,
    }));
    // Pages that fit the payload limit (about 150 bytes a device).
    const per = Math.max(1, Math.floor(this.opts.config.limits.maxPayloadBytes / 400));
    for (let i = 0; i < Math.max(1, site.length); i += per)
      this.publish(
        deviceTopic(this.prefix, gatewayId, "ctl"),
        encodeEnvelope({
          siteCredentials: {
            full: full && i === 0,
            devices: site.slice(i, i + per),
            ...(full && i === 0 ? { operators } : {}),
          },
        }),
        1,
      );
  }

  /**
   * Jobs a LAN operator ran at a gateway while the center was unreachable (origin `site`):
   * checked here as if submitted here (operator signature, graph, lifetime — at the time the
   * gateway took them), for the devices behind that gateway only, recorded as delivered.
   */
  private async recordSiteJobs(gatewayId: string, siteJobs: SiteJob[]): Promise<void> {
    const { registry } = this.opts;
    if (!registry.get(gatewayId)?.gateway) return this.drop("site_jobs_not_gateway", gatewayId);
    for (const sj of siteJobs) {
      const keyId = sj.job?.keyId ?? "";
      const operator = this.operatorNames.get(keyId) ?? "?";
      let newJob: ReturnType<typeof checkSignedJob>;
      try {
        const signed = Buffer.from(pb.SignedJob.encode(sj.job ?? {}).finish()).toString("base64");
        newJob = checkSignedJob(
          signed,
          operator,
          this.operatorKeys,
          this.opts.config.limits.maxPayloadBytes,
          Number(sj.createdAtMs ?? 0) || Date.now(),
        );
      } catch (err) {
        this.drop("site_job_refused", `${gatewayId}: ${(err as Error).message}`);
        continue;
      }
      const { record } = newJob;
      if (await this.delivery.job(record.id)) continue; // recorded at an earlier sync
      const devices = (sj.deviceIds ?? []).filter((d) => registry.get(d)?.via === gatewayId);
      if (devices.length < (sj.deviceIds ?? []).length)
        this.drop("site_job_device_not_behind", `${gatewayId}: job ${record.id}`);
      record.devices = [...new Set(devices)];
      record.origin = "site";
      record.site = gatewayId;
      record.createdAt = Number(sj.createdAtMs ?? 0) || record.createdAt;
      if (sj.cancelled) record.cancelled = { reason: sj.cancelled, at: Date.now() };
      await this.delivery.submit(newJob, [], { delivered: true });
      await this.audited(
        operator,
        "job.submit",
        JSON.stringify({ jobId: record.id, site: gatewayId, devices: record.devices.length }),
        `ok (run at site ${gatewayId})`,
      );
      this.counters.inc("site_jobs_recorded");
      this.log.info({ jobId: record.id, gateway: gatewayId, operator }, "recorded a job run at a site");
    }
  }

  // ---- operator RPC ---------------------------------------------------------------------------

  /** Appends to the audit log; a request is answered only once it is there. */
  private async audited(operator: string, method: string, paramsJson: string, result: string): Promise<void> {
    await this.audit.append({ operator, method, paramsJson, result }).catch((err) => {
      this.counters.inc("audit_write_failed");
      this.log.error({ err, method }, "cannot append to the audit log");
    });
  }

  private onRpc(payload: Buffer): Promise<void> {
    const handlers = this.api as Record<string, (p: unknown, operator: string) => Promise<unknown>>;
    return answerRpc(
      {
        prefix: this.prefix,
        maxPayloadBytes: this.opts.config.limits.maxPayloadBytes,
        keys: this.operatorKeys,
        operatorOf: (keyId) => this.operatorNames.get(keyId) ?? "?",
        claimNonce: (nonce, expiresAt) => this.claimNonce(nonce, expiresAt),
        handler: (method) => handlers[method],
        publish: (topic, reply) => this.publish(topic, reply, 1),
        audited: (...entry) => this.audited(...entry),
        counters: this.counters,
        log: this.log,
        drop: (reason, detail) => this.drop(reason, detail),
      },
      payload,
    );
  }

  /**
   * Claimed in memory before the first await: two copies of one signed request arriving
   * together run once (the LevelDB check alone races with itself).
   */
  private async claimNonce(nonce: string, expiresAt: number): Promise<boolean> {
    if (this.nonces.has(nonce)) return false;
    this.nonces.add(nonce);
    try {
      if (await this.opts.store.nonces.get(nonce)) return false;
      await this.opts.store.nonces.put(nonce, expiresAt, { sync: true } as never);
      return true;
    } finally {
      this.nonces.delete(nonce);
    }
  }

  private async pruneNonces(): Promise<void> {
    const now = Date.now();
    const ops = [];
    for await (const [k, exp] of this.opts.store.nonces.iterator())
      if (exp < now) ops.push(this.opts.store.del(this.opts.store.nonces, k));
    if (ops.length) await this.opts.store.batch(ops, false);
  }
}
