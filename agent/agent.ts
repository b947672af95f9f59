// The device agent: wires the connection, the durable store, the scheduler and the outbox
// together and speaks the delivery protocol of DESIGN.md §4.
//
// About 500 lines: one handler per topic of the protocol (assignment, cancel, sync, ack,
// time) plus the device-state and telemetry publishing, all over the same connection, store
// and clock. The decisions live elsewhere (verify.ts, scheduler.ts, outbox.ts); what stays
// here is the wiring, read top to bottom as the protocol.
import { createHash, createPublicKey, type KeyObject, randomInt } from "node:crypto";
import { mkdirSync } from "node:fs";
import { readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { AbstractLevel } from "abstract-level";
import { ClassicLevel } from "classic-level";
import type { MqttClient } from "mqtt";
import type { Logger } from "pino";
import { Counters } from "../common/counters.js";
import type { GroupCommit } from "../common/group-commit.js";
import { settlesWithin } from "../common/timeout.js";
import { AGENT_VERSION, BUILD_TIME_FLOOR } from "../common/version.js";
import { builtinHandlers } from "../firmware-tasks/index.js";
import type { ArtifactSource, SystemPort, TaskHandler, TaskPolicy } from "../firmware-tasks/types.js";
import { decodeEnvelope, encodeEnvelope, PayloadError } from "../proto/envelope.js";
import { decodeJobSpec, type JobAssignment, pb, TaskState, type Telemetry } from "../proto/index.js";
import { specDigest, type VerifiedSignatures } from "../proto/signing.js";
import { deviceTopic, parseDeviceTopic } from "../proto/topics.js";
import { httpArtifactSource } from "./artifacts.js";
import { ChunkStore } from "./chunks.js";
import { systemTime, type TimeSource, TrustedClock } from "./clock.js";
import { type AgentConfig, rootPath } from "./config.js";
import { Connection } from "./connection.js";
import type { Facts } from "./facts.js";
import { SiteGateway } from "./gateway.js";
import { createLogger } from "./log.js";
import type { Outbox } from "./outbox.js";
import { loadPeerTls, PeerFetcher, PeerServer } from "./peers.js";
import { Scheduler } from "./scheduler.js";
import { jobStatus } from "./status.js";
import { AgentStore, type Db, type StoredJob } from "./store.js";
import { dryRunSystem, realSystem } from "./system.js";
import { collectFacts, collectTelemetry } from "./telemetry.js";
import { checkSignature, checkSpec, type Spec, type VerifyContext } from "./verify.js";

const STATE_MIN_INTERVAL_MS = 2000;
/** A change is reported this long after it, so that a burst of changes is one DeviceState. */
const STATE_SETTLE_MS = 1000;
/**
 * A report of nothing but the queue gauges (queue depth, tasks running) waits while the agent is
 * busy, up to this many settle intervals: a job that comes and goes while others still run is no
 * report. On a loaded device a `noop` job lasts longer than the settle interval, and 10,000
 * simulated devices sent one to two retained DeviceStates per job (issue 17).
 */
const STATE_BUSY_WAITS = 10;
const FACTS_REFRESH_MS = 60_000;
/**
 * Counters of ordinary work: they ride along with the next DeviceState and never call for one.
 * The controller knows the jobs a device took; a rollout to 10,000 devices was followed, within
 * the minute, by 10,000 retained reports that said only that (issue 17).
 */
const ACTIVITY_COUNTERS = new Set([
  "jobs_accepted",
  "jobs_compacted",
  "duplicate_deliveries",
  "connect_attempts",
  "sync_retries",
  "sync_responses_unasked",
  "chunk_cache_bytes",
  "peer_bytes_served",
]);
/** Facts that differ between any two readings: they ride along with the next report too. */
const VOLATILE_FACTS = ["mem.available", "disk.free", "battery.percent"];
const SYNC_RETRY_MIN_MS = 3000;
const SUBACK_TIMEOUT_MS = 10_000;
const SYNC_RETRY_MAX_MS = 60_000;

export interface AgentOptions {
  config: AgentConfig;
  log?: Logger;
  time?: TimeSource;
  /** A database to use instead of LevelDB in `dataDir` (e.g. a sublevel per simulated device). */
  db?: AbstractLevel<string | Buffer | Uint8Array, string, unknown>;
  /**
   * Writes through this group commit instead of the store's own: simulated devices sharing one
   * LevelDB share one, as N real devices write to N disks at once rather than one after another.
   */
  writer?: GroupCommit<unknown>;
  handlers?: readonly TaskHandler[];
  /** Facts merged over the measured ones (tests, simulation). */
  extraFacts?: Facts;
  /** Skip systeminformation (simulated devices share the host's facts). */
  measureFacts?: boolean;
  /** The machine (reboot, boot id); default from the config (real, or dry-run). */
  system?: SystemPort;
  /** Where software updates come from; default: the server in `artifactsUrl`. */
  artifacts?: ArtifactSource;
  /** Telemetry source instead of systeminformation (simulated devices). */
  telemetry?: () => Promise<Telemetry>;
  /** Count MQTT packets by kind (`wireStats`; the simulator's `--packet-kinds`). */
  countPacketKinds?: boolean;
  /** A session whose SUBSCRIBE is not answered within this time is dropped and made anew. */
  subackTimeoutMs?: number;
  /** How often facts are measured again and changed counters reported (default 60 s; tests). */
  refreshMs?: number;
  /**
   * Good signatures shared by the simulator's devices (one process, the same trusted keys): a
   * job is verified once, not once per simulated device. A real agent verifies its own copy.
   */
  verifiedSignatures?: VerifiedSignatures;
}

export class Agent {
  readonly counters = new Counters();
  readonly store: AgentStore;
  readonly clock: TrustedClock;
  readonly log: Logger;
  readonly scheduler: Scheduler;
  private readonly cfg: AgentConfig;
  private readonly handlers: Map<string, TaskHandler>;
  private readonly trustedKeys: Map<string, KeyObject>;
  /** The chunk cache (chunked artifacts), unless the artifact source was given. */
  private chunks: ChunkStore | undefined;
  private peerServer: PeerServer | undefined;
  /** The site jobs the last SyncRequest carried (a gateway's). */
  private syncedSiteJobs: string[] = [];
  private readonly policy: TaskPolicy;
  private readonly connection: Connection;
  private readonly outbox: Outbox;
  /** The site gateway this agent also runs, if flashed with --gateway. */
  readonly gateway: SiteGateway | undefined;
  private facts: Facts;
  private timers: NodeJS.Timeout[] = [];
  private stateTimer: NodeJS.Timeout | undefined;
  private syncTimer: NodeJS.Timeout | undefined;
  private syncRetryMs = SYNC_RETRY_MIN_MS;
  /**
   * The last SyncRequest's id, and the first of this session's: a SyncResponse answers only
   * if it echoes one of this session's. The broker can hand over late an answer to a request
   * of the last session (the controller's publish held over a broker restart); taken as the
   * answer, it would stop the re-sends of a request the controller never saw. A random start:
   * nor can an answer to the last process's requests pass for one.
   */
  private syncRequestId = randomInt(1, 2 ** 47);
  private sessionSyncFrom = Number.POSITIVE_INFINITY;
  /**
   * The QoS of the status topic: the one the controller acknowledges statuses with. It sends
   * StatusAck at QoS 0 only through the embedded broker, which hands what a device publishes to
   * the controller in-process — there the outbox's own seq and StatusAck protocol (DESIGN.md
   * §4.3) is all the delivery guarantee, and MQTT's PUBACK only a packet more each way. QoS 1
   * again with every new connection, until the first ack says otherwise.
   */
  private statusQos: 0 | 1 = 1;
  private lastStateAt = 0;
  /** The last report's `stateShown()`. */
  private lastStateShown = "";
  /** The last report's `stateCore()`. */
  private lastStateCore = "";
  /** The counters that call for a report, as last reported. */
  private lastCountersShown = "";
  private readonly startedAt = Date.now();
  /** Where tasks get their scratch directories. */
  private readonly scratchRoot: string;

  constructor(private readonly opts: AgentOptions) {
    this.cfg = opts.config;
    this.log = (opts.log ?? createLogger()).child({ component: "agent", deviceId: opts.config.deviceId });
    const dataDir = rootPath(this.cfg, this.cfg.dataDir);
    if (!opts.db) mkdirSync(dataDir, { recursive: true, mode: 0o700 });
    // The agent's own (emptied at start); simulated devices, without a data directory, share one.
    this.scratchRoot = opts.db ? join(tmpdir(), "fleet-simulated-scratch") : join(dataDir, "scratch");
    this.store = new AgentStore(
      opts.db ?? (new ClassicLevel(join(dataDir, "db")) as unknown as Db),
      opts.writer,
      // A batch of one status must fit the payload limit, with room for the envelope.
      Math.floor(this.cfg.maxPayloadBytes / 2),
      this.cfg.statusFlushMs,
    );
    this.clock = new TrustedClock(opts.time ?? systemTime, BUILD_TIME_FLOOR);
    this.handlers = new Map((opts.handlers ?? builtinHandlers).map((h) => [h.type, h]));
    this.trustedKeys = new Map(this.cfg.trustedKeys.map((k) => [k.keyId, createPublicKey(k.publicKey)]));
    this.policy = {
      allowShell: this.cfg.allowShell,
      outputLimitBytes: this.cfg.outputLimitBytes,
      allowPaths: this.cfg.allowPaths,
    };
    this.facts = this.baseFacts();
    this.scheduler = new Scheduler({
      store: this.store,
      clock: this.clock,
      handlers: this.handlers,
      policy: this.policy,
      root: this.cfg.root,
      dataDir: rootPath(this.cfg, this.cfg.dataDir),
      scratchRoot: this.scratchRoot,
      log: this.log.child({ component: "scheduler" }),
      counters: this.counters,
      facts: () => this.facts,
      system:
        opts.system ??
        (this.cfg.systemDryRun ? dryRunSystem(this.log) : realSystem(this.cfg.rebootCommand, this.log)),
      artifacts: opts.artifacts ?? this.artifactSource(dataDir),
      trustedKeys: this.trustedKeys,
      maxConcurrency: this.cfg.maxConcurrency,
      typeConcurrency: this.cfg.typeConcurrency,
      onChange: () => this.publishStateSoon(),
      onIdle: () => this.outbox.onIdle(),
    });
    this.outbox = this.store.outbox;
    const gw = this.cfg.gateway;
    this.gateway = gw
      ? new SiteGateway({
          deviceId: this.cfg.deviceId,
          prefix: this.cfg.topicPrefix,
          port: gw.port,
          bind: gw.bind,
          certFile: rootPath(this.cfg, gw.cert),
          keyFile: rootPath(this.cfg, gw.key),
          caFile: rootPath(this.cfg, this.cfg.caCert ?? "etc/fleet-agent/ca.pem"),
          maxPayloadBytes: this.cfg.maxPayloadBytes,
          db: this.store.db,
          log: this.log.child({ component: "gateway" }),
          counters: this.counters,
          trustedKeys: this.trustedKeys,
          queueBytes: gw.queueBytes,
          dashboardPort: gw.dashboardPort,
          onChange: () => this.publishStateSoon(),
          upstream: {
            publish: (topic, payload, qos, retain, done) =>
              this.publishTopic(topic, payload, qos, retain, done),
            subscribe: (topics) => {
              if (topics.length)
                void this.connection.current?.subscribeAsync(topics, { qos: 1 }).catch(() => {});
            },
            resync: () => this.sendSync(),
          },
        })
      : undefined;
    this.connection = new Connection({
      brokers: this.cfg.brokers,
      clientId: this.cfg.deviceId,
      username: this.cfg.username ?? this.cfg.deviceId,
      password: this.cfg.password,
      caCertFile: this.cfg.caCert && rootPath(this.cfg, this.cfg.caCert),
      certFile: this.cfg.cert && rootPath(this.cfg, this.cfg.cert),
      keyFile: this.cfg.key && rootPath(this.cfg, this.cfg.key),
      will: { topic: this.topic("state"), payload: Buffer.from(this.stateEnvelope(false)) },
      backoff: this.cfg.reconnect,
      preferFirstAfterMs: this.cfg.reconnect.preferFirstAfterS * 1000,
      log: this.log.child({ component: "connection" }),
      counters: this.counters,
      countPacketKinds: opts.countPacketKinds,
      onMessage: (topic, payload, qos) => this.onMessage(topic, payload, qos),
    });
    this.connection.on("up", (client) => {
      this.onUp(client).catch((err) => this.log.error({ err }, "session setup failed"));
    });
    this.connection.on("down", () => {
      this.outbox.onDisconnected();
      this.gateway?.onUpstreamDown();
    });
  }

  get deviceId(): string {
    return this.cfg.deviceId;
  }

  get connected(): boolean {
    return this.connection.connected;
  }

  get config(): AgentConfig {
    return this.cfg;
  }

  /** MQTT packets and bytes each way so far (the cost benchmark, `fleet simulate --stats`). */
  wireStats() {
    return this.connection.wireStats();
  }

  /** When the last connection attempts started (for observing backoff). */
  get connectAttemptTimes(): readonly number[] {
    return this.connection.attemptTimes;
  }

  async start(): Promise<void> {
    await this.store.open();
    const floor = (await this.store.getMeta<number>("timeFloor")) ?? 0;
    if (floor) this.clock.observe(floor);
    await this.chunks?.open();
    await this.peerServer
      ?.start()
      .catch((err) =>
        this.log.error({ err: (err as Error).message }, "cannot serve chunks to peers; downloading only"),
      );
    await this.scheduler.load((r) => this.decodeRecord(r));
    if (!this.opts.db) await this.clearScratch();
    await this.refreshFacts();
    this.scheduler.start();
    await this.gateway?.start();
    this.outbox.start({
      log: this.log.child({ component: "outbox" }),
      publish: (payload) => this.publish("status", payload, this.statusQos),
      maxBatchBytes: Math.floor(this.cfg.maxPayloadBytes * 0.75),
      busy: () => this.scheduler.busy,
    });
    this.connection.start();
    this.timers.push(
      setInterval(() => {
        void this.refreshFacts();
        // Counters that tell of trouble (drops, rejections, failed writes) and changed since the
        // last report go out now, whatever changed them; ordinary work rides along (see above).
        if (this.connection.connected && this.countersShown() !== this.lastCountersShown) this.publishState();
      }, this.opts.refreshMs ?? FACTS_REFRESH_MS),
    );
    if (this.cfg.telemetryIntervalS > 0) {
      this.timers.push(setInterval(() => void this.sendTelemetry(), this.cfg.telemetryIntervalS * 1000));
    }
    this.log.info({ version: AGENT_VERSION, jobs: this.scheduler.jobIds().length }, "agent started");
  }

  /**
   * Scratch directories that an earlier process left (killed mid-task, power lost) are removed
   * before any task runs: a crash loop must not fill the disk. No run outlives its process (a
   * resumed task gets a new one), so all of them are stale.
   */
  private async clearScratch(): Promise<void> {
    const left = await readdir(this.scratchRoot).catch(() => [] as string[]);
    if (!left.length) return;
    try {
      await rm(this.scratchRoot, { recursive: true, force: true });
      this.log.info(
        { count: left.length, dir: this.scratchRoot },
        "removed scratch directories an earlier run left",
      );
    } catch (err) {
      this.log.warn(
        { err: (err as Error).message, dir: this.scratchRoot },
        "cannot remove old scratch directories",
      );
    }
  }

  async stop(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    if (this.stateTimer) clearTimeout(this.stateTimer);
    if (this.syncTimer) clearTimeout(this.syncTimer);
    this.outbox.stop();
    await this.scheduler.stop();
    await this.gateway?.stop();
    this.peerServer?.stop();
    await this.connection.stop(async (client) => {
      await client.publishAsync(this.topic("state"), Buffer.from(this.stateEnvelope(false)), {
        qos: 1,
        retain: true,
      });
    });
    await this.store.close();
    this.log.info("agent stopped");
  }

  // ---- MQTT session -------------------------------------------------------------------------

  private topic(channel: Parameters<typeof deviceTopic>[2]): string {
    return deviceTopic(this.cfg.topicPrefix, this.cfg.deviceId, channel);
  }

  private publish(
    channel: Parameters<typeof deviceTopic>[2],
    payload: Uint8Array,
    qos: 0 | 1,
    retain = false,
  ) {
    return this.publishTopic(this.topic(channel), payload, qos, retain);
  }

  /** Publishes upstream (on this device's topics, or for a gateway its site's); false if down. */
  private publishTopic(
    topic: string,
    payload: Uint8Array,
    qos: 0 | 1,
    retain: boolean,
    done?: (err?: Error) => void,
  ): boolean {
    const client = this.connection.current;
    if (!client) return false;
    client.publish(topic, Buffer.from(payload), { qos, retain }, (err) => {
      if (err) this.log.debug({ err: err.message, topic }, "publish not completed");
      done?.(err);
    });
    return true;
  }

  /**
   * A new session: SUBSCRIBE, then at once (not after the SUBACK) the SyncRequest and the
   * outbox — the broker handles a client's packets in order, and the sync is re-sent until
   * answered. A SUBACK that never comes would leave the device deaf: that session is dropped
   * and the connection made anew.
   */
  private async onUp(client: MqttClient): Promise<void> {
    const subscribed = client.subscribeAsync([this.topic("job"), this.topic("ctl")], { qos: 1 });
    this.gateway?.onUpstream();
    this.publishState();
    this.syncRetryMs = SYNC_RETRY_MIN_MS;
    this.statusQos = 1;
    this.sessionSyncFrom = this.syncRequestId + 1;
    this.sendSync();
    this.outbox.onConnected();
    void this.sendTelemetry();
    if (await settlesWithin(subscribed, this.opts.subackTimeoutMs ?? SUBACK_TIMEOUT_MS)) {
      await subscribed; // a failed SUBSCRIBE (connection lost) is logged by the caller
      return;
    }
    if (this.connection.current !== client) return; // that session is over anyway
    this.counters.inc("suback_timeouts");
    this.log.warn("no SUBACK from the broker; reconnecting");
    client.stream.destroy();
  }

  /**
   * Sends a SyncRequest and, until a SyncResponse arrives, again with a growing delay: a
   * request published while the controller was not (yet) subscribed, e.g. right after a
   * broker restart, is otherwise lost until the next reconnect.
   */
  private sendSync(): void {
    if (this.syncTimer) clearTimeout(this.syncTimer);
    if (!this.connection.connected) return;
    const ids = this.scheduler.jobIds().sort();
    const digest = createHash("sha256").update(ids.join("\n")).digest();
    // A gateway's sync carries the jobs run at its site that the center has not recorded.
    const siteJobs = this.gateway?.siteJobs() ?? [];
    this.syncedSiteJobs = siteJobs.map((j) => unverifiedJobId({ job: j.job }));
    const body = {
      lastAckedSeq: this.outbox.lastAckedSeq,
      knownJobsDigest: digest,
      knownJobCount: ids.length,
      agentVersion: AGENT_VERSION,
      ...(siteJobs.length ? { siteJobs } : {}),
      requestId: ++this.syncRequestId,
    };
    this.publish("sync", encodeEnvelope({ syncRequest: body }), 1);
    this.syncTimer = setTimeout(() => {
      this.counters.inc("sync_retries");
      this.sendSync();
    }, this.syncRetryMs);
    this.syncRetryMs = Math.min(this.syncRetryMs * 2, SYNC_RETRY_MAX_MS);
  }

  private async onMessage(topic: string, payload: Buffer, qos = 1): Promise<void> {
    const t = parseDeviceTopic(this.cfg.topicPrefix, topic);
    if (t && t.deviceId !== this.cfg.deviceId && this.gateway?.fromUpstream(topic, payload)) return;
    if (!t || t.deviceId !== this.cfg.deviceId || (t.channel !== "job" && t.channel !== "ctl")) {
      this.drop("unexpected_topic", `message on ${topic}`);
      return;
    }
    let env: ReturnType<typeof decodeEnvelope>;
    try {
      env = decodeEnvelope(payload, this.cfg.maxPayloadBytes);
    } catch (err) {
      if (err instanceof PayloadError) return this.drop(err.reason, `${topic}: ${err.message}`);
      throw err;
    }
    if (t.channel === "job") {
      if (env.body !== "jobAssignment" || !env.jobAssignment)
        return this.drop("unexpected_body", `${env.body} on job topic`);
      if (env.jobAssignment.siteDevices?.length) {
        if (!this.gateway) return this.drop("unexpected_body", "a site's job, but this agent is no gateway");
        return this.gateway.fanOut(env.jobAssignment, payload.length);
      }
      return this.accept(env.jobAssignment);
    }
    switch (env.body) {
      case "cancel":
        await this.scheduler.cancel(env.cancel!.jobId ?? "", env.cancel!.reason || "canceled by operator");
        return;
      case "statusAck": {
        // An ack for another epoch (of this device's previous database) is not ours.
        const epoch = env.statusAck!.epoch ?? "";
        if (epoch && epoch !== this.outbox.epoch) return this.drop("other_epoch", `ack for epoch ${epoch}`);
        this.statusQos = qos === 0 ? 0 : 1;
        await this.outbox.onAck(env.statusAck!.upToSeq ?? 0);
        return;
      }
      case "timeHint":
        if (env.timeHint!.nowMs) this.clock.hint(env.timeHint!.nowMs);
        return;
      case "syncResponse": {
        const r = env.syncResponse!;
        const id = Number(r.requestId ?? 0);
        const answer = id >= this.sessionSyncFrom && id <= this.syncRequestId;
        if (answer) {
          if (this.syncTimer) clearTimeout(this.syncTimer);
          this.syncTimer = undefined;
          // The controller is listening now: anything not yet acknowledged goes out again.
          this.outbox.onConnected();
          if (r.nowMs) this.clock.hint(r.nowMs);
        } else this.counters.inc(id ? "sync_responses_stale" : "sync_responses_unasked");
        // Assignments and cancels are signed and idempotent: whatever carries them, they apply.
        for (const a of r.assignments ?? []) await this.accept(a);
        for (const c of r.cancels ?? [])
          await this.scheduler.cancel(c.jobId ?? "", c.reason || "canceled by operator");
        if (answer) await this.gateway?.onSynced(this.syncedSiteJobs);
        return;
      }
      case "siteAck":
        if (!this.gateway) return this.drop("unexpected_body", "site acks, but this agent is no gateway");
        this.gateway.onSiteAck(env.siteAck!, payload.length);
        return;
      case "siteCredentials":
        if (!this.gateway)
          return this.drop("unexpected_body", "site credentials, but this agent is no gateway");
        await this.gateway.apply(env.siteCredentials!);
        return;
      default:
        return this.drop("unexpected_body", `${env.body} on ctl topic`);
    }
  }

  private drop(reason: string, detail: string): void {
    this.counters.inc(`dropped_${reason}`);
    this.log.warn({ reason, detail }, "dropped a payload");
  }

  /**
   * A verified, signed timestamp: the floor it raises is kept across restarts — written with
   * the job that carried it (one durable write per accepted job).
   */
  private observeTime(ts: number): Record<string, unknown> | undefined {
    return this.clock.observe(ts) ? { timeFloor: this.clock.floor } : undefined;
  }

  // ---- accepting jobs ----------------------------------------------------------------------

  private verifyContext(): VerifyContext {
    return {
      deviceId: this.cfg.deviceId,
      labels: this.cfg.labels,
      trustedKeys: this.trustedKeys,
      clock: this.clock,
      maxSkewMs: this.cfg.maxClockSkewS * 1000,
      maxLifetimeMs: this.cfg.maxJobLifetimeDays * 86_400_000,
      forgottenUpTo: this.store.forgottenUpTo,
      handlers: this.handlers,
      allowTaskTypes: this.cfg.allowTaskTypes,
      policy: this.policy,
    };
  }

  /**
   * Deliveries are handled concurrently (their PUBACKs wait for the disk, see pipelineAcks), yet
   * two deliveries of one job cannot both pass the duplicate check: this runs synchronously up
   * to its store commit — the check and the in-memory plan happen before its first await.
   */
  private async accept(a: JobAssignment): Promise<void> {
    const sig = checkSignature(a, { trustedKeys: this.trustedKeys }, this.opts.verifiedSignatures);
    if (!sig.ok)
      return this.reject(unverifiedJobId(a), sig.reason, sig.message, a.job ? specDigest(a.job) : "");
    const { spec, digest } = sig;
    const existing = this.scheduler.job(spec.jobId);
    if (existing) {
      if (existing.digest !== digest) {
        return this.reject(
          spec.jobId,
          "id_reused",
          "job id already used by a job with different content",
          digest,
        );
      }
      this.counters.inc("duplicate_deliveries");
      await this.store.commit({ statuses: [this.scheduler.currentJobStatus(spec.jobId)] }, false);
      return;
    }
    const v = checkSpec(a, spec, this.verifyContext());
    if (!v.ok) return this.reject(spec.jobId, v.reason, v.message, digest);
    const meta = this.observeTime(spec.issuedAtMs);
    const record: StoredJob = {
      jobId: spec.jobId,
      digest,
      signed: pb.SignedJob.encode(a.job!).finish(),
      receivedAt: this.clock.now(),
      expiresAt: spec.expiresAtMs,
      ...(a.rolloutId ? { rolloutId: a.rolloutId } : {}),
    };
    await this.scheduler.accept(record, spec, v.params, meta);
    this.counters.inc("jobs_accepted");
  }

  private async reject(jobId: string, reason: string, message: string, specDigest: string): Promise<void> {
    this.counters.inc(`rejected_${reason}`);
    this.log.warn({ jobId, reason, message }, "job rejected");
    const status = jobStatus(jobId, TaskState.REJECTED, message, this.clock.now(), { reason, specDigest });
    await this.store.commit({ statuses: [status] }, true);
  }

  /** Re-reads a stored job (its signature was checked when it was accepted). */
  private decodeRecord(r: StoredJob): { spec: Spec; params: Map<string, unknown> } | undefined {
    try {
      const signed = pb.SignedJob.decode(r.signed);
      const spec = decodeJobSpec(signed.spec);
      const params = new Map<string, unknown>();
      for (const t of spec.tasks) {
        const h = this.handlers.get(t.type);
        if (!h) return undefined;
        params.set(t.id, h.paramsSchema.parse(t.paramsJson ? JSON.parse(t.paramsJson) : {}));
      }
      return { spec, params };
    } catch {
      return undefined;
    }
  }

  // ---- state, facts, telemetry ---------------------------------------------------------------

  private baseFacts(): Facts {
    const f: Facts = {
      "agent.version": AGENT_VERSION,
      "os.arch": process.arch,
      "os.platform": process.platform,
    };
    for (const [k, v] of Object.entries(this.cfg.labels)) f[`labels.${k}`] = v;
    return { ...f, ...this.opts.extraFacts };
  }

  private async refreshFacts(): Promise<void> {
    if (this.opts.measureFacts === false) return;
    try {
      this.facts = await collectFacts({
        dataDir: rootPath(this.cfg, this.cfg.dataDir),
        agentVersion: AGENT_VERSION,
        labels: this.cfg.labels,
        extra: this.opts.extraFacts,
      });
      this.scheduler.kick();
    } catch (err) {
      this.log.warn({ err }, "cannot collect facts");
    }
  }

  /**
   * The server's artifact store, with chunked artifacts taken from the local chunk cache first
   * (then the center) and each installed release's chunks kept (DESIGN.md §11).
   */
  private artifactSource(dataDir: string): ArtifactSource {
    const http = httpArtifactSource(this.cfg.artifactsUrl, {
      deviceId: this.cfg.deviceId,
      password: this.cfg.password,
      caFile: this.cfg.caCert && rootPath(this.cfg, this.cfg.caCert),
      certFile: this.cfg.cert && rootPath(this.cfg, this.cfg.cert),
      keyFile: this.cfg.key && rootPath(this.cfg, this.cfg.key),
    });
    const peer = this.cfg.peer;
    const tls =
      peer &&
      loadPeerTls(
        rootPath(this.cfg, this.cfg.caCert ?? "etc/fleet-agent/ca.pem"),
        rootPath(this.cfg, peer.cert),
        rootPath(this.cfg, peer.key),
      );
    const fetcher =
      tls &&
      new PeerFetcher({
        tls,
        tracker: (artifact, signal) => http.peers(artifact, signal),
        log: this.log.child({ component: "peers" }),
        counters: this.counters,
      });
    const chunks = new ChunkStore({
      dir: join(dataDir, "chunks"),
      maxBytes: this.cfg.chunkCacheBytes,
      log: this.log.child({ component: "chunks" }),
      counters: this.counters,
      center: (sha, signal) => http.centerChunk(sha, signal),
      ...(fetcher ? { peers: fetcher } : {}),
    });
    this.chunks = chunks;
    if (peer && tls)
      this.peerServer = new PeerServer({
        deviceId: this.cfg.deviceId,
        site: this.cfg.labels.site,
        port: peer.port,
        bind: peer.bind,
        ...(peer.host ? { host: peer.host } : {}),
        tls,
        chunks,
        maxUploads: peer.maxUploads,
        bytesPerSecond: peer.uploadBytesPerSecond,
        log: this.log.child({ component: "peer-server" }),
        counters: this.counters,
      });
    return {
      ...http,
      chunk: (c, signal, artifact) => chunks.get(c, signal, artifact),
      droppedPeers: (artifact) => fetcher?.dropped(artifact) ?? [],
      installed: async (artifact, version, list) => {
        await chunks.installed(artifact, version, list);
        this.publishStateSoon();
      },
    };
  }

  private stateEnvelope(online: boolean): Uint8Array {
    return encodeEnvelope({
      deviceState: {
        online,
        agentVersion: AGENT_VERSION,
        labels: this.cfg.labels,
        queueDepth: online ? this.scheduler.queueDepth : 0,
        running: online ? this.scheduler.runningCount : 0,
        startedAtMs: this.startedAt,
        factsJson: online ? JSON.stringify(this.facts) : "",
        counters: online ? this.counters.toObject() : {},
        ...(online && this.chunks ? { artifactsHeld: this.chunks.held() } : {}),
        ...(online && this.peerServer?.url ? { peerUrl: this.peerServer.url } : {}),
      },
    });
  }

  private publishState(): void {
    this.lastStateAt = Date.now();
    this.lastStateShown = this.stateShown();
    this.lastStateCore = this.stateCore();
    this.lastCountersShown = this.countersShown();
    this.publish("state", this.stateEnvelope(true), 1, true);
  }

  /**
   * What calls for a DeviceState besides the counters: the queue, the chunks held, the facts
   * but those that differ at every reading (on a real device `mem.available` alone made every
   * job that came and went a report).
   */
  private stateShown(): string {
    return JSON.stringify([this.scheduler.queueDepth, this.scheduler.runningCount, this.stateCore()]);
  }

  /** `stateShown()` without the queue gauges. */
  private stateCore(): string {
    const held = this.chunks?.held() ?? [];
    const facts = { ...this.facts };
    for (const k of VOLATILE_FACTS) delete facts[k];
    return JSON.stringify([held, facts]);
  }

  /** The counters that call for a report (reported within the refresh interval). */
  private countersShown(): string {
    return JSON.stringify(
      Object.entries(this.counters.toObject()).filter(([k]) => !ACTIVITY_COUNTERS.has(k)),
    );
  }

  /**
   * Queue depth changes are reported 1 s after they happen, at most every 2 s — unless the
   * device looks as it did in its last report (a job that came and went meanwhile): then only
   * counters changed, which the minute's refresh reports if they call for it. While only the
   * queue gauges moved and the agent is busy, the report waits (STATE_BUSY_WAITS). A gateway's
   * counters are its site's gauges: it always reports.
   */
  private publishStateSoon(): void {
    if (this.stateTimer) return;
    const wait = Math.max(STATE_SETTLE_MS, this.lastStateAt + STATE_MIN_INTERVAL_MS - Date.now());
    let waits = 0;
    const check = () => {
      this.stateTimer = undefined;
      if (!this.gateway) {
        if (this.stateShown() === this.lastStateShown) return;
        // Only the gauges moved and more is under way: they may be back where they were soon.
        const gaugesOnly = this.stateCore() === this.lastStateCore;
        if (gaugesOnly && this.scheduler.busy && ++waits < STATE_BUSY_WAITS) {
          this.stateTimer = setTimeout(check, STATE_SETTLE_MS);
          return;
        }
      }
      this.publishState();
    };
    this.stateTimer = setTimeout(check, wait);
  }

  private async sendTelemetry(): Promise<void> {
    if (!this.connection.connected || this.cfg.telemetryIntervalS <= 0) return;
    try {
      const t = this.opts.telemetry
        ? await this.opts.telemetry()
        : await collectTelemetry(rootPath(this.cfg, this.cfg.dataDir), this.clock.now());
      this.publish("telemetry", encodeEnvelope({ telemetry: t }), 0);
    } catch (err) {
      this.log.warn({ err }, "cannot collect telemetry");
    }
  }
}

/** The job id of a job whose signature did not verify, for the REJECTED status only. */
function unverifiedJobId(a: JobAssignment): string {
  try {
    return a.job?.spec ? decodeJobSpec(a.job.spec).jobId : "";
  } catch {
    return "";
  }
}
