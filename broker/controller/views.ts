// What the operator API shows of jobs: one module turning records into the typed API's
// result shapes (proto/api.ts), so every caller (RPC, dashboard, CLI) sees the same view.
import { stateName, TaskState } from "../../proto/index.js";
import { jobState, tally } from "./job-state.js";
import type { Assignment, JobRecord } from "./store.js";

export function assignmentJson(a: Assignment, job?: JobRecord) {
  const order = job?.tasks.map((t) => t.id) ?? Object.keys(a.tasks);
  return {
    deviceId: a.deviceId,
    state: stateName(a.state),
    ...(a.reason ? { reason: a.reason } : {}),
    ...(a.message ? { message: a.message } : {}),
    tasks: order.map((id) => {
      const t = a.tasks[id];
      return {
        id,
        type: t?.type ?? job?.tasks.find((x) => x.id === id)?.type ?? "",
        state: stateName(t?.state ?? TaskState.TASK_STATE_UNSPECIFIED),
        attempt: t?.attempt ?? 0,
        message: t?.message ?? "",
        ...(t?.reason ? { reason: t.reason } : {}),
        ...(t?.output ? { output: t.output } : {}),
        ...(t?.bytesBySource ? { bytesBySource: t.bytesBySource } : {}),
      };
    }),
  };
}

/** How many of a job's devices are where (a summary that stays small at any fleet size). */
export function jobCounts(job: JobRecord, asgs: readonly Assignment[]) {
  return { total: job.devices.length, ...tally(asgs) };
}

/**
 * A job with one page of its devices: those after device `after` (in assignment order), at
 * most `limit`, and no more than `budget` bytes of JSON (at least one). `next` names the last
 * device given when more follow.
 */
export function jobView(
  job: JobRecord,
  asgs: readonly Assignment[],
  page: { limit: number; after?: string; budget: number },
) {
  const byDevice = new Map(asgs.map((a) => [a.deviceId, a]));
  const start = page.after === undefined ? 0 : job.devices.indexOf(page.after) + 1;
  const devices: Array<ReturnType<typeof assignmentJson> & { outputOmitted?: boolean }> = [];
  let bytes = 0;
  let next: string | undefined;
  for (let i = start; i < job.devices.length && page.limit > 0; i++) {
    const a = byDevice.get(job.devices[i]!);
    if (!a) continue;
    let item: ReturnType<typeof assignmentJson> & { outputOmitted?: boolean } = assignmentJson(a, job);
    let size = Buffer.byteLength(JSON.stringify(item));
    if (size > page.budget) {
      // One device's task outputs alone would not fit a reply: leave them out, say so.
      item = { ...item, tasks: item.tasks.map(({ output: _, ...t }) => t), outputOmitted: true };
      size = Buffer.byteLength(JSON.stringify(item));
    }
    bytes += size;
    if (devices.length && (devices.length >= page.limit || bytes > page.budget)) {
      next = devices.at(-1)!.deviceId;
      break;
    }
    devices.push(item);
  }
  return {
    id: job.id,
    name: job.name,
    state: jobState(job, asgs),
    createdAt: new Date(job.createdAt).toISOString(),
    ...(job.cancelled ? { cancelled: job.cancelled.reason } : {}),
    ...(job.rolloutId ? { rolloutId: job.rolloutId } : {}),
    ...(job.origin ? { origin: job.origin, site: job.site } : {}),
    counts: jobCounts(job, asgs),
    devices,
    ...(next !== undefined ? { next } : {}),
  };
}

/** A job in a list: its state and size, not its devices. */
export function jobSummary(job: JobRecord, asgs: readonly Assignment[]) {
  return {
    id: job.id,
    name: job.name,
    state: jobState(job, asgs),
    createdAt: new Date(job.createdAt).toISOString(),
    devices: job.devices.length,
    ...(job.origin ? { origin: job.origin, site: job.site } : {}),
  };
}
