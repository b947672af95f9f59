// Work-queue dispatch (DESIGN.md §6): a job for "any N" matching devices goes to the least
// loaded online ones (queue depth from DeviceState) and is re-dispatched elsewhere when a
// device fails, times out or goes offline, until N succeeded or no candidate is left.
import type { Logger } from "pino";
import { ApiError } from "../../proto/api.js";
import { TaskState, TERMINAL_STATES } from "../../proto/index.js";
import { parseSelector } from "../../proto/selector.js";
import type { Delivery } from "./delivery.js";
import type { JobStore, NewJob } from "./job-store.js";
import type { Registry } from "./registry.js";
import type { JobRecord } from "./store.js";
import { Ticker } from "./ticker.js";

export interface DispatchContext {
  jobs: JobStore;
  registry: Registry;
  delivery: Delivery;
  log: Logger;
  now(): number;
}

export class WorkQueue {
  private readonly active = new Map<string, JobRecord>();
  private readonly ticker = new Ticker();

  constructor(private readonly ctx: DispatchContext) {}

  async load(): Promise<void> {
    for await (const j of this.ctx.jobs.all())
      if (j.any && !j.any.exhausted && !j.cancelled) this.active.set(j.id, j);
  }

  private candidates(job: JobRecord, n: number): string[] {
    if (n <= 0) return [];
    const tried = new Set(job.devices);
    return this.ctx.registry
      .select(parseSelector(job.any!.selector))
      .filter((d) => d.online && !tried.has(d.id))
      .sort((a, b) => a.queueDepth - b.queueDepth || a.id.localeCompare(b.id))
      .slice(0, n)
      .map((d) => d.id);
  }

  async create(newJob: NewJob): Promise<void> {
    const job = newJob.record;
    const first = this.candidates(job, job.any!.need);
    if (!first.length) throw new ApiError(`no online device matches selector "${job.any!.selector}"`);
    job.devices = first;
    await this.ctx.delivery.submit(newJob);
    this.active.set(job.id, job);
  }

  tick(): Promise<void> {
    return this.ticker.run(
      this.active.values(),
      (job) => this.step(job),
      (job, err) => this.ctx.log.error({ err, jobId: job.id }, "work-queue step failed"),
    );
  }

  private async step(job: JobRecord): Promise<void> {
    const current = await this.ctx.delivery.job(job.id);
    if (!current || current.cancelled) {
      this.active.delete(job.id);
      return;
    }
    const any = current.any!;
    const now = this.ctx.now();
    let asgs = await this.ctx.jobs.ofJob(current);
    const open = asgs.filter((a) => !TERMINAL_STATES.has(a.state));
    const gone = open.filter((a) => !this.ctx.registry.get(a.deviceId)?.online);
    if (gone.length)
      await this.ctx.delivery.close(
        current,
        gone,
        TaskState.CANCELED,
        "device_offline",
        "device went offline; re-dispatched",
      );
    const late =
      any.timeoutS > 0
        ? open.filter((a) => !gone.includes(a) && now - (a.assignedAt ?? 0) > any.timeoutS * 1000)
        : [];
    if (late.length)
      await this.ctx.delivery.close(
        current,
        late,
        TaskState.TIMED_OUT,
        "timeout",
        `no result within ${any.timeoutS}s; re-dispatched`,
      );
    if (gone.length || late.length) asgs = await this.ctx.jobs.ofJob(current);
    const ok = asgs.filter((a) => a.state === TaskState.SUCCEEDED).length;
    const running = asgs.filter((a) => !TERMINAL_STATES.has(a.state)).length;
    if (ok >= any.need) {
      this.active.delete(job.id);
      this.ctx.delivery.event({
        kind: "job.dispatch_done",
        jobId: job.id,
        detailJson: JSON.stringify({ succeeded: ok }),
      });
      return;
    }
    const more = this.candidates(current, any.need - ok - running);
    if (more.length) {
      await this.ctx.delivery.addDevices(current, more);
      this.ctx.delivery.event({
        kind: "job.redispatched",
        jobId: job.id,
        detailJson: JSON.stringify({ devices: more }),
      });
    } else if (running === 0) {
      any.exhausted = true;
      await this.ctx.jobs.batch([this.ctx.jobs.put(current)]);
      this.active.delete(job.id);
      this.ctx.delivery.event({
        kind: "job.dispatch_exhausted",
        jobId: job.id,
        detailJson: JSON.stringify({ succeeded: ok, need: any.need }),
      });
    }
  }
}
