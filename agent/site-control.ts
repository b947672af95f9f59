// Local control at a site gateway (DESIGN.md §11): with the center unreachable, an operator on
// the site's LAN points the CLI at the gateway (`--server mqtts://gw-1:8883`) and runs signed
// jobs on the site's devices. The gateway answers with the controller's own checks
// (broker/rpc-answer.ts: operator signature, time window, nonce; broker/controller/api.ts:
// the signed job), for its own devices only, and serves a small part of the operator API:
// `job.submit`, `jobs.ls/show/cancel`, `device.ls` and what `watch` reads.
//
// It never acknowledges a device's status — the controller does, end to end (§4). It observes
// the statuses of the jobs it ran as they pass, for `jobs show` and `watch`, and hands the jobs
// to the center at its next sync (SyncRequest.site_jobs, origin `site`); only then, once the
// center has recorded them, do the site's statuses go up (agent/gateway.ts holds them until
// then), so none of them arrives for a job the center does not know.
import type { KeyObject } from "node:crypto";
import type { AbstractSublevel } from "abstract-level";
import type { Logger } from "pino";
import { checkSignedJob } from "../broker/controller/api.js";
import { applyStatus, newAssignment } from "../broker/controller/job-state.js";
import type { Assignment, JobRecord } from "../broker/controller/store.js";
import { jobSummary, jobView } from "../broker/controller/views.js";
import { answerRpc } from "../broker/rpc-answer.js";
import type { Counters } from "../common/counters.js";
import {
  ApiError,
  api,
  cursor,
  fillPage,
  formatIssues,
  type Method,
  type ParsedParams,
  RpcErrorCode,
} from "../proto/api.js";
import { encodeEnvelope } from "../proto/envelope.js";
import {
  isLostWrite,
  pb,
  type SiteJob,
  type StatusBatch,
  stateName,
  TERMINAL_STATES,
} from "../proto/index.js";
import { matchesSelector, parseSelector, SelectorError } from "../proto/selector.js";
import { deviceTopic, eventsTopic } from "../proto/topics.js";
import type { Db } from "./store.js";

export interface SiteOperatorRecord {
  username: string;
  passwordHash: string;
  keyId: string;
  /** Unused at a gateway (the key is one the agent trusts); there for the gate's config type. */
  publicKey: string;
}

interface StoredSiteJob {
  record: JobRecord;
  /** The SignedJob bytes, base64. */
  signed: string;
  /** The center recorded it (its SyncResponse to the sync that carried it came back). */
  registered: boolean;
}

export interface SiteDeviceView {
  id: string;
  labels: Record<string, string>;
  online: boolean;
  agentVersion: string;
  lastSeen?: number;
}

export interface SiteControlOptions {
  gatewayId: string;
  prefix: string;
  maxPayloadBytes: number;
  db: Db;
  log: Logger;
  counters: Counters;
  /** The operator keys this agent was flashed to trust, by key id. */
  trustedKeys: ReadonlyMap<string, KeyObject>;
  /** Whether the center is reachable (then jobs are run there, not here). */
  centerReachable(): boolean;
  /** The site's devices now. */
  devices(): Iterable<SiteDeviceView>;
  /** Publishes on the gateway's own broker (to the site's devices and LAN operators). */
  publish(topic: string, payload: Uint8Array): void;
}

type Sub<V> = AbstractSublevel<Db, string | Buffer | Uint8Array, string, V>;
type Handler = (params: unknown, operator: string) => Promise<unknown>;

/** Jobs run at the gateway and kept after the center recorded them (for `jobs ls` there). */
const KEEP_REGISTERED = 200;

export class SiteControl {
  /** Who may log in at the gateway (BrokerGate reads this array; changed in place). */
  readonly operators: SiteOperatorRecord[] = [];
  private readonly jobs = new Map<string, StoredSiteJob>();
  private readonly views = new Map<string, Map<string, Assignment>>();
  private readonly nonces = new Map<string, number>();
  private readonly store: Sub<StoredSiteJob>;
  private readonly meta: Sub<SiteOperatorRecord[]>;
  private readonly nonceStore: Sub<number>;
  private readonly handlers: Partial<Record<Method, Handler>>;
  private readonly listeners = new Set<(payload: Uint8Array) => void>();

  constructor(private readonly opts: SiteControlOptions) {
    this.store = opts.db.sublevel<string, StoredSiteJob>("sitejobs", {
      valueEncoding: "json",
    }) as Sub<StoredSiteJob>;
    this.meta = opts.db.sublevel<string, SiteOperatorRecord[]>("siteops", {
      valueEncoding: "json",
    }) as Sub<SiteOperatorRecord[]>;
    this.nonceStore = opts.db.sublevel<string, number>("sitenonces", {
      valueEncoding: "json",
    }) as Sub<number>;
    this.handlers = this.api();
  }

  async load(): Promise<void> {
    for await (const j of this.store.values()) this.jobs.set(j.record.id, j);
    for await (const [n, exp] of this.nonceStore.iterator()) this.nonces.set(n, exp);
    this.operators.splice(0, this.operators.length, ...((await this.meta.get("operators")) ?? []));
  }

  /** The center's list of operators (with every full credentials list). */
  async setOperators(ops: SiteOperatorRecord[]): Promise<void> {
    await this.meta.put("operators", ops, { sync: true } as never);
    this.operators.splice(0, this.operators.length, ...ops);
  }

  get pendingJobs(): number {
    return [...this.jobs.values()].filter((j) => !j.registered).length;
  }

  /** The jobs the center has not recorded yet, for the gateway's next SyncRequest. */
  toRegister(): SiteJob[] {
    return [...this.jobs.values()]
      .filter((j) => !j.registered)
      .map((j) => ({
        job: pb.SignedJob.decode(Buffer.from(j.signed, "base64")),
        deviceIds: j.record.devices,
        operator: j.record.createdBy,
        createdAtMs: j.record.createdAt,
        ...(j.record.cancelled ? { cancelled: j.record.cancelled.reason } : {}),
      }));
  }

  /** The center answered the sync that carried `ids`: they are its now. */
  async registered(ids: readonly string[]): Promise<void> {
    const ops: Array<{ type: "put"; key: string; value: StoredSiteJob } | { type: "del"; key: string }> = [];
    for (const id of ids) {
      const j = this.jobs.get(id);
      if (!j || j.registered) continue;
      j.registered = true;
      ops.push({ type: "put", key: id, value: j });
    }
    // The oldest recorded ones are forgotten here (the center keeps them).
    const done = [...this.jobs.values()].filter((j) => j.registered);
    for (const j of done.slice(0, Math.max(0, done.length - KEEP_REGISTERED))) {
      this.jobs.delete(j.record.id);
      this.views.delete(j.record.id);
      ops.push({ type: "del", key: j.record.id });
    }
    if (ops.length) await this.store.batch(ops as never, { sync: true } as never);
    if (ids.length) this.opts.log.info({ jobs: ids.length }, "the center recorded the jobs run at this site");
  }

  /** A device's statuses as they pass (not acknowledged here): the jobs run at this gateway. */
  observe(deviceId: string, batch: StatusBatch): void {
    const now = Date.now();
    for (const s of batch.statuses ?? []) {
      const jobId = s.jobId ?? "";
      const job = this.jobs.get(jobId);
      const a = job && this.views.get(jobId)?.get(deviceId);
      if (!job || !a || isLostWrite(s)) continue; // a lost-write record only fills its seq
      applyStatus(a, s, now);
      this.event({ kind: "task.status", deviceId, jobId, status: s, atMs: now });
    }
  }

  /**
   * What a (re)connecting device should hold of the jobs run here, for a SyncResponse made at
   * the gateway while the center is unreachable.
   */
  assignmentsFor(deviceId: string) {
    const out = [];
    for (const j of this.jobs.values()) {
      const a = this.views.get(j.record.id)?.get(deviceId);
      if (!a || j.record.cancelled || TERMINAL_STATES.has(a.state)) continue;
      out.push({ job: pb.SignedJob.decode(Buffer.from(j.signed, "base64")), deviceId });
    }
    return out;
  }

  /** An operator's request on the gateway's rpc/req topic. */
  onRpc(payload: Buffer): Promise<void> {
    const o = this.opts;
    const names = new Map(this.operators.map((op) => [op.keyId, op.username]));
    const keys = new Map([...o.trustedKeys].filter(([id]) => names.has(id)));
    return answerRpc(
      {
        prefix: o.prefix,
        maxPayloadBytes: o.maxPayloadBytes,
        keys,
        operatorOf: (keyId) => names.get(keyId) ?? "?",
        claimNonce: (nonce, expiresAt) => this.claimNonce(nonce, expiresAt),
        handler: (method) => this.handlers[method as Method],
        publish: (topic, reply) => o.publish(topic, reply),
        counters: o.counters,
        log: o.log,
        drop: (reason, detail) => {
          o.counters.inc(`dropped_${reason}`);
          o.log.warn({ reason, detail }, "dropped a payload");
        },
      },
      payload,
    );
  }

  /**
   * Nonces are kept until their request's window has passed, in LevelDB too (a restarted
   * gateway must not take a request again); claimed in memory before the first await.
   */
  private async claimNonce(nonce: string, expiresAt: number): Promise<boolean> {
    const now = Date.now();
    if (this.nonces.has(nonce)) return false;
    this.nonces.set(nonce, expiresAt);
    if ((await this.nonceStore.get(nonce)) !== undefined) return false;
    const expired = [...this.nonces].filter(([, exp]) => exp < now).map(([n]) => n);
    for (const n of expired) this.nonces.delete(n);
    await this.nonceStore.batch(
      [
        { type: "put", key: nonce, value: expiresAt },
        ...expired.map((n) => ({ type: "del" as const, key: n })),
      ] as never,
      { sync: true } as never,
    );
    return true;
  }

  private api(): Partial<Record<Method, Handler>> {
    const o = this.opts;
    const budget = Math.max(o.maxPayloadBytes / 2, o.maxPayloadBytes - 16 * 1024);
    const notFound = (what: string) => new ApiError(`no ${what} at this gateway`, RpcErrorCode.RPC_NOT_FOUND);
    const view = (id: string, page: { limit: number; cursor?: string }) => {
      const j = this.jobs.get(id);
      if (!j) throw notFound(`job ${id}`);
      const v = jobView(j.record, [...(this.views.get(id)?.values() ?? [])], {
        limit: page.limit,
        after: cursor.decode(page.cursor),
        budget,
      });
      return { ...v, ...(v.next !== undefined ? { next: cursor.encode(v.next) } : {}) };
    };
    const handlers: { [M in Method]?: (p: ParsedParams<M>, operator: string) => Promise<unknown> } = {
      "job.submit": async (p, operator) => {
        if (o.centerReachable())
          throw new ApiError(
            "the center is reachable: run jobs there (a gateway takes jobs only while its uplink is down)",
          );
        if (p.any) throw new ApiError("--any is not served by a gateway; run it at the center");
        const keys = new Map(
          [...o.trustedKeys].filter(([id]) => this.operators.some((op) => op.keyId === id)),
        );
        const { record, signed } = checkSignedJob(p.signedJob, operator, keys, o.maxPayloadBytes);
        if (this.jobs.has(record.id)) throw new ApiError(`job ${record.id} already exists`);
        const { deviceIds, selector } = record.target;
        if (p.deviceIds.join(",") !== deviceIds.join(",") || p.selector !== selector)
          throw new ApiError("targets in the request differ from the signed job's target");
        const site = new Map([...o.devices()].map((d) => [d.id, d]));
        if (deviceIds.length) {
          const other = deviceIds.filter((d) => !site.has(d));
          if (other.length)
            throw new ApiError(`not a device of this gateway's site: ${other.slice(0, 20).join(", ")}`);
          record.devices = [...new Set(deviceIds)];
        } else if (selector) {
          const sel = parseSel(selector);
          record.devices = [...site.values()].filter((d) => matchesSelector(sel, d.labels)).map((d) => d.id);
          if (!record.devices.length)
            throw new ApiError(`no device of this site matches selector "${selector}"`);
        } else throw new ApiError("job has no target (device ids or selector)");
        record.origin = "site";
        record.site = o.gatewayId;
        const stored: StoredSiteJob = {
          record,
          signed: Buffer.from(signed).toString("base64"),
          registered: false,
        };
        await this.store.put(record.id, stored, { sync: true } as never);
        this.jobs.set(record.id, stored);
        const now = Date.now();
        this.views.set(record.id, new Map(record.devices.map((d) => [d, newAssignment(record.id, d, now)])));
        const job = pb.SignedJob.decode(signed);
        for (const d of record.devices)
          o.publish(deviceTopic(o.prefix, d, "job"), encodeEnvelope({ jobAssignment: { job, deviceId: d } }));
        o.counters.inc("gateway_site_jobs_run");
        o.log.info(
          { jobId: record.id, devices: record.devices.length, operator },
          "a LAN operator ran a job",
        );
        this.event({ kind: "job.created", jobId: record.id, atMs: now });
        return view(record.id, { limit: 0 });
      },
      "jobs.ls": async (p) => {
        const after = cursor.decode(p.cursor);
        const list = [...this.jobs.values()]
          .map((j) => j.record)
          .filter((r) => !p.device || r.devices.includes(p.device))
          .sort((a, b) => b.id.localeCompare(a.id))
          .filter((r) => after === undefined || r.id < after);
        return fillPage(list, {
          limit: p.limit,
          budget,
          json: (r) => jobSummary(r, [...(this.views.get(r.id)?.values() ?? [])]),
          key: (r) => r.id,
        });
      },
      "jobs.show": async (p) => view(p.id, p),
      "jobs.cancel": async (p) => {
        const j = this.jobs.get(p.id);
        if (!j) throw notFound(`job ${p.id}`);
        if (!j.record.cancelled) {
          j.record.cancelled = { reason: p.reason, at: Date.now() };
          await this.store.put(p.id, j, { sync: true } as never);
          for (const d of j.record.devices)
            o.publish(
              deviceTopic(o.prefix, d, "ctl"),
              encodeEnvelope({ cancel: { jobId: p.id, reason: p.reason } }),
            );
        }
        return view(p.id, { limit: 0 });
      },
      "device.ls": async (p) => {
        const sel = p.selector ? parseSel(p.selector) : undefined;
        const after = cursor.decode(p.cursor);
        const list = [...o.devices()]
          .filter((d) => (!sel || matchesSelector(sel, d.labels)) && (after === undefined || d.id > after))
          .sort((a, b) => a.id.localeCompare(b.id));
        return fillPage(list, {
          limit: p.limit,
          budget,
          json: (d) => ({
            id: d.id,
            online: d.online,
            labels: d.labels,
            agentVersion: d.agentVersion,
            lastSeen: d.lastSeen ? new Date(d.lastSeen).toISOString() : null,
            via: o.gatewayId,
          }),
          key: (d) => d.id,
        });
      },
      // `watch` lists active rollouts first: a gateway runs none.
      "rollout.ls": async () => ({ items: [] }),
      "device.show": async (p) => {
        const d = [...o.devices()].find((x) => x.id === p.id);
        if (!d) throw notFound(`device ${p.id}`);
        const jobs = [...this.jobs.values()]
          .filter((j) => j.record.devices.includes(d.id))
          .map((j) => ({
            jobId: j.record.id,
            state: stateName(this.views.get(j.record.id)?.get(d.id)?.state ?? 0),
          }));
        return {
          id: d.id,
          online: d.online,
          labels: d.labels,
          agentVersion: d.agentVersion,
          lastSeen: null,
          via: o.gatewayId,
          queueDepth: 0,
          facts: {},
          jobs,
          moreJobs: false,
        };
      },
    };
    return handlers as Partial<Record<Method, Handler>>;
  }

  private event(e: {
    kind: string;
    deviceId?: string;
    jobId?: string;
    status?: NonNullable<StatusBatch["statuses"]>[number];
    atMs: number;
  }): void {
    const payload = encodeEnvelope({ fleetEvent: e });
    this.opts.publish(eventsTopic(this.opts.prefix), payload);
    for (const l of this.listeners) l(payload);
  }

  /** The gateway's events (its dashboard's live pages); returns an unsubscribe. */
  onEvent(listener: (payload: Uint8Array) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  /** One API call in process (the gateway's dashboard), with the same params schema. */
  async call(method: Method, params: unknown, operator: string): Promise<unknown> {
    const handler = this.handlers[method];
    if (!handler) throw new ApiError(`${method} is not served by a gateway`, RpcErrorCode.RPC_NOT_FOUND);
    const parsed = api[method].params.safeParse(params);
    if (!parsed.success) throw new ApiError(formatIssues(parsed.error));
    return handler(parsed.data, operator);
  }
}

function parseSel(s: string) {
  try {
    return parseSelector(s);
  } catch (err) {
    if (err instanceof SelectorError) throw new ApiError(err.message);
    throw err;
  }
}
