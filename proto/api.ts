// The operator API (DESIGN.md §7, §10): every method's params and result, and the named error
// codes, in one table that the controller (which parses params with it) and the CLI (which
// parses results with it) share. Results are loose objects: a newer server may add fields.
//
// Whatever grows with the fleet is paged: `{limit, cursor}` in, `{items, next}` out (`next`
// absent on the last page). The controller also stops a page early when it would not fit the
// payload limit, so a page can hold fewer than `limit` items; follow `next` until it is absent.
import { z } from "zod";
import { fleet } from "./gen/fleet.js";

export const RpcErrorCode = fleet.v1.RpcErrorCode;
export type RpcErrorCode = fleet.v1.RpcErrorCode;

/** A refused operator request, with a named code (never decoded by number). */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly code: RpcErrorCode = RpcErrorCode.RPC_INVALID,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

export const DEFAULT_PAGE = 500;
export const MAX_PAGE = 5000;

const pageParams = {
  limit: z.number().int().min(1).max(MAX_PAGE).default(DEFAULT_PAGE),
  cursor: z.string().max(512).optional(),
};
const page = <T extends z.ZodType>(item: T) =>
  z.looseObject({ items: z.array(item), next: z.string().optional() });
const id = z.object({ id: z.string().max(256) });
const labels = z.record(z.string(), z.string());

const device = z.looseObject({
  id: z.string(),
  online: z.boolean(),
  labels,
  agentVersion: z.string(),
  lastSeen: z.string().nullable(),
  via: z.string().optional(),
  gateway: z.object({ hosts: z.array(z.string()), port: z.number() }).optional(),
});

const task = z.looseObject({
  id: z.string(),
  type: z.string(),
  state: z.string(),
  attempt: z.number(),
  message: z.string(),
  reason: z.string().optional(),
  output: z.string().optional(),
});

const jobDevice = z.looseObject({
  deviceId: z.string(),
  state: z.string(),
  reason: z.string().optional(),
  message: z.string().optional(),
  tasks: z.array(task),
});

const counts = z.looseObject({
  total: z.number(),
  pending: z.number(),
  running: z.number(),
  succeeded: z.number(),
  failed: z.number(),
  canceled: z.number(),
});

/** A job with one page of its devices (`next` names the following page). */
const job = z.looseObject({
  id: z.string(),
  name: z.string(),
  state: z.string(),
  createdAt: z.string(),
  cancelled: z.string().optional(),
  counts,
  devices: z.array(jobDevice),
  next: z.string().optional(),
});

const jobSummary = z.looseObject({
  id: z.string(),
  name: z.string(),
  state: z.string(),
  createdAt: z.string(),
  devices: z.number(),
  /** "site": run by a LAN operator at a gateway (`site` names it) while the center was away. */
  origin: z.string().optional(),
  site: z.string().optional(),
});

const rollout = z.looseObject({
  id: z.string(),
  jobId: z.string(),
  name: z.string(),
  selector: z.string(),
  state: z.string(),
  reason: z.string().optional(),
  currentWave: z.number(),
  waves: z.array(
    z.looseObject({
      wave: z.number(),
      spec: z.string(),
      devices: z.number(),
      state: z.string(),
      succeeded: z.number(),
      failed: z.number(),
    }),
  ),
  counts: counts.extend({ timedOut: z.number() }),
  failures: z.array(
    z.looseObject({ deviceId: z.string(), state: z.string(), reason: z.string(), message: z.string() }),
  ),
});

/** Events a receiver may subscribe to (DESIGN.md §12). */
export const NOTIFY_EVENTS = [
  "job.succeeded",
  "job.failed",
  "rollout.succeeded",
  "rollout.aborted",
  "rollout.paused",
  "device.online",
  "device.offline",
  "artifact.pushed",
] as const;
export type NotifyEvent = (typeof NOTIFY_EVENTS)[number];

const receiver = z.looseObject({
  name: z.string(),
  /** Credentials in the URL are shown as `***`. */
  url: z.string(),
  events: z.array(z.string()),
  selector: z.string(),
  signed: z.boolean(),
  queued: z.number(),
  lastSuccess: z.string().nullable(),
  lastError: z.string().nullable(),
  delivered: z.number(),
  dropped: z.number(),
});

const auditEntry = z.looseObject({
  seq: z.number(),
  at: z.string(),
  operator: z.string(),
  method: z.string(),
  paramsDigest: z.string(),
  result: z.string(),
  hash: z.string(),
});

const credentials = z.looseObject({ id: z.string(), username: z.string(), password: z.string() });

const method = <P extends z.ZodType, R extends z.ZodType>(params: P, result: R) => ({ params, result });

export const api = {
  "server.info": method(
    z.object({}),
    z.looseObject({
      prefix: z.string(),
      version: z.string(),
      caCert: z.string(),
      http: z.string().optional(),
      https: z.string().optional(),
      maxPayloadBytes: z.number(),
      trustedKeys: z.array(z.object({ keyId: z.string(), publicKey: z.string() })),
    }),
  ),
  "device.add": method(
    z.object({
      id: z.string(),
      labels: labels.default({}),
      rotate: z.boolean().default(false),
      /** The gateway this device connects through. */
      via: z.string().optional(),
      /** This device is a site gateway, reachable at these names and port. */
      gateway: z
        .object({ hosts: z.array(z.string().min(1)).min(1), port: z.number().int().min(1).max(65535) })
        .optional(),
    }),
    credentials,
  ),
  "device.addMany": method(
    z.object({
      // A reply carries a secret per device: 1,000 fit the payload limit with room to spare.
      devices: z
        .array(z.object({ id: z.string(), labels: labels.default({}), via: z.string().optional() }))
        .max(1000),
      rotate: z.boolean().default(true),
    }),
    z.array(credentials),
  ),
  "device.ls": method(z.object({ selector: z.string().optional(), ...pageParams }), page(device)),
  "device.show": method(
    id,
    device.extend({
      queueDepth: z.number(),
      facts: z.record(z.string(), z.unknown()),
      /** The device's newest jobs (at most 100; `fleet jobs ls --device` pages through all). */
      jobs: z.array(z.object({ jobId: z.string(), state: z.string() })),
      moreJobs: z.boolean(),
    }),
  ),
  "device.rm": method(id, z.looseObject({ id: z.string(), removed: z.boolean() })),
  /** A client certificate (CN = id), or with `hosts` a gateway's server certificate for those names. */
  "device.cert": method(
    id.extend({ hosts: z.array(z.string().min(1)).optional() }),
    z.looseObject({ certPem: z.string(), keyPem: z.string(), caPem: z.string() }),
  ),
  "job.submit": method(
    z.object({
      signedJob: z.string(),
      deviceIds: z.array(z.string()).default([]),
      selector: z.string().default(""),
      any: z.number().int().min(1).optional(),
      timeoutS: z.number().min(0).default(0),
    }),
    job,
  ),
  "jobs.ls": method(z.object({ device: z.string().optional(), ...pageParams }), page(jobSummary)),
  /** `limit: 0` gives the job's state and counts without devices. */
  "jobs.show": method(
    id.extend({ ...pageParams, limit: z.number().int().min(0).max(MAX_PAGE).default(DEFAULT_PAGE) }),
    job,
  ),
  "jobs.cancel": method(id.extend({ reason: z.string().default("canceled by operator") }), job),
  "rollout.create": method(
    z.object({
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
    }),
    rollout,
  ),
  /** Newest first; `active` lists only running and paused ones. */
  "rollout.ls": method(z.object({ active: z.boolean().default(false), ...pageParams }), page(rollout)),
  "rollout.show": method(id, rollout),
  "rollout.pause": method(id, rollout),
  "rollout.resume": method(id, rollout),
  "rollout.abort": method(
    id.extend({ reason: z.string().optional(), force: z.boolean().optional() }),
    rollout,
  ),
  "notify.add": method(
    z.object({
      name: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, "a name of letters, digits, . _ -"),
      url: z.string().max(2048),
      events: z.array(z.enum(NOTIFY_EVENTS)).min(1),
      selector: z.string().default(""),
      secret: z.string().max(1024).default(""),
    }),
    receiver,
  ),
  "notify.ls": method(z.object({}), z.array(receiver)),
  "notify.rm": method(
    z.object({ name: z.string() }),
    z.looseObject({ name: z.string(), removed: z.boolean() }),
  ),
  /** Sends a `notify.test` event now and says how the receiver answered. */
  "notify.test": method(
    z.object({ name: z.string() }),
    z.looseObject({
      name: z.string(),
      ok: z.boolean(),
      status: z.number().optional(),
      error: z.string().optional(),
      ms: z.number(),
    }),
  ),
  /** Oldest first, from `since` (ms) on. */
  "audit.ls": method(
    z.object({ since: z.number().optional(), operator: z.string().optional(), ...pageParams }),
    page(auditEntry),
  ),
  /** Recomputes the hash chain; names the first entry that does not fit. */
  "audit.verify": method(
    z.object({}),
    z.looseObject({
      ok: z.boolean(),
      entries: z.number(),
      broken: z.looseObject({ seq: z.number(), reason: z.string() }).optional(),
    }),
  ),
} as const;

export type Api = typeof api;
export type Method = keyof Api;
/** What a caller passes (defaults may be left out). */
export type Params<M extends Method> = z.input<Api[M]["params"]>;
/** What a handler receives (defaults filled in). */
export type ParsedParams<M extends Method> = z.output<Api[M]["params"]>;
export type Result<M extends Method> = z.output<Api[M]["result"]>;

export type DeviceJson = z.output<typeof device>;
export type JobJson = z.output<typeof job>;
export type JobDeviceJson = z.output<typeof jobDevice>;
export type JobSummaryJson = z.output<typeof jobSummary>;
export type RolloutJson = z.output<typeof rollout>;
export type ReceiverJson = z.output<typeof receiver>;
export type AuditEntryJson = z.output<typeof auditEntry>;

export function isMethod(m: string): m is Method {
  return Object.hasOwn(api, m);
}

/** Zod's issues as one line of `path: message` (every problem at once). */
export function formatIssues(err: z.ZodError, root = "params"): string {
  return err.issues.map((i) => `${i.path.join(".") || root}: ${i.message}`).join("; ");
}

/** Cursors are opaque to callers; inside they are a key to continue after. */
export const cursor = {
  encode: (key: string): string => Buffer.from(key, "utf8").toString("base64url"),
  decode: (c: string | undefined): string | undefined => {
    if (c === undefined) return undefined;
    const key = Buffer.from(c, "base64url").toString("utf8");
    if (!key || cursor.encode(key) !== c) throw new ApiError(`bad cursor "${c}"`);
    return key;
  },
};

/**
 * Collects up to `limit` items and no more than `budget` bytes of their JSON (at least one
 * item: a single item too large for a reply is caught when the reply is encoded). `next` is
 * the key of the last item given, when more follow.
 */
export async function fillPage<T, J>(
  source: AsyncIterable<T> | Iterable<T>,
  o: { limit: number; budget: number; json: (t: T) => J | Promise<J>; key: (t: T) => string },
): Promise<{ items: J[]; next?: string }> {
  const items: J[] = [];
  let bytes = 0;
  let last: T | undefined;
  for await (const t of source) {
    if (items.length >= o.limit) return { items, next: cursor.encode(o.key(last!)) };
    const item = await o.json(t);
    bytes += Buffer.byteLength(JSON.stringify(item));
    if (items.length && bytes > o.budget) return { items, next: cursor.encode(o.key(last!)) };
    items.push(item);
    last = t;
  }
  return { items };
}
