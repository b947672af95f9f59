// The controller's side of the operator API (proto/api.ts): one handler per method, each
// given its parsed params. Lists are paged and every page fits the payload limit.
import { X509Certificate } from "node:crypto";
import { ulid } from "ulid";
import { AGENT_VERSION } from "../../common/version.js";
import {
  ApiError,
  cursor,
  fillPage,
  type Method,
  type ParsedParams,
  type Result,
  RpcErrorCode,
} from "../../proto/api.js";
import { encodeEnvelope } from "../../proto/envelope.js";
import { pb, stateName } from "../../proto/index.js";
import { checkGraph } from "../../proto/jobspec.js";
import { parseSelector, SelectorError } from "../../proto/selector.js";
import { verifySignedJob } from "../../proto/signing.js";
import type { ServerConfig } from "../config.js";
import { type CertPair, issueDeviceCert, issueServerCert } from "../pki.js";
import type { AuditLog } from "./audit.js";
import type { Delivery } from "./delivery.js";
import type { WorkQueue } from "./dispatch.js";
import { jobState } from "./job-state.js";
import { type JobStore, jobNames, type NewJob } from "./job-store.js";
import type { Notifier } from "./notify.js";
import { deviceJson, type Registry } from "./registry.js";
import type { Rollouts } from "./rollouts.js";
import type { JobRecord, RolloutRecord } from "./store.js";
import { jobSummary } from "./views.js";

export interface ApiContext {
  config: ServerConfig;
  jobs: JobStore;
  registry: Registry;
  delivery: Delivery;
  rollouts: Rollouts;
  workQueue: WorkQueue;
  notifier: Notifier;
  audit: AuditLog;
  ca: CertPair;
  operatorKeys: Parameters<typeof verifySignedJob>[1];
  httpUrl?: string;
  httpsUrl?: string;
}

export type Handlers = {
  [M in Method]: (params: ParsedParams<M>, operator: string) => Promise<Result<M>>;
};

/** Agents refuse longer-lived jobs by default (maxJobLifetimeDays); so does the controller. */
const MAX_JOB_LIFETIME_MS = 400 * 86_400_000;

/** A device.show lists this many of the device's newest jobs. */
const DEVICE_JOBS = 100;

export function operatorApi(c: ApiContext): Handlers {
  const { registry, jobs, delivery, rollouts } = c;
  const limit = c.config.limits.maxPayloadBytes;
  // What a page's items may take: the rest of the reply (envelope, job header) is small.
  const budget = Math.max(limit / 2, limit - 16 * 1024);

  const selector = (s: string | undefined) => {
    if (!s) return undefined;
    try {
      return parseSelector(s);
    } catch (err) {
      if (err instanceof SelectorError) throw new ApiError(err.message);
      throw err;
    }
  };
  const notFound = (what: string) => new ApiError(`no ${what}`, RpcErrorCode.RPC_NOT_FOUND);
  const job = async (id: string, page: { limit: number; cursor?: string }) => {
    const v = await delivery.view(id, { limit: page.limit, after: cursor.decode(page.cursor), budget });
    if (!v) throw notFound(`job ${id}`);
    return { ...v, ...(v.next !== undefined ? { next: cursor.encode(v.next) } : {}) };
  };
  const rollout = async (r: RolloutRecord | undefined, id: string) => {
    if (!r) throw notFound(`rollout ${id}`);
    return rollouts.view(r);
  };

  /** Checks a signed job from an operator and makes its record (no devices yet). */
  const jobRecord = async (signedJob: string, operator: string): Promise<NewJob> => {
    const newJob = checkSignedJob(signedJob, operator, c.operatorKeys, limit);
    if (await jobs.get(newJob.record.id)) throw new ApiError(`job ${newJob.record.id} already exists`);
    return newJob;
  };

  return {
    "server.info": async () => ({
      prefix: c.config.prefix,
      version: AGENT_VERSION,
      caCert: c.ca.certPem,
      http: c.httpUrl,
      https: c.httpsUrl,
      maxPayloadBytes: limit,
      trustedKeys: c.config.operators.map((op) => ({ keyId: op.keyId, publicKey: op.publicKey })),
    }),
    "device.add": async (p) => {
      const { device, token } = await registry.add(p.id, p.labels, p.rotate, {
        via: p.via,
        gateway: p.gateway,
      });
      return { id: device.id, username: device.id, password: token };
    },
    "device.addMany": async (p) => registry.addMany(p.devices, p.rotate),
    "device.ls": async (p) =>
      fillPage(registry.ordered(selector(p.selector), cursor.decode(p.cursor)), {
        limit: p.limit,
        budget,
        json: deviceJson,
        key: (d) => d.id,
      }),
    "device.show": async (p) => {
      const d = registry.get(p.id);
      if (!d) throw notFound(`device ${p.id}`);
      const asgs = await jobs.ofDevice(d.id, { newestFirst: true, limit: DEVICE_JOBS + 1 });
      return {
        ...deviceJson(d),
        queueDepth: d.queueDepth,
        facts: d.facts ?? {},
        ...(d.counters ? { counters: d.counters } : {}),
        jobs: asgs.slice(0, DEVICE_JOBS).map((a) => ({ jobId: a.jobId, state: stateName(a.state) })),
        moreJobs: asgs.length > DEVICE_JOBS,
      };
    },
    "device.rm": async (p) => {
      if (!(await registry.remove(p.id))) throw notFound(`device ${p.id}`);
      c.delivery.forgetDevice(p.id);
      return { id: p.id, removed: true };
    },
    "device.cert": async (p) => {
      const d = registry.get(p.id);
      if (!d) throw notFound(`device ${p.id}`);
      if (p.hosts) {
        // A gateway's TLS server certificate: its devices check it against the fleet CA.
        if (!d.gateway) throw new ApiError(`${p.id} is not a gateway`);
        return { ...issueServerCert(c.ca, p.hosts), caPem: c.ca.certPem };
      }
      const cert = issueDeviceCert(c.ca, p.id, d.labels.site);
      await registry.setCert(p.id, new X509Certificate(cert.certPem).serialNumber);
      return { ...cert, caPem: c.ca.certPem };
    },
    "job.submit": async (p, operator) => {
      const newJob = await jobRecord(p.signedJob, operator);
      const { record } = newJob;
      const { deviceIds: targetIds, selector: target } = record.target;
      if (p.deviceIds.join(",") !== targetIds.join(",") || p.selector !== target) {
        throw new ApiError("targets in the request differ from the signed job's target");
      }
      if (p.any) {
        if (!target) throw new ApiError("--any needs --selector");
        record.any = { need: p.any, selector: target, timeoutS: p.timeoutS };
        await c.workQueue.create(newJob);
      } else {
        if (targetIds.length) {
          const unknown = targetIds.filter((d) => !registry.get(d));
          if (unknown.length)
            throw new ApiError(
              `unknown device(s): ${unknown.slice(0, 20).join(", ")}${unknown.length > 20 ? `, … (${unknown.length})` : ""}`,
            );
          record.devices = [...new Set(targetIds)];
        } else if (target) {
          record.devices = registry.select(selector(target)).map((d) => d.id);
          if (!record.devices.length) throw new ApiError(`no device matches selector "${target}"`);
        } else throw new ApiError("job has no target (device ids or selector)");
        await delivery.submit(newJob);
      }
      return job(record.id, { limit: 0 });
    },
    "jobs.ls": async (p) => {
      const after = cursor.decode(p.cursor);
      const summary = async (j: JobRecord) => jobSummary(j, await jobs.ofJob(j));
      if (!p.device) {
        return fillPage(jobs.all({ newestFirst: true, before: after }), {
          limit: p.limit,
          budget,
          json: summary,
          key: (j) => j.id,
        });
      }
      // A device's jobs: its assignments, newest job first.
      const device = p.device;
      async function* deviceJobs() {
        for await (const id of jobs.deviceJobIds(device, after)) {
          const j = await jobs.get(id);
          if (j) yield j;
        }
      }
      return fillPage(deviceJobs(), { limit: p.limit, budget, json: summary, key: (j) => j.id });
    },
    "jobs.show": async (p) => job(p.id, p),
    "jobs.cancel": async (p) => {
      if (!(await delivery.cancel(p.id, p.reason))) throw notFound(`job ${p.id}`);
      return job(p.id, { limit: 0 });
    },
    "rollout.create": async (p, operator) => {
      selector(p.selector);
      const newJob = await jobRecord(p.signedJob, operator);
      const { record } = newJob;
      if (record.target.selector !== p.selector || record.target.deviceIds.length) {
        throw new ApiError("the signed job must target the rollout's selector (and no device ids)");
      }
      record.rolloutId = ulid();
      return rollouts.view(await rollouts.create(newJob, p));
    },
    "rollout.ls": async (p) => {
      const after = cursor.decode(p.cursor);
      return fillPage(rollouts.newestFirst(p.active, after), {
        limit: p.limit,
        budget,
        json: (r) => rollouts.view(r),
        key: (r) => r.id,
      });
    },
    "rollout.show": async (p) => rollout(await rollouts.get(p.id), p.id),
    "rollout.pause": async (p) => rollouts.view(await rollouts.setState(p.id, "pause")),
    "rollout.resume": async (p) => rollouts.view(await rollouts.setState(p.id, "resume")),
    "rollout.abort": async (p) =>
      rollouts.view(await rollouts.setState(p.id, "abort", p.reason ?? "aborted by operator", p.force)),
    "notify.add": async (p, operator) => {
      await c.notifier.add({ ...p, createdBy: operator });
      return c.notifier.list().find((r) => r.name === p.name)!;
    },
    "notify.ls": async () => c.notifier.list(),
    "notify.rm": async (p) => {
      if (!(await c.notifier.remove(p.name))) throw notFound(`receiver ${p.name}`);
      return { name: p.name, removed: true };
    },
    "notify.test": async (p) => c.notifier.test(p.name),
    "audit.ls": async (p) => {
      const after = cursor.decode(p.cursor);
      return fillPage(
        c.audit.entries({ after: after ? Number(after) : undefined, since: p.since, operator: p.operator }),
        {
          limit: p.limit,
          budget,
          json: (e) => ({
            seq: e.seq,
            at: new Date(e.at).toISOString(),
            operator: e.operator,
            method: e.method,
            paramsDigest: e.paramsDigest,
            result: e.result,
            hash: e.hash,
          }),
          key: (e) => String(e.seq),
        },
      );
    },
    "audit.verify": async () => c.audit.verify(),
  };
}

/**
 * A signed job from an operator, checked and made into its record (no devices yet): it fits an
 * assignment under the payload limit, its signature verifies, its id is a ULID, its task graph
 * is sound and its lifetime within bounds. The controller and a site gateway (DESIGN.md §11)
 * both take jobs through this.
 */
export function checkSignedJob(
  signedJob: string,
  operator: string,
  keys: Parameters<typeof verifySignedJob>[1],
  limit: number,
  now = Date.now(),
): NewJob {
  const bytes = Buffer.from(signedJob, "base64");
  let signed: ReturnType<typeof pb.SignedJob.decode>;
  try {
    signed = pb.SignedJob.decode(bytes); // decoded once: sized, verified, stored as bytes
  } catch (err) {
    throw new ApiError(`not a signed job: ${(err as Error).message}`);
  }
  // A device must be able to receive it: the assignment has to fit the payload limit.
  const size = encodeEnvelope({ jobAssignment: { job: signed, deviceId: "x".repeat(64) } }).length;
  if (size > limit)
    throw new ApiError(
      `the signed job is ${size} bytes as an assignment, over the payload limit of ${limit} bytes`,
      RpcErrorCode.RPC_TOO_LARGE,
    );
  const v = verifySignedJob(signed, keys);
  if (!v.ok) throw new ApiError(`job signature: ${v.message}`);
  const spec = v.spec;
  if (!/^[0-9A-HJKMNP-TV-Z]{26}$/.test(spec.jobId)) throw new ApiError("job id must be a ULID");
  const graph = checkGraph(spec.tasks);
  if (graph) throw new ApiError(graph.message);
  if (spec.expiresAtMs <= now) throw new ApiError("job has already expired");
  if (spec.expiresAtMs - spec.issuedAtMs > MAX_JOB_LIFETIME_MS)
    throw new ApiError(
      `job is valid for more than ${MAX_JOB_LIFETIME_MS / 86_400_000} days (devices refuse it: maxJobLifetimeDays)`,
    );
  const record: JobRecord = {
    id: spec.jobId,
    name: spec.name || spec.tasks.map((t) => t.type).join("+"),
    names: jobNames(spec),
    createdAt: now,
    expiresAt: spec.expiresAtMs,
    recurring: Boolean(spec.schedule?.cron),
    tasks: spec.tasks.map((t) => ({ id: t.id, type: t.type })),
    target: { deviceIds: spec.target?.deviceIds ?? [], selector: spec.target?.selector ?? "" },
    devices: [],
    createdBy: operator,
  };
  return { record, signed: bytes };
}
