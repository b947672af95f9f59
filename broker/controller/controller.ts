// The controller: an ordinary MQTT client of the broker (so the broker stays replaceable),
// with the registry, job store, delivery and operator RPC. State lives in LevelDB; the only
// timers are global (registry flush, nonce and history pruning), none per device.
import { createPublicKey, type KeyObject } from "node:crypto";
import mqtt, { type IPublishPacket, type MqttClient } from "mqtt";
import type { Logger } from "pino";
import { z } from "zod";
import { Counters } from "../../agent/counters.js";
import { checkGraph } from "../../agent/dag.js";
import { AGENT_VERSION } from "../../agent/version.js";
import { decodeEnvelope, encodeEnvelope, PayloadError } from "../../proto/envelope.js";
import { pb } from "../../proto/index.js";
import { verifyRpcRequest } from "../../proto/rpc.js";
import { parseSelector, SelectorError } from "../../proto/selector.js";
import { verifySignedJob } from "../../proto/signing.js";
import { parseDeviceTopic, rpcRequestTopic, rpcResponseTopic } from "../../proto/topics.js";
import type { ServerConfig } from "../config.js";
import { type CertPair, issueDeviceCert } from "../pki.js";
import { Delivery, jobJson, jobState, stateName } from "./delivery.js";
import { deviceJson, type Registry, RpcError } from "./registry.js";
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
}

type Handler = (params: unknown, operator: string) => Promise<unknown>;

export class Controller {
  readonly counters: Counters;
  readonly delivery: Delivery;
  private client: MqttClient | undefined;
  private readonly log: Logger;
  private readonly prefix: string;
  private readonly operatorKeys: Map<string, KeyObject>;
  private readonly operatorNames: Map<string, string>;
  private readonly handlers: Record<string, Handler>;
  private timers: NodeJS.Timeout[] = [];

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
    });
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
      client.once("error", reject);
    });
    const p = this.prefix;
    await client.subscribeAsync([`${p}/d/+/status`, `${p}/d/+/sync`, `${p}/d/+/state`, rpcRequestTopic(p)], {
      qos: 1,
    });
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

  async stop(): Promise<void> {
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
    const expected = { status: "statusBatch", sync: "syncRequest", state: "deviceState" }[t.channel];
    if (env.body !== expected) return this.drop("unexpected_body", `${env.body} on ${topic}`);
    switch (env.body) {
      case "statusBatch":
        return this.delivery.onStatusBatch(t.deviceId, env.statusBatch!.statuses ?? []);
      case "syncRequest":
        this.o.registry.seen(t.deviceId, Date.now());
        return this.delivery.onSync(t.deviceId);
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

  private async submit(p: unknown, operator: string) {
    const a = z
      .object({
        signedJob: z.string(),
        deviceIds: z.array(z.string()).default([]),
        selector: z.string().default(""),
      })
      .parse(p);
    const signed = pb.SignedJob.decode(Buffer.from(a.signedJob, "base64"));
    const v = verifySignedJob(signed, this.operatorKeys);
    if (!v.ok) throw new RpcError(`job signature: ${v.message}`);
    const spec = v.spec;
    if (!/^[0-9A-HJKMNP-TV-Z]{26}$/.test(spec.jobId)) throw new RpcError("job id must be a ULID");
    if (await this.o.store.jobs.get(spec.jobId)) throw new RpcError(`job ${spec.jobId} already exists`);
    const graph = checkGraph(spec.tasks);
    if (graph) throw new RpcError(graph.message);
    if (spec.expiresAtMs <= Date.now()) throw new RpcError("job has already expired");
    const targetIds = spec.target?.deviceIds ?? [];
    const selector = spec.target?.selector ?? "";
    if (a.deviceIds.join(",") !== targetIds.join(",") || a.selector !== selector) {
      throw new RpcError("targets in the request differ from the signed job's target");
    }
    let devices: string[];
    if (targetIds.length) {
      const unknown = targetIds.filter((d) => !this.o.registry.get(d));
      if (unknown.length) throw new RpcError(`unknown device(s): ${unknown.join(", ")}`);
      devices = [...new Set(targetIds)];
    } else if (selector) {
      devices = this.o.registry.select(this.selector(selector)).map((d) => d.id);
      if (!devices.length) throw new RpcError(`no device matches selector "${selector}"`);
    } else throw new RpcError("job has no target (device ids or selector)");
    const job: JobRecord = {
      id: spec.jobId,
      name: spec.name || spec.tasks.map((t) => t.type).join("+"),
      signed: a.signedJob,
      createdAt: Date.now(),
      expiresAt: spec.expiresAtMs,
      recurring: Boolean(spec.schedule?.cron),
      tasks: spec.tasks.map((t) => ({ id: t.id, type: t.type })),
      target: { deviceIds: targetIds, selector },
      devices,
      createdBy: operator,
    };
    await this.delivery.submit(job);
    return jobJson(job, await this.o.store.jobAssignments(job));
  }
}
