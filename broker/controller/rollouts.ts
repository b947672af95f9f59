// Rollouts (DESIGN.md §6): one signed job delivered to a selector in waves. Each wave waits
// until its devices are terminal, then bakes (optionally health-gated), then the next starts.
// Failures above a threshold abort. State lives in LevelDB and every step is persisted before
// it acts, so a controller restart resumes each rollout where it was and no device receives
// the job twice (assignments are keyed by device and job). One global tick drives them all.
//
// A little over 400 lines: wave planning and the gate grammar are pure functions at the top
// (unit-tested in test/unit/rollouts.test.ts); the class is the one step function and its
// persistence, kept together so that "persist, then act" can be read in one place.
import type { Logger } from "pino";
import type { Counters } from "../../common/counters.js";
import { ApiError, RpcErrorCode } from "../../proto/api.js";
import { TaskState, TERMINAL_STATES } from "../../proto/index.js";
import { matchesSelector, parseSelector } from "../../proto/selector.js";
import type { Delivery } from "./delivery.js";
import { FAILED_OUTCOMES, tally } from "./job-state.js";
import type { JobStore, NewJob } from "./job-store.js";
import type { Registry } from "./registry.js";
import type { Assignment, ControllerStore, JobRecord, Op, RolloutRecord } from "./store.js";
import { Ticker } from "./ticker.js";

export interface TelemetrySample {
  at: number;
  values: Record<string, number>;
}

export interface RolloutContext {
  /** For the rollout records; jobs and assignments go through `jobs`. */
  store: ControllerStore;
  jobs: JobStore;
  registry: Registry;
  delivery: Delivery;
  log: Logger;
  /** `rollout_steps`: each pass over a live rollout's assignments. */
  counters: Counters;
  now(): number;
  telemetry(deviceId: string): TelemetrySample | undefined;
  /** Ops queueing notifications of a rollout event, written with the rollout's new state. */
  notifyOps?(event: string, r: RolloutRecord, detail: object): Op[];
}

const MAX_WAVES = 1000;

/** Cumulative wave targets: "1,10%,50%,100%" or exponential "base,factor"; the last reaches everyone. */
export function planWaves(
  total: number,
  o: { waves?: string; exponential?: string },
): { specs: string[]; targets: number[] } {
  const targets: number[] = [];
  let specs: string[];
  if (o.exponential) {
    const [b, f] = o.exponential.split(",").map(Number);
    if (!b || !f || b < 1 || f <= 1)
      throw new ApiError(`--exponential "${o.exponential}": want base,factor with base >= 1 and factor > 1`);
    specs = [];
    // Every wave adds at least one device (a factor near 1 must not loop for ever), and there
    // are at most MAX_WAVES of them.
    for (let n = b; ; n = Math.max(n * f, (targets.at(-1) ?? 0) + 1)) {
      const t = Math.min(total, Math.ceil(n));
      specs.push(String(t));
      targets.push(t);
      if (t >= total) break;
      if (targets.length >= MAX_WAVES)
        throw new ApiError(
          `--exponential "${o.exponential}" makes more than ${MAX_WAVES} waves; use a larger factor`,
        );
    }
  } else {
    specs = (o.waves ?? "100%")
      .split(",")
      .map((s) => s.trim())
      .filter(Boolean);
    if (!specs.length) throw new ApiError("--waves is empty");
    for (const s of specs) {
      const m = /^(\d+(?:\.\d+)?)(%?)$/.exec(s);
      if (!m) throw new ApiError(`--waves: "${s}" is neither a count nor a percentage`);
      const n = m[2] ? Math.ceil((Number(m[1]) / 100) * total) : Number(m[1]);
      if (m[2] && Number(m[1]) > 100) throw new ApiError(`--waves: "${s}" is over 100%`);
      targets.push(Math.min(total, Math.max(n, targets.at(-1) ?? 0)));
    }
    if ((targets.at(-1) ?? 0) < total) {
      specs.push("100%");
      targets.push(total);
    }
  }
  // Drop waves that would add nobody (e.g. "1,1%" on a small fleet).
  const keep = targets.map((t, i) => i === 0 || t > targets[i - 1]!);
  return { specs: specs.filter((_, i) => keep[i]), targets: targets.filter((_, i) => keep[i]) };
}

/** `cpu.load<0.9`, `mem.used_pct<=80`, `temperature>=0` */
export function parseGate(gate: string | undefined): {
  online: boolean;
  metric?: { name: string; op: string; value: number };
} {
  if (!gate) return { online: false };
  if (gate === "online") return { online: true };
  const m = /^telemetry:([a-z_.]+)\s*(<=|>=|<|>|==|!=)\s*(-?\d+(?:\.\d+)?)$/.exec(gate);
  if (!m)
    throw new ApiError(
      `--gate "${gate}": want "online" or "telemetry:<metric><op><value>", e.g. telemetry:cpu.load<0.9`,
    );
  return { online: true, metric: { name: m[1]!, op: m[2]!, value: Number(m[3]) } };
}

function holds(v: number, op: string, want: number): boolean {
  switch (op) {
    case "<":
      return v < want;
    case "<=":
      return v <= want;
    case ">":
      return v > want;
    case ">=":
      return v >= want;
    case "==":
      return v === want;
    default:
      return v !== want;
  }
}

export function counts(r: RolloutRecord, asgs: readonly Assignment[]) {
  const t = tally(asgs);
  // Devices of the pool not assigned yet (later waves) are pending too.
  return { total: r.pool.length, ...t, pending: t.pending + r.pool.length - asgs.length };
}

export class Rollouts {
  private readonly active = new Map<string, RolloutRecord>();
  private readonly ticker = new Ticker();

  constructor(private readonly ctx: RolloutContext) {}

  async load(): Promise<void> {
    for await (const r of this.ctx.store.rollouts.values()) if (this.isLive(r)) this.active.set(r.id, r);
  }

  private isLive(r: RolloutRecord): boolean {
    return r.state === "RUNNING" || r.state === "PAUSED" || (r.state === "SUCCEEDED" && r.continuous);
  }

  async create(
    newJob: NewJob,
    o: Pick<
      RolloutRecord,
      "selector" | "maxFailuresPct" | "minFinished" | "bakeS" | "timeoutS" | "gate" | "continuous" | "force"
    > & {
      waves?: string;
      exponential?: string;
    },
  ): Promise<RolloutRecord> {
    parseGate(o.gate);
    const job = newJob.record;
    const pool = this.ctx.registry.select(parseSelector(o.selector)).map((d) => d.id);
    if (!pool.length && !o.continuous) throw new ApiError(`no device matches selector "${o.selector}"`);
    const { specs, targets } = planWaves(pool.length, o);
    const r: RolloutRecord = {
      id: job.rolloutId!,
      jobId: job.id,
      name: job.name,
      selector: o.selector,
      createdAt: this.ctx.now(),
      state: "RUNNING",
      pool,
      waveSpecs: specs,
      waves: targets.map((t) => ({ target: t, devices: [] })),
      current: 0,
      maxFailuresPct: o.maxFailuresPct,
      minFinished: o.minFinished,
      bakeS: o.bakeS,
      timeoutS: o.timeoutS,
      gate: o.gate,
      continuous: o.continuous,
      force: o.force,
    };
    job.devices = [];
    await this.ctx.delivery.submit(newJob, [this.ctx.store.put(this.ctx.store.rollouts, r.id, r)]);
    await this.step(r); // the first wave starts now, not at the next tick
    if (this.isLive(r)) this.active.set(r.id, r); // only now: the tick must not step it concurrently
    this.ctx.delivery.event({
      kind: "rollout.created",
      jobId: job.id,
      detailJson: JSON.stringify({ rolloutId: r.id, devices: pool.length, waves: specs }),
    });
    return r;
  }

  get(id: string): Promise<RolloutRecord | undefined> {
    return Promise.resolve(this.active.get(id) ?? this.ctx.store.rollouts.get(id));
  }

  async setState(
    id: string,
    op: "pause" | "resume" | "abort",
    reason?: string,
    force?: boolean,
  ): Promise<RolloutRecord> {
    const r = await this.get(id);
    if (!r) throw new ApiError(`no rollout ${id}`, RpcErrorCode.RPC_NOT_FOUND);
    if (op === "pause") {
      if (r.state !== "RUNNING") throw new ApiError(`rollout ${id} is ${r.state}, not RUNNING`);
      r.state = "PAUSED";
      await this.save(r, "rollout.paused");
    } else if (op === "resume") {
      if (r.state !== "PAUSED") throw new ApiError(`rollout ${id} is ${r.state}, not PAUSED`);
      r.state = "RUNNING";
      await this.save(r, "rollout.resumed");
    } else {
      if (r.state === "ABORTED") return r;
      if (force !== undefined) r.force = force;
      await this.abort(r, reason ?? "aborted by operator");
    }
    return r;
  }

  private async save(r: RolloutRecord, event?: string, detail: object = {}): Promise<void> {
    const notify = event ? (this.ctx.notifyOps?.(event, r, detail) ?? []) : [];
    await this.ctx.store.batch([this.ctx.store.put(this.ctx.store.rollouts, r.id, r), ...notify]);
    if (!this.isLive(r)) this.active.delete(r.id);
    if (event)
      this.ctx.delivery.event({
        kind: event,
        jobId: r.jobId,
        detailJson: JSON.stringify({ rolloutId: r.id, state: r.state, ...detail }),
      });
  }

  /** Withdraws what was not delivered, cancels what is queued; running ones finish unless forced. */
  private async abort(r: RolloutRecord, reason: string): Promise<void> {
    r.state = "ABORTED";
    r.reason = reason;
    r.finishedAt = this.ctx.now();
    await this.save(r, "rollout.aborted", { reason });
    const job = await this.ctx.delivery.job(r.jobId);
    if (!job) return;
    const open = (await this.ctx.jobs.ofJob(job)).filter((a) => !TERMINAL_STATES.has(a.state));
    const stop = open.filter((a) => r.force || a.state !== TaskState.RUNNING);
    await this.ctx.delivery.close(
      job,
      stop,
      TaskState.CANCELED,
      "rollout_aborted",
      `rollout aborted: ${reason}`,
    );
    this.ctx.log.warn({ rolloutId: r.id, reason, canceled: stop.length }, "rollout aborted");
  }

  /** Advances every live rollout; called once a second. */
  tick(): Promise<void> {
    return this.stepEach(this.active.values());
  }

  /** Steps the live rollouts of one job at once (its last device just ended); not during a tick. */
  jobSettled(jobId: string): Promise<void> {
    return this.stepEach([...this.active.values()].filter((r) => r.jobId === jobId));
  }

  private stepEach(rollouts: Iterable<RolloutRecord>): Promise<void> {
    return this.ticker.run(
      rollouts,
      (r) => this.step(r),
      (r, err) => this.ctx.log.error({ err, rolloutId: r.id }, "rollout step failed"),
    );
  }

  private async step(r: RolloutRecord): Promise<void> {
    this.ctx.counters.inc("rollout_steps");
    const job = await this.ctx.delivery.job(r.jobId);
    if (!job) return;
    const now = this.ctx.now();
    if (r.continuous && r.state !== "PAUSED") await this.includeNewDevices(r, job);
    if (r.state !== "RUNNING") return;
    const wave = r.waves[r.current];
    if (!wave) return;
    if (wave.startedAt === undefined) {
      // Persist the wave's membership with the assignments (one batch), then deliver.
      const from = r.current === 0 ? 0 : r.waves[r.current - 1]!.target;
      wave.devices = r.pool.slice(from, wave.target);
      wave.startedAt = now;
      await this.ctx.delivery.addDevices(job, wave.devices, [
        this.ctx.store.put(this.ctx.store.rollouts, r.id, r),
      ]);
      this.ctx.delivery.event({
        kind: "rollout.wave_started",
        jobId: r.jobId,
        detailJson: JSON.stringify({ rolloutId: r.id, wave: r.current + 1, devices: wave.devices.length }),
      });
      return;
    }
    const asgs = await this.ctx.jobs.ofJob(job);
    // Per-device timeout: a device that has not finished in time ends TIMED_OUT.
    if (r.timeoutS > 0) {
      const late = asgs.filter(
        (a) => !TERMINAL_STATES.has(a.state) && now - (a.assignedAt ?? wave.startedAt!) > r.timeoutS * 1000,
      );
      if (late.length)
        await this.ctx.delivery.close(
          job,
          late,
          TaskState.TIMED_OUT,
          "timeout",
          `no result within ${r.timeoutS}s`,
        );
    }
    const c = counts(r, asgs);
    const finished = c.succeeded + c.failed;
    if (finished >= Math.max(1, r.minFinished) && (c.failed * 100) / finished > r.maxFailuresPct) {
      return this.abort(
        r,
        `failure rate ${Math.round((c.failed * 1000) / finished) / 10}% (${c.failed} of ${finished} finished) is above ${r.maxFailuresPct}%`,
      );
    }
    const inWave = new Set(wave.devices);
    const waveAsgs = asgs.filter((a) => inWave.has(a.deviceId));
    if (waveAsgs.length < wave.devices.length || waveAsgs.some((a) => !TERMINAL_STATES.has(a.state))) return;
    if (wave.bakeUntil === undefined) {
      wave.finishedAt = now;
      wave.bakeUntil = now + r.bakeS * 1000;
      await this.save(r, "rollout.wave_baking", { wave: r.current + 1, bakeS: r.bakeS });
    }
    const gateProblem = this.checkGate(r, waveAsgs, wave.finishedAt ?? now);
    if (gateProblem) return this.abort(r, gateProblem);
    if (now < wave.bakeUntil) return;
    const ok = waveAsgs.filter((a) => a.state === TaskState.SUCCEEDED);
    if (r.gate && parseGate(r.gate).metric) {
      const silent = ok
        .filter((a) => (this.ctx.telemetry(a.deviceId)?.at ?? 0) < wave.finishedAt!)
        .map((a) => a.deviceId);
      if (silent.length)
        return this.abort(
          r,
          `gate ${r.gate}: no telemetry after the wave from ${silent.slice(0, 10).join(", ")}`,
        );
    }
    r.current++;
    if (r.current >= r.waves.length) {
      r.state = "SUCCEEDED";
      r.finishedAt = now;
      await this.save(r, "rollout.succeeded");
    } else await this.save(r, "rollout.wave_done", { wave: r.current });
  }

  /** Health gate through the bake: succeeded devices stay online (and keep their telemetry in bounds). */
  private checkGate(r: RolloutRecord, waveAsgs: readonly Assignment[], since: number): string | undefined {
    const gate = parseGate(r.gate);
    if (!gate.online) return undefined;
    const ok = waveAsgs.filter((a) => a.state === TaskState.SUCCEEDED).map((a) => a.deviceId);
    const offline = ok.filter((d) => !this.ctx.registry.get(d)?.online);
    if (offline.length)
      return `gate ${r.gate}: device(s) went offline during the bake: ${offline.slice(0, 10).join(", ")}`;
    if (!gate.metric) return undefined;
    const { name, op, value } = gate.metric;
    const bad = ok.filter((d) => {
      const t = this.ctx.telemetry(d);
      return t && t.at >= since && t.values[name] !== undefined && !holds(t.values[name]!, op, value);
    });
    if (bad.length) {
      const show = bad.slice(0, 10).map((d) => `${d} (${name}=${this.ctx.telemetry(d)?.values[name]})`);
      return `gate ${r.gate}: violated by ${show.join(", ")}`;
    }
    return undefined;
  }

  /** --continuous: devices that match later join the wave in progress (or the last one). */
  private async includeNewDevices(r: RolloutRecord, job: JobRecord): Promise<void> {
    const known = new Set(r.pool);
    const reqs = parseSelector(r.selector);
    const fresh = this.ctx.registry
      .select(undefined)
      .filter((d) => !known.has(d.id) && matchesSelector(reqs, d.labels))
      .map((d) => d.id);
    if (!fresh.length) return;
    r.pool.push(...fresh);
    const started = r.waves.filter((w) => w.startedAt !== undefined);
    const wave = started.at(-1);
    for (const w of r.waves) w.target = Math.max(w.target, 0);
    r.waves.at(-1)!.target = r.pool.length;
    if (wave && (r.state === "SUCCEEDED" || wave === r.waves.at(-1))) {
      wave.devices.push(...fresh);
      await this.ctx.delivery.addDevices(job, fresh, [this.ctx.store.put(this.ctx.store.rollouts, r.id, r)]);
    } else await this.save(r);
    this.ctx.delivery.event({
      kind: "rollout.devices_added",
      jobId: r.jobId,
      detailJson: JSON.stringify({ rolloutId: r.id, devices: fresh }),
    });
  }

  async view(r: RolloutRecord) {
    const job = await this.ctx.delivery.job(r.jobId);
    const asgs = job ? await this.ctx.jobs.ofJob(job) : [];
    const byDevice = new Map(asgs.map((a) => [a.deviceId, a]));
    return {
      id: r.id,
      jobId: r.jobId,
      name: r.name,
      selector: r.selector,
      state: r.state,
      ...(r.reason ? { reason: r.reason } : {}),
      createdAt: new Date(r.createdAt).toISOString(),
      ...(r.finishedAt
        ? { finishedAt: new Date(r.finishedAt).toISOString(), durationMs: r.finishedAt - r.createdAt }
        : {}),
      currentWave: Math.min(r.current + 1, r.waves.length),
      waves: r.waves.map((w, i) => {
        const a = w.devices.map((d) => byDevice.get(d)).filter((x): x is Assignment => x !== undefined);
        return {
          wave: i + 1,
          spec: r.waveSpecs[i] ?? "",
          devices: i === 0 ? w.target : w.target - r.waves[i - 1]!.target,
          state:
            w.startedAt === undefined
              ? "PENDING"
              : i < r.current || r.state === "SUCCEEDED"
                ? "DONE"
                : w.bakeUntil !== undefined
                  ? "BAKING"
                  : "RUNNING",
          succeeded: a.filter((x) => x.state === TaskState.SUCCEEDED).length,
          failed: a.filter((x) => FAILED_OUTCOMES.has(x.state)).length,
        };
      }),
      counts: counts(r, asgs),
      ...bytesOf(asgs),
      failures: asgs
        .filter((a) => FAILED_OUTCOMES.has(a.state))
        .sort((x, y) => y.updatedAt - x.updatedAt)
        .slice(0, 10)
        .map((a) => {
          const task = Object.entries(a.tasks).find(([, t]) => FAILED_OUTCOMES.has(t.state));
          return {
            deviceId: a.deviceId,
            state: TaskState[a.state] ?? String(a.state),
            reason: a.reason || task?.[1].reason || "",
            message: task ? `${task[0]}: ${task[1].message}` : a.message,
          };
        }),
    };
  }

  /** Rollouts newest first after `after` (exclusive); only running and paused ones with `active`. */
  async *newestFirst(active: boolean, after?: string): AsyncGenerator<RolloutRecord> {
    if (active) {
      const ids = [...this.active.keys()]
        .filter((id) => after === undefined || id < after)
        .sort()
        .reverse();
      for (const id of ids) {
        const r = this.active.get(id);
        if (r && (r.state === "RUNNING" || r.state === "PAUSED")) yield r;
      }
      return;
    }
    for await (const r of this.ctx.store.rollouts.values({ reverse: true, ...(after ? { lt: after } : {}) }))
      yield this.active.get(r.id) ?? r;
  }
}

/**
 * What an update rollout's devices downloaded, by source (DESIGN.md §11): `bytes` sums the
 * tasks' bytes by source; `bytesSaved` is what did not come from the center. Absent when no
 * task reported any (not an update, or artifacts pushed before chunking).
 */
function bytesOf(asgs: readonly Assignment[]) {
  const bytes: Record<string, number> = {};
  for (const a of asgs)
    for (const t of Object.values(a.tasks))
      for (const [k, v] of Object.entries(t.bytesBySource ?? {})) bytes[k] = (bytes[k] ?? 0) + v;
  if (!Object.keys(bytes).length) return {};
  const total = Object.values(bytes).reduce((x, y) => x + y, 0);
  return { bytes, bytesSaved: total - (bytes.center ?? 0) };
}
