// Plays the controller's side of the delivery protocol (DESIGN.md §4) for agent tests:
// stores assignments, publishes them, answers SyncRequests, applies StatusBatches
// idempotently by seq and acknowledges them cumulatively.
import mqtt, { type MqttClient } from "mqtt";
import { decodeEnvelope, encodeEnvelope } from "../../proto/envelope.js";
import { type JobAssignment, type JobSpec, TaskState, type TaskStatus } from "../../proto/index.js";
import { deviceTopic, parseDeviceTopic } from "../../proto/topics.js";
import { sign } from "./keys.js";

export class TestController {
  readonly applied = new Map<string, TaskStatus[]>();
  readonly lastSeq = new Map<string, number>();
  readonly assignments = new Map<string, Map<string, JobAssignment>>();
  readonly telemetry: Array<{ deviceId: string }> = [];
  readonly states = new Map<string, { online: boolean }>();
  duplicatesIgnored = 0;
  syncRequests = 0;
  readonly syncs = new Map<string, number>();
  ackStatuses = true;
  answerSync = true;
  private client!: MqttClient;

  constructor(
    readonly url: string,
    readonly prefix = "fleet/v1",
  ) {}

  async start(): Promise<void> {
    this.client = await mqtt.connectAsync(this.url, {
      clientId: `controller-${Math.random().toString(16).slice(2)}`,
      reconnectPeriod: 100,
    });
    this.client.on("message", (topic, payload) => this.onMessage(topic, payload));
    await this.client.subscribeAsync(
      [
        `${this.prefix}/d/+/status`,
        `${this.prefix}/d/+/sync`,
        `${this.prefix}/d/+/state`,
        `${this.prefix}/d/+/telemetry`,
      ],
      { qos: 1 },
    );
  }

  async stop(): Promise<void> {
    await this.client.endAsync(true);
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

  async assign(
    deviceId: string,
    spec: JobSpec,
    opts: { publish?: boolean; raw?: JobAssignment } = {},
  ): Promise<string> {
    const a = opts.raw ?? { job: sign(spec), deviceId };
    const jobId = spec.jobId!;
    const m = this.assignments.get(deviceId) ?? new Map<string, JobAssignment>();
    this.assignments.set(deviceId, m);
    m.set(jobId, a);
    if (opts.publish !== false) {
      await this.client.publishAsync(
        deviceTopic(this.prefix, deviceId, "job"),
        Buffer.from(encodeEnvelope({ jobAssignment: a })),
        { qos: 1 },
      );
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

  async cancel(deviceId: string, jobId: string, reason = "operator"): Promise<void> {
    await this.ctl(deviceId, { cancel: { jobId, reason } });
  }

  /** An assignment counts as acknowledged once a job-level QUEUED or REJECTED status arrived. */
  private unacked(deviceId: string): JobAssignment[] {
    const m = this.assignments.get(deviceId);
    if (!m) return [];
    return [...m.entries()]
      .filter(([jobId]) => !this.statuses(deviceId).some((s) => s.jobId === jobId && s.taskId === ""))
      .map(([, a]) => a);
  }

  private onMessage(topic: string, payload: Buffer): void {
    const t = parseDeviceTopic(this.prefix, topic);
    if (!t) return;
    const env = decodeEnvelope(payload);
    if (env.body === "statusBatch") {
      const list = this.applied.get(t.deviceId) ?? [];
      this.applied.set(t.deviceId, list);
      let last = this.lastSeq.get(t.deviceId) ?? 0;
      for (const s of env.statusBatch!.statuses ?? []) {
        if ((s.seq ?? 0) <= last) {
          this.duplicatesIgnored++;
          continue;
        }
        last = s.seq!;
        list.push(s);
      }
      this.lastSeq.set(t.deviceId, last);
      if (this.ackStatuses) void this.ctl(t.deviceId, { statusAck: { upToSeq: last } });
    } else if (env.body === "syncRequest") {
      this.syncRequests++;
      this.syncs.set(t.deviceId, (this.syncs.get(t.deviceId) ?? 0) + 1);
      if (!this.answerSync) return;
      void this.ctl(t.deviceId, {
        syncResponse: { assignments: this.unacked(t.deviceId), nowMs: Date.now() },
      });
    } else if (env.body === "deviceState") {
      this.states.set(t.deviceId, { online: Boolean(env.deviceState!.online) });
    } else if (env.body === "telemetry") {
      this.telemetry.push({ deviceId: t.deviceId });
    }
  }

  async waitFor<T>(what: string, fn: () => T | undefined | false, timeoutMs = 20_000): Promise<T> {
    const start = Date.now();
    for (;;) {
      const v = fn();
      if (v) return v;
      if (Date.now() - start > timeoutMs) throw new Error(`timed out waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 20));
    }
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
