// The controller's side of the delivery protocol (DESIGN.md §4) for agent tests: the real
// Delivery, Registry and JobStore on a temporary LevelDB, fed through the real device inbox
// (broker/controller/device-inbox.ts) — not a second implementation. What it adds is for the
// tests: every applied status in order (from Delivery's events), switches that withhold sync
// answers or status acks, and raw publishes of assignments the controller would never make.
import { Buffer } from "node:buffer";
import mqtt, { type MqttClient } from "mqtt";
import pino from "pino";
import { Delivery } from "../../broker/controller/delivery.js";
import { deviceInbox } from "../../broker/controller/device-inbox.js";
import { JobStore } from "../../broker/controller/job-store.js";
import { Registry } from "../../broker/controller/registry.js";
import { ControllerStore, type JobRecord } from "../../broker/controller/store.js";
import { Counters } from "../../common/counters.js";
import { decodeEnvelope, encodeEnvelope } from "../../proto/envelope.js";
import { type JobAssignment, type JobSpec, pb, TaskState, type TaskStatus } from "../../proto/index.js";
import { deviceTopic, eventsTopic, parseDeviceTopic } from "../../proto/topics.js";
import { sign, tempDir } from "./keys.js";
import { waitUntil } from "./wait.js";

const MAX_PAYLOAD = 256 * 1024;

export class TestController {
  readonly applied = new Map<string, TaskStatus[]>();
  readonly lastSeq = new Map<string, number>();
  /** Every assignment made, as sent (raw ones included). */
  readonly assignments = new Map<string, Map<string, JobAssignment>>();
  readonly syncs = new Map<string, number>();
  /** The ids of every SyncRequest seen, per device, in order. */
  readonly syncRequestIds = new Map<string, number[]>();
  readonly counters = new Counters();
  ackStatuses = true;
  /** The QoS of StatusAck (the real controller: 0 through the embedded broker, else 1). */
  ackQos: 0 | 1 = 1;
  answerSync = true;
  private client!: MqttClient;
  private readonly tmp = tempDir("fleet-testctl-");
  private readonly store = new ControllerStore(this.tmp.dir);
  private readonly registry = new Registry(this.store);
  private readonly jobs = new JobStore(this.store);
  /** Jobs whose assignment publish is withheld (`assign(..., { publish: false })`). */
  private readonly withheld = new Set<string>();
  private readonly delivery: Delivery;
  private readonly inbox: (topic: string, payload: Buffer) => Promise<void>;
  private queue: Promise<void> = Promise.resolve();

  constructor(
    readonly url: string,
    readonly prefix = "fleet/v1",
  ) {
    const log = pino({ level: "silent" });
    this.delivery = new Delivery({
      store: this.store,
      jobs: this.jobs,
      registry: this.registry,
      prefix,
      log,
      counters: this.counters,
      publish: (topic, payload, qos) => this.publish(topic, payload, qos),
      maxPayloadBytes: MAX_PAYLOAD,
      now: () => Date.now(),
    });
    this.inbox = deviceInbox({
      prefix,
      maxPayloadBytes: MAX_PAYLOAD,
      registry: this.registry,
      delivery: this.delivery,
      onTelemetry: () => {},
      publish: (topic, payload, qos, retain) =>
        void this.client.publishAsync(topic, Buffer.from(payload), { qos, retain }).catch(() => {}),
      drop: (reason) => this.counters.inc(`dropped_${reason}`),
      now: () => Date.now(),
    });
  }

  /** Statuses a device sent again after they were applied (go-back-N re-sends). */
  get duplicatesIgnored(): number {
    return this.counters.get("statuses_duplicate");
  }

  async start(): Promise<void> {
    await this.store.open();
    await this.registry.load();
    this.client = await mqtt.connectAsync(this.url, {
      clientId: `controller-${Math.random().toString(16).slice(2)}`,
      reconnectPeriod: 100,
    });
    this.client.on("message", (topic, payload) => {
      // In arrival order, as the controller's MQTT client hands them over.
      this.queue = this.queue.then(() => this.onMessage(topic, payload)).catch(() => {});
    });
    await this.client.subscribeAsync(
      [`${this.prefix}/d/+/status`, `${this.prefix}/d/+/sync`, `${this.prefix}/d/+/state`],
      { qos: 1 },
    );
  }

  async stop(): Promise<void> {
    await this.client.endAsync(true);
    await this.queue;
    await this.store.close();
    this.tmp.cleanup();
  }

  /** Whether the registry has the device online (its DeviceState arrived). */
  online(deviceId: string): boolean {
    return Boolean(this.registry.get(deviceId)?.online);
  }

  statuses(deviceId: string): TaskStatus[] {
    return this.applied.get(deviceId) ?? [];
  }

  /** The latest status of a task ("" = the job itself). */
  latest(deviceId: string, jobId: string, taskId = "", executionId?: string): TaskStatus | undefined {
    const all = this.statuses(deviceId).filter(
      (s) =>
        s.jobId === jobId &&
        s.taskId === taskId &&
        (executionId === undefined || s.executionId === executionId),
    );
    return all[all.length - 1];
  }

  /**
   * Assigns a signed job through Delivery (stored, then published to the device if online). A
   * `raw` assignment — unsigned, forged, for another device — is published as it is: the real
   * controller refuses those at submit, and the tests are about what the agent does with them.
   */
  async assign(
    deviceId: string,
    spec: JobSpec,
    opts: { publish?: boolean; raw?: JobAssignment } = {},
  ): Promise<string> {
    const jobId = spec.jobId!;
    const a = opts.raw ?? { job: sign(spec), deviceId };
    const m = this.assignments.get(deviceId) ?? new Map<string, JobAssignment>();
    this.assignments.set(deviceId, m);
    m.set(jobId, a);
    await this.ensureDevice(deviceId);
    const signed = pb.SignedJob.encode(a.job!).finish();
    const existing = await this.jobs.get(jobId);
    const same =
      existing &&
      Buffer.from(await this.jobs.signed(existing).then((j) => pb.SignedJob.encode(j).finish())).equals(
        signed,
      );
    // Raw, a different job under a used id, or a job the device already has (a re-delivery, as
    // the broker makes after a lost PUBACK): published as it is.
    if (opts.raw || (existing && (!same || existing.devices.includes(deviceId)))) {
      if (opts.publish !== false)
        await this.publishRaw(deviceId, "job", encodeEnvelope({ jobAssignment: a }));
      return jobId;
    }
    if (opts.publish === false) this.withheld.add(jobId);
    try {
      if (existing) await this.delivery.addDevices(existing, [deviceId]);
      else await this.delivery.submit({ record: jobRecord(spec, deviceId), signed });
    } finally {
      this.withheld.delete(jobId);
    }
    return jobId;
  }

  async publishRaw(deviceId: string, channel: "job" | "ctl", payload: Buffer | Uint8Array): Promise<void> {
    await this.client.publishAsync(deviceTopic(this.prefix, deviceId, channel), Buffer.from(payload), {
      qos: 1,
    });
  }

  async ctl(deviceId: string, body: Parameters<typeof encodeEnvelope>[0]): Promise<void> {
    await this.publishRaw(deviceId, "ctl", encodeEnvelope(body));
  }

  /** Cancels through Delivery; a job it never stored (a raw one) gets a bare Cancel. */
  async cancel(deviceId: string, jobId: string, reason = "operator"): Promise<void> {
    if (!(await this.delivery.cancel(jobId, reason))) await this.ctl(deviceId, { cancel: { jobId, reason } });
  }

  private async ensureDevice(deviceId: string): Promise<void> {
    if (!this.registry.get(deviceId)) await this.registry.add(deviceId, {});
  }

  private async onMessage(topic: string, payload: Buffer): Promise<void> {
    const t = parseDeviceTopic(this.prefix, topic);
    if (!t) return;
    await this.ensureDevice(t.deviceId);
    if (t.channel === "sync") {
      this.syncs.set(t.deviceId, (this.syncs.get(t.deviceId) ?? 0) + 1);
      const ids = this.syncRequestIds.get(t.deviceId) ?? [];
      this.syncRequestIds.set(t.deviceId, ids);
      ids.push(Number(decodeEnvelope(payload).syncRequest?.requestId ?? 0));
      if (!this.answerSync) return;
    }
    await this.inbox(topic, payload);
  }

  /** Delivery's publishes: to the broker, except what a test withholds; events are recorded. */
  private publish(topic: string, payload: Uint8Array, qos: 0 | 1): boolean {
    if (topic === eventsTopic(this.prefix)) {
      const e = decodeEnvelope(payload).fleetEvent;
      if (e?.kind === "task.status" && e.status) {
        const list = this.applied.get(e.deviceId!) ?? [];
        this.applied.set(e.deviceId!, list);
        list.push(e.status);
        this.lastSeq.set(e.deviceId!, Number(e.status.seq ?? 0));
      }
      return true;
    }
    const env = decodeEnvelope(payload);
    if (env.statusAck && !this.ackStatuses) return true;
    if (env.jobAssignment && this.withheld.has(env.jobAssignment.job ? jobIdOf(env.jobAssignment) : ""))
      return true;
    this.client.publish(topic, Buffer.from(payload), { qos: env.statusAck ? this.ackQos : qos });
    return true;
  }

  /** Polls `fn` every 20 ms until truthy (waitUntil, at the pace of in-process agents). */
  waitFor<T>(
    what: string,
    fn: () => T | undefined | false | Promise<T | undefined | false>,
    timeoutMs = 20_000,
  ): Promise<T> {
    return waitUntil(what, fn, timeoutMs, 20);
  }

  /** Waits until the job (execution "") reaches a terminal job-level state. */
  waitJob(deviceId: string, jobId: string, state?: TaskState, timeoutMs?: number): Promise<TaskStatus> {
    return this.waitFor(
      `job ${jobId} on ${deviceId}${state ? ` to be ${TaskState[state]}` : ""}`,
      () => {
        const s = this.latest(deviceId, jobId, "", "");
        if (!s) return undefined;
        if (state !== undefined) return s.state === state ? s : undefined;
        return [TaskState.QUEUED, TaskState.RUNNING, TaskState.WAITING].includes(s.state!) ? undefined : s;
      },
      timeoutMs,
    );
  }
}

function jobIdOf(a: JobAssignment): string {
  return pb.JobSpec.decode(a.job!.spec!).jobId;
}

function jobRecord(spec: JobSpec, deviceId: string): JobRecord {
  return {
    id: spec.jobId!,
    name: spec.name || "test",
    createdAt: Date.now(),
    expiresAt: Number(spec.expiresAtMs ?? Date.now() + 3600_000),
    recurring: Boolean(spec.schedule?.cron),
    tasks: (spec.tasks ?? []).map((t) => ({ id: t.id ?? "", type: t.type ?? "" })),
    target: { deviceIds: [deviceId], selector: "" },
    devices: [deviceId],
    createdBy: "test",
  };
}
