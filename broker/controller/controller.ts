// The controller: an ordinary MQTT client of the broker (so the broker stays replaceable),
// with the registry, job store, delivery and operator RPC. State lives in LevelDB; the only
// timers are global (registry flush, nonce and history pruning), none per device.
import { createPublicKey, type KeyObject } from "node:crypto";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import type { Logger } from "pino";
import { ulid } from "ulid";
import { z } from "zod";
import { Counters } from "../../agent/counters.js";
import { checkGraph } from "../../agent/dag.js";
import type { Spec } from "../../agent/verify.js";
import { AGENT_VERSION } from "../../agent/version.js";
import { decodeEnvelope, encodeEnvelope, PayloadError } from "../../proto/envelope.js";
import { pb, stateName } from "../../proto/index.js";
import { verifyRpcRequest } from "../../proto/rpc.js";
import { parseSelector, SelectorError } from "../../proto/selector.js";
import { verifySignedJob } from "../../proto/signing.js";
import { parseDeviceTopic, rpcRequestTopic, rpcResponseTopic } from "../../proto/topics.js";
import type { ServerConfig } from "../config.js";
import { type CertPair, issueDeviceCert } from "../pki.js";
import { Delivery, jobJson, jobState } from "./delivery.js";
import { WorkQueue } from "./dispatch.js";
import { deviceJson, type Registry, RpcError } from "./registry.js";
import { Rollouts, type TelemetrySample } from "./rollouts.js";
import type { ControllerStore, JobRecord } from "./store.js";

const RPC_WINDOW_MS = 5 * 60_000;

export interface ControllerOptions {
  config: ServerConfig;
  store: ControllerStore;
  registry: Registry;
  brokerUrl: string;
  ca: CertPair;
  log: Logger;
  counters?: Counters;
  /** The server's HTTP URL (artifacts), told to operators and flashed devices. */
  httpUrl?: string;
  httpsUrl?: string;
  /**
   * The embedded broker hands device telemetry (QoS 0, the bulk of the traffic) to the
   * controller in-process instead of forwarding every message over its MQTT connection.
   * Everything else, and all of it with an external or clustered broker, goes through MQTT.
   */
  telemetryTap?: (deliver: (topic: string, payload: Buffer) => void) => void;
}

type Handler = (params: unknown, operator: string) => Promise<unknown>;

export class Controller {
  readonly counters: Counters;
  readonly delivery: Delivery;
  readonly rollouts: Rollouts;
  readonly workQueue: WorkQueue;
  /** Latest telemetry per device, for health-gated rollout waves. */
  private readonly telemetry = new Map<string, TelemetrySample>();
  private client: MqttClient | undefined;
  private readonly log: Logger;
  private readonly prefix: string;
  private readonly operatorKeys: Map<string, KeyObject>;
  private readonly operatorNames: Map<string, string>;
  private readonly handlers: Record<string, Handler>;
  private timers: NodeJS.Timeout[] = [];
  private soon: NodeJS.Timeout | undefined;
  private lastStep = 0;

  constructor(private readonly o: ControllerOptions) {
    this.log = o.log.child({ component: "controller" });
    this.counters = o.counters ?? new Counters();
    this.prefix = o.config.prefix;
    this.operatorKeys = new Map(o.config.operators.map((op) => [op.keyId, createPublicKey(op.publicKey)]));
    this.operatorNames = new Map(o.config.operators.map((op) => [op.keyId, op.username]));
    this.delivery = new Delivery({
      store: o.store,
      registry: o.registry,
      prefix: this.prefix,
      log: this.log.child({ component: "delivery" }),
      counters: this.counters,
      publish: (topic, payload, qos) => this.publish(topic, payload, qos),
      now: () => Date.now(),
      onFinished: () => this.stepSoon(),
    });
    const parts = { store: o.store, registry: o.registry, delivery: this.delivery, now: () => Date.now() };
    this.rollouts = new Rollouts({
      ...parts,
      log: this.log.child({ component: "rollouts" }),
      telemetry: (d) => this.telemetry.get(d),
    });
    this.workQueue = new WorkQueue({ ...parts, log: this.log.child({ component: "work-queue" }) });
    this.handlers = this.rpcHandlers();
  }

  async start(): Promise<void> {
    const client = mqtt.connect(this.o.brokerUrl, {
      clientId: this.o.config.controller.username,
      username: this.o.config.controller.username,
      password: this.o.config.controller.password,
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
    await new Promise<void>((resolve, reject) => {
      client.once("connect", () => resolve());
      client.once("error", (err) => {
        client.end(true);
        reject(new Error(`the controller cannot connect to ${this.o.brokerUrl}: ${err.message}`));
      });
    });
    const p = this.prefix;
    await this.rollouts.load();
    await this.workQueue.load();
    await client.subscribeAsync([`${p}/d/+/status`, `${p}/d/+/sync`, `${p}/d/+/state`, rpcRequestTopic(p)], {
      qos: 1,
    });
    if (this.o.telemetryTap)
      this.o.telemetryTap((topic, payload) =>
        this.route(topic, payload).catch((err) =>
          this.log.error({ err, topic }, "telemetry handling failed"),
        ),
      );
    else await client.subscribeAsync(`${p}/d/+/telemetry`, { qos: 0 });
    this.timers.push(setInterval(() => this.step(), 1000));
    this.timers.push(
      setInterval(
        () => void this.o.registry.flush().catch((err) => this.log.error({ err }, "registry flush failed")),
        5000,
      ),
    );
    this.timers.push(setInterval(() => void this.pruneNonces(), 60_000));
    this.timers.push(
      setInterval(() => {
        const before = Date.now() - this.o.config.historyRetentionDays * 86_400_000;
        this.delivery.prune(before).catch((err) => this.log.error({ err }, "history pruning failed"));
      }, 3600_000),
    );
    this.log.info("controller started");
  }

  private step(): void {
    this.lastStep = Date.now();
    void this.rollouts.tick();
    void this.workQueue.tick();
  }

  /**
   * Rollouts and work queues also step shortly after devices finish, not only on the 1 s tick:
   * a wave (or a whole rollout) is done as soon as its last device is. One timer for all.
   */
  private stepSoon(): void {
    if (this.soon) return;
    // Soon, but not more than 4 times a second: a step reads the rollout's assignments.
    const wait = Math.max(20, this.lastStep + 250 - Date.now());
    this.soon = setTimeout(() => {
      this.soon = undefined;
      this.step();
    }, wait);
  }

  async stop(): Promise<void> {
    if (this.soon) clearTimeout(this.soon);
    for (const t of this.timers) clearInterval(t);
    await this.o.registry.flush().catch(() => {});
    await this.client?.endAsync().catch(() => {});
  }

  private publish(topic: string, payload: Uint8Array, qos: 0 | 1): void {
    this.client?.publish(topic, Buffer.from(payload), { qos }, (err) => {
      if (err) this.log.debug({ err: err.message, topic }, "publish not completed");
    });
  }

  private drop(reason: string, detail: string): void {
    this.counters.inc(`dropped_${reason}`);
    this.log.warn({ reason, detail }, "dropped a payload");
  }

  private async route(topic: string, payload: Buffer): Promise<void> {
    if (topic === rpcRequestTopic(this.prefix)) return this.onRpc(payload);
    const t = parseDeviceTopic(this.prefix, topic);
    if (!t) return this.drop("unexpected_topic", topic);
    if (t.channel === "state" && payload.length === 0) return; // a cleared retained message
    let env: ReturnType<typeof decodeEnvelope>;
    try {
      env = decodeEnvelope(payload, this.o.config.limits.maxPayloadBytes);
    } catch (err) {
      if (err instanceof PayloadError) return this.drop(err.reason, `${topic}: ${err.message}`);
      throw err;
    }
    if (!this.o.registry.get(t.deviceId)) return this.drop("unknown_device", topic);
    const expected = {
      status: "statusBatch",
      sync: "syncRequest",
      state: "deviceState",
      telemetry: "telemetry",
    }[t.channel];
    if (env.body !== expected) return this.drop("unexpected_body", `${env.body} on ${topic}`);
    switch (env.body) {
      case "statusBatch":
        return this.delivery.onStatusBatch(t.deviceId, env.statusBatch!.statuses ?? []);
      case "syncRequest":
        this.o.registry.seen(t.deviceId, Date.now());
        return this.delivery.onSync(t.deviceId);
      case "telemetry": {
        const m = env.telemetry!;
        const memPct = m.memTotal ? ((m.memUsed ?? 0) * 100) / m.memTotal : 0;
        this.telemetry.set(t.deviceId, {
          at: Date.now(),
          values: {
            "cpu.load": m.cpuLoad ?? 0,
            "mem.used_pct": memPct,
            "disk.free": m.diskFree ?? 0,
            temperature: m.temperatureC ?? Number.NaN,
            uptime: m.uptimeS ?? 0,
          },
        });
        return;
      }
      case "deviceState": {
        const change = this.o.registry.observeState(t.deviceId, env.deviceState!, Date.now());
        if (change) this.delivery.event({ kind: `device.${change}`, deviceId: t.deviceId });
        return;
      }
    }
  }

  // ---- operator RPC ---------------------------------------------------------------------------

  private async onRpc(payload: Buffer): Promise<void> {
    let env: ReturnType<typeof decodeEnvelope>;
    try {
      env = decodeEnvelope(payload, this.o.config.limits.maxPayloadBytes);
    } catch (err) {
      if (err instanceof PayloadError) return this.drop(err.reason, `rpc: ${err.message}`);
      throw err;
    }
    if (env.body !== "rpcRequest") return this.drop("unexpected_body", `${env.body} on rpc/req`);
    const check = verifyRpcRequest(env.rpcRequest!, this.operatorKeys, Date.now(), RPC_WINDOW_MS);
    if (!check.ok) {
      // No verified reply address: answer nobody, count it.
      this.counters.inc("rpc_rejected");
      this.log.warn({ error: check.error }, "rejected an operator request");
      return;
    }
    const { call, params } = check;
    const reply = (body: { ok: boolean; resultJson?: string; error?: string; errorCode?: number }) =>
      this.publish(
        rpcResponseTopic(this.prefix, call.clientId),
        encodeEnvelope({ rpcResponse: { requestId: call.requestId, ...body } }),
        1,
      );
    if (await this.o.store.nonces.get(call.nonce)) {
      this.counters.inc("rpc_replayed");
      this.log.warn({ method: call.method }, "rejected a replayed operator request");
      return reply({ ok: false, error: "replayed request", errorCode: 3 });
    }
    await this.o.store.nonces.put(call.nonce, call.issuedAtMs + RPC_WINDOW_MS, { sync: true } as never);
    const handler = Object.hasOwn(this.handlers, call.method) ? this.handlers[call.method] : undefined;
    if (!handler) return reply({ ok: false, error: `unknown method ${call.method}`, errorCode: 2 });
    const operator = this.operatorNames.get(env.rpcRequest!.keyId ?? "") ?? "?";
    try {
      const result = await handler(params, operator);
      reply({ ok: true, resultJson: JSON.stringify(result ?? null) });
    } catch (err) {
      if (err instanceof RpcError) return reply({ ok: false, error: err.message, errorCode: err.code });
      if (err instanceof z.ZodError) {
        return reply({
          ok: false,
          error: err.issues.map((i) => `${i.path.join(".") || "params"}: ${i.message}`).join("; "),
          errorCode: 2,
        });
      }
      this.log.error({ err, method: call.method }, "rpc handler failed");
      reply({ ok: false, error: `internal error: ${(err as Error).message}`, errorCode: 1 });
    }
  }

  private async pruneNonces(): Promise<void> {
    const now = Date.now();
    const ops = [];
    for await (const [k, exp] of this.o.store.nonces.iterator())
      if (exp < now) ops.push(this.o.store.del(this.o.store.nonces, k));
    if (ops.length) await this.o.store.batch(ops, false);
  }

  private selector(s: string | undefined) {
    if (!s) return undefined;
    try {
      return parseSelector(s);
    } catch (err) {
      if (err instanceof SelectorError) throw new RpcError(err.message);
      throw err;
    }
  }

  private rpcHandlers(): Record<string, Handler> {
    const { registry, store } = this.o;
    const id = z.object({ id: z.string() });
    const labels = z.record(z.string(), z.string()).default({});
    return {
      "server.info": async () => ({
        prefix: this.prefix,
        version: AGENT_VERSION,
        caCert: this.o.ca.certPem,
        http: this.o.httpUrl,
        https: this.o.httpsUrl,
        trustedKeys: this.o.config.operators.map((op) => ({ keyId: op.keyId, publicKey: op.publicKey })),
      }),
      "device.add": async (p) => {
        const a = z.object({ id: z.string(), labels, rotate: z.boolean().default(false) }).parse(p);
        const { device, token } = await registry.add(a.id, a.labels, a.rotate);
        return { id: device.id, username: device.id, password: token };
      },
      "device.ls": async (p) => {
        const a = z.object({ selector: z.string().optional() }).parse(p);
        return registry
          .select(this.selector(a.selector))
          .map(deviceJson)
          .sort((x, y) => x.id.localeCompare(y.id));
      },
      "device.show": async (p) => {
        const d = registry.get(id.parse(p).id);
        if (!d) throw new RpcError(`no device ${id.parse(p).id}`, 1);
        const jobs = (await store.deviceAssignments(d.id)).map((a) => ({
          jobId: a.jobId,
          state: stateName(a.state),
        }));
        return { ...deviceJson(d), queueDepth: d.queueDepth, facts: d.facts ?? {}, jobs };
      },
      "device.rm": async (p) => {
        const { id: devId } = id.parse(p);
        if (!(await registry.remove(devId))) throw new RpcError(`no device ${devId}`, 1);
        return { id: devId, removed: true };
      },
      "device.cert": async (p) => {
        const { id: devId } = id.parse(p);
        if (!registry.get(devId)) throw new RpcError(`no device ${devId}`, 1);
        return { ...issueDeviceCert(this.o.ca, devId), caPem: this.o.ca.certPem };
      },
      "job.submit": async (p, operator) => this.submit(p, operator),
      "rollout.create": async (p, operator) => this.createRollout(p, operator),
      "rollout.ls": async () => this.rollouts.list(),
      "rollout.show": async (p) => {
        const r = await this.rollouts.get(id.parse(p).id);
        if (!r) throw new RpcError(`no rollout ${id.parse(p).id}`, 1);
        return this.rollouts.view(r);
      },
      "rollout.pause": async (p) => this.rollouts.view(await this.rollouts.setState(id.parse(p).id, "pause")),
      "rollout.resume": async (p) =>
        this.rollouts.view(await this.rollouts.setState(id.parse(p).id, "resume")),
      "rollout.abort": async (p) => {
        const a = z
          .object({ id: z.string(), reason: z.string().optional(), force: z.boolean().optional() })
          .parse(p);
        return this.rollouts.view(
          await this.rollouts.setState(a.id, "abort", a.reason ?? "aborted by operator", a.force),
        );
      },
      "device.addMany": async (p) => {
        const a = z
          .object({
            devices: z.array(z.object({ id: z.string(), labels })).max(5000),
            rotate: z.boolean().default(true),
          })
          .parse(p);
        return registry.addMany(a.devices, a.rotate);
      },
      "jobs.ls": async (p) => {
        const a = z
          .object({ device: z.string().optional(), limit: z.number().int().min(1).default(100) })
          .parse(p);
        const out = [];
        const jobs = await store.jobs.values({ reverse: true }).all();
        for (const j of jobs) {
          if (a.device && !j.devices.includes(a.device)) continue;
          const asgs = await store.jobAssignments(j);
          out.push({
            id: j.id,
            name: j.name,
            state: jobState(j, asgs),
            createdAt: new Date(j.createdAt).toISOString(),
            devices: j.devices.length,
          });
          if (out.length >= a.limit) break;
        }
        return out;
      },
      "jobs.show": async (p) => {
        const v = await this.delivery.view(id.parse(p).id);
        if (!v) throw new RpcError(`no job ${id.parse(p).id}`, 1);
        return v;
      },
      "jobs.cancel": async (p) => {
        const a = z.object({ id: z.string(), reason: z.string().default("canceled by operator") }).parse(p);
        const job = await this.delivery.cancel(a.id, a.reason);
        if (!job) throw new RpcError(`no job ${a.id}`, 1);
        return jobJson(job, await store.jobAssignments(job));
      },
    };
  }

  /** Checks a signed job from an operator and makes its record (no devices yet). */
  private async jobRecord(signedJob: string, operator: string): Promise<{ job: JobRecord; spec: Spec }> {
    const signed = pb.SignedJob.decode(Buffer.from(signedJob, "base64"));
    const v = verifySignedJob(signed, this.operatorKeys);
    if (!v.ok) throw new RpcError(`job signature: ${v.message}`);
    const spec = v.spec;
    if (!/^[0-9A-HJKMNP-TV-Z]{26}$/.test(spec.jobId)) throw new RpcError("job id must be a ULID");
    if (await this.o.store.jobs.get(spec.jobId)) throw new RpcError(`job ${spec.jobId} already exists`);
    const graph = checkGraph(spec.tasks);
    if (graph) throw new RpcError(graph.message);
    if (spec.expiresAtMs <= Date.now()) throw new RpcError("job has already expired");
    const job: JobRecord = {
      id: spec.jobId,
      name: spec.name || spec.tasks.map((t) => t.type).join("+"),
      signed: signedJob,
      createdAt: Date.now(),
      expiresAt: spec.expiresAtMs,
      recurring: Boolean(spec.schedule?.cron),
      tasks: spec.tasks.map((t) => ({ id: t.id, type: t.type })),
      target: { deviceIds: spec.target?.deviceIds ?? [], selector: spec.target?.selector ?? "" },
      devices: [],
      createdBy: operator,
    };
    return { job, spec };
  }

  private async submit(p: unknown, operator: string) {
    const a = z
      .object({
        signedJob: z.string(),
        deviceIds: z.array(z.string()).default([]),
        selector: z.string().default(""),
        any: z.number().int().min(1).optional(),
        timeoutS: z.number().min(0).default(0),
      })
      .parse(p);
    const { job } = await this.jobRecord(a.signedJob, operator);
    const { deviceIds: targetIds, selector } = job.target;
    if (a.deviceIds.join(",") !== targetIds.join(",") || a.selector !== selector) {
      throw new RpcError("targets in the request differ from the signed job's target");
    }
    if (a.any) {
      if (!selector) throw new RpcError("--any needs --selector");
      job.any = { need: a.any, selector, timeoutS: a.timeoutS };
      await this.workQueue.create(job);
    } else {
      if (targetIds.length) {
        const unknown = targetIds.filter((d) => !this.o.registry.get(d));
        if (unknown.length) throw new RpcError(`unknown device(s): ${unknown.join(", ")}`);
        job.devices = [...new Set(targetIds)];
      } else if (selector) {
        job.devices = this.o.registry.select(this.selector(selector)).map((d) => d.id);
        if (!job.devices.length) throw new RpcError(`no device matches selector "${selector}"`);
      } else throw new RpcError("job has no target (device ids or selector)");
      await this.delivery.submit(job);
    }
    return jobJson(job, await this.o.store.jobAssignments(job));
  }

  private async createRollout(p: unknown, operator: string) {
    const a = z
      .object({
        signedJob: z.string(),
        selector: z.string().min(1),
        waves: z.string().optional(),
        exponential: z.string().optional(),
        maxFailuresPct: z.number().min(0).max(100).default(100),
        minFinished: z.number().int().min(1).default(1),
        bakeS: z.number().min(0).default(0),
        timeoutS: z.number().min(0).default(0),
        gate: z.string().optional(),
        continuous: z.boolean().default(false),
        force: z.boolean().default(false),
      })
      .parse(p);
    this.selector(a.selector);
    const { job } = await this.jobRecord(a.signedJob, operator);
    if (job.target.selector !== a.selector || job.target.deviceIds.length) {
      throw new RpcError("the signed job must target the rollout's selector (and no device ids)");
    }
    job.rolloutId = ulid();
    const r = await this.rollouts.create(job, a);
    return this.rollouts.view(r);
  }
}
