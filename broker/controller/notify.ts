// Notifications (DESIGN.md §12): receivers subscribe to fleet events; each event is queued in
// the controller's LevelDB — in the same batch as the change that caused it, before that
// change is acknowledged anywhere — and POSTed as JSON `{id, event, at, …}` with
// `X-Fleet-Signature: sha256=<HMAC-SHA256 of the body with the receiver's secret>`.
//
// Delivery is at least once (receivers dedupe by `id`): one request in flight per receiver,
// in queue order, each with a timeout, so a slow or hanging receiver delays only itself;
// failures (network, timeout, 408, 429, 5xx) retry with exponential backoff and full jitter
// for up to 24 h, then the notification is dropped and counted. Other 4xx answers are not
// retried. Device events waiting for one receiver are coalesced (up to 1,000 devices per
// request): a site losing power is a few requests, not thousands.
import { createHmac } from "node:crypto";
import type { Logger } from "pino";
import { ulid } from "ulid";
import { backoffDelay } from "../../common/backoff.js";
import type { Counters } from "../../common/counters.js";
import { AGENT_VERSION } from "../../common/version.js";
import { ApiError, type NotifyEvent, RpcErrorCode } from "../../proto/api.js";
import { type LabelRequirement, matchesSelector, parseSelector } from "../../proto/selector.js";
import type { Registry } from "./registry.js";
import type { ControllerStore, Health, Op, QueuedNotification, ReceiverRecord } from "./store.js";

export type { QueuedNotification, ReceiverRecord };

export interface NotifierOptions {
  store: ControllerStore;
  registry: Registry;
  log: Logger;
  counters: Counters;
  now(): number;
  /** Retry backoff (defaults: 1 s growing to 10 min) and how long to keep trying (24 h). */
  retry?: { minMs: number; maxMs: number; giveUpMs: number };
  timeoutMs?: number;
  /** Requests in flight across all receivers. */
  concurrency?: number;
}

const COALESCE_MAX = 1000;
const qkey = (name: string, seq: number) => `${name}!${seq.toString(16).padStart(16, "0")}`;

/** The URL without its credentials, for logs and listings. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (!u.username && !u.password) return url;
    u.username = "***";
    u.password = "";
    return u.toString();
  } catch {
    return "(invalid URL)";
  }
}

export class Notifier {
  private readonly receivers = new Map<string, ReceiverRecord>();
  private readonly health = new Map<string, Health>();
  /** Queued count per receiver, and when its head may be sent. */
  private readonly queued = new Map<string, { count: number; nextAt: number }>();
  private readonly busy = new Set<string>();
  private readonly selectors = new Map<string, LabelRequirement[]>();
  private seq = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private readonly retry: { minMs: number; maxMs: number; giveUpMs: number };

  constructor(private readonly opts: NotifierOptions) {
    this.retry = opts.retry ?? { minMs: 1000, maxMs: 10 * 60_000, giveUpMs: 24 * 3600_000 };
  }

  async open(): Promise<void> {
    for await (const r of this.opts.store.receivers.values()) {
      this.receivers.set(r.name, r);
      this.health.set(r.name, r.health ?? { delivered: 0, dropped: 0 });
    }
    for await (const [k, n] of this.opts.store.notifications.iterator()) {
      const [name, seq] = k.split("!");
      this.seq = Math.max(this.seq, Number.parseInt(seq!, 16));
      const q = this.queued.get(name!) ?? { count: 0, nextAt: n.nextAt };
      q.count++;
      this.queued.set(name!, q);
    }
  }

  start(): void {
    this.stopped = false;
    this.timer = setInterval(() => this.pump(), 250);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
  }

  // ---- receivers ----------------------------------------------------------------------------

  async add(r: Omit<ReceiverRecord, "createdAt">): Promise<ReceiverRecord> {
    let url: URL;
    try {
      url = new URL(r.url);
    } catch {
      throw new ApiError(`not a URL: ${redactUrl(r.url)}`);
    }
    if (url.protocol !== "http:" && url.protocol !== "https:")
      throw new ApiError(`a receiver URL must be http:// or https://, not ${url.protocol}`);
    if (r.selector) {
      try {
        parseSelector(r.selector);
      } catch (err) {
        throw new ApiError((err as Error).message);
      }
    }
    const rec: ReceiverRecord = { ...r, createdAt: this.opts.now(), health: { delivered: 0, dropped: 0 } };
    await this.opts.store.batch([this.opts.store.put(this.opts.store.receivers, r.name, rec)]);
    this.receivers.set(r.name, rec);
    this.health.set(r.name, rec.health!);
    return rec;
  }

  async remove(name: string): Promise<boolean> {
    if (!this.receivers.has(name)) return false;
    const ops: Op[] = [this.opts.store.del(this.opts.store.receivers, name)];
    for await (const k of this.opts.store.notifications.keys({ gt: `${name}!`, lt: `${name}!\xff` }))
      ops.push(this.opts.store.del(this.opts.store.notifications, k));
    await this.opts.store.batch(ops);
    this.receivers.delete(name);
    this.queued.delete(name);
    this.health.delete(name);
    return true;
  }

  list() {
    return [...this.receivers.values()].map((r) => {
      const h = this.health.get(r.name) ?? { delivered: 0, dropped: 0 };
      return {
        name: r.name,
        url: redactUrl(r.url),
        events: r.events,
        selector: r.selector,
        signed: Boolean(r.secret),
        queued: this.queued.get(r.name)?.count ?? 0,
        lastSuccess: h.lastSuccess ? new Date(h.lastSuccess).toISOString() : null,
        lastError: h.lastError ?? null,
        delivered: h.delivered,
        dropped: h.dropped,
      };
    });
  }

  /** Sends a `notify.test` event to one receiver now, outside its queue. */
  async test(
    name: string,
  ): Promise<{ name: string; ok: boolean; status?: number; error?: string; ms: number }> {
    const r = this.receivers.get(name);
    if (!r) throw new ApiError(`no receiver ${name}`, RpcErrorCode.RPC_NOT_FOUND);
    const n: QueuedNotification = {
      id: ulid(),
      event: "notify.test",
      at: this.opts.now(),
      fields: { receiver: name },
      attempts: 0,
      nextAt: 0,
    };
    const started = Date.now();
    const res = await this.post(r, n);
    return {
      name,
      ok: res.ok,
      ...(res.status ? { status: res.status } : {}),
      ...(res.ok ? {} : { error: res.error }),
      ms: Date.now() - started,
    };
  }

  // ---- enqueueing -------------------------------------------------------------------------------

  /** A receiver's selector, parsed once (a site's worth of device events reuse it). */
  private selector(text: string): LabelRequirement[] {
    let parsed = this.selectors.get(text);
    if (!parsed) {
      parsed = parseSelector(text);
      this.selectors.set(text, parsed);
    }
    return parsed;
  }

  /** Whether any receiver subscribes to `event`. */
  wants(event: NotifyEvent): boolean {
    for (const r of this.receivers.values()) if (r.events.includes(event)) return true;
    return false;
  }

  /**
   * The ops that queue `event` for every receiver subscribed to it (device events only for
   * receivers whose selector matches the device): the caller writes them in the batch of the
   * change they report.
   */
  ops(event: NotifyEvent, fields: Record<string, unknown>, deviceId?: string): Op[] {
    const ops: Op[] = [];
    const at = this.opts.now();
    for (const r of this.receivers.values()) {
      if (!r.events.includes(event)) continue;
      if (deviceId && r.selector) {
        const d = this.opts.registry.get(deviceId);
        if (!d || !matchesSelector(this.selector(r.selector), d.labels)) continue;
      }
      const n: QueuedNotification = {
        id: ulid(),
        event,
        at,
        fields,
        attempts: 0,
        nextAt: at,
        ...(deviceId ? { devices: [{ deviceId, at }] } : {}),
      };
      ops.push(this.opts.store.put(this.opts.store.notifications, qkey(r.name, ++this.seq), n));
      const q = this.queued.get(r.name) ?? { count: 0, nextAt: at };
      q.count++;
      this.queued.set(r.name, q);
    }
    return ops;
  }

  /** Queues an event in a batch of its own. */
  async emit(event: NotifyEvent, fields: Record<string, unknown>, deviceId?: string): Promise<void> {
    const ops = this.ops(event, fields, deviceId);
    if (ops.length) await this.opts.store.batch(ops);
  }

  // ---- sending ------------------------------------------------------------------------------------

  private pump(): void {
    if (this.stopped) return;
    const now = this.opts.now();
    const limit = this.opts.concurrency ?? 8;
    for (const [name, q] of this.queued) {
      if (this.busy.size >= limit) return;
      if (this.busy.has(name) || q.count <= 0 || q.nextAt > now) continue;
      this.busy.add(name);
      this.sendHead(name)
        .catch((err) => this.opts.log.error({ err, receiver: name }, "notification delivery failed"))
        .finally(() => this.busy.delete(name));
    }
  }

  private async sendHead(name: string): Promise<void> {
    const { store } = this.opts;
    const r = this.receivers.get(name);
    const q = this.queued.get(name);
    if (!r || !q) return;
    const head = await store.notifications
      .iterator({ gt: `${name}!`, lt: `${name}!\xff`, limit: COALESCE_MAX })
      .all();
    if (!head.length) {
      q.count = 0;
      return;
    }
    const [key, n] = head[0]!;
    // Device events of one kind waiting together go as one request (frozen before the first
    // attempt, so a retry sends the same id with the same devices).
    if (n.devices && n.attempts === 0) {
      // Only the run right behind it: an online between two offlines keeps its place.
      const run: typeof head = [];
      for (const entry of head.slice(1)) {
        const m = entry[1];
        if (m.event !== n.event || !m.devices || m.attempts !== 0 || run.length + 1 >= COALESCE_MAX) break;
        run.push(entry);
      }
      if (run.length) {
        n.devices = [...n.devices, ...run.flatMap(([, m]) => m.devices ?? [])];
        await store.batch([
          store.put(store.notifications, key, n),
          ...run.map(([k]) => store.del(store.notifications, k)),
        ]);
        q.count -= run.length;
      }
    }
    const res = await this.post(r, n);
    if (this.receivers.get(name) !== r) return; // removed or replaced meanwhile
    const h = this.health.get(name) ?? { delivered: 0, dropped: 0 };
    this.health.set(name, h);
    const now = this.opts.now();
    const keepHealth = store.put(store.receivers, name, { ...r, health: h });
    if (res.ok) {
      await store.batch([store.del(store.notifications, key), keepHealth], false);
      h.lastSuccess = now;
      h.delivered++;
      q.count--;
      q.nextAt = now;
      this.opts.counters.inc("notifications_delivered");
      return;
    }
    h.lastError = `${new Date(now).toISOString()} ${res.error}`;
    const expired = now - n.at >= this.retry.giveUpMs;
    if (!res.retry || expired) {
      await store.batch([store.del(store.notifications, key), keepHealth], false);
      h.dropped++;
      q.count--;
      q.nextAt = now;
      this.opts.counters.inc(expired ? "notifications_expired" : "notifications_refused");
      this.opts.log.warn(
        { receiver: name, id: n.id, event: n.event, error: res.error },
        expired
          ? "notification dropped after 24 h of failures"
          : "notification refused by the receiver; not retried",
      );
      return;
    }
    n.attempts++;
    n.nextAt = now + Math.max(this.retry.minMs / 2, backoffDelay(n.attempts, this.retry));
    await store.batch([store.put(store.notifications, key, n), keepHealth], false);
    q.nextAt = n.nextAt;
    this.opts.counters.inc("notifications_retried");
  }

  /** One POST; `retry` says whether a failure is worth trying again. */
  private async post(
    r: ReceiverRecord,
    n: QueuedNotification,
  ): Promise<{ ok: boolean; status?: number; error?: string; retry?: boolean }> {
    const body = JSON.stringify({
      id: n.id,
      event: n.event,
      at: new Date(n.at).toISOString(),
      ...n.fields,
      ...(n.devices
        ? { devices: n.devices.map((d) => ({ deviceId: d.deviceId, at: new Date(d.at).toISOString() })) }
        : {}),
      ...(n.devices?.length === 1 ? { deviceId: n.devices[0]!.deviceId } : {}),
    });
    const url = new URL(r.url);
    const headers: Record<string, string> = {
      "content-type": "application/json",
      "user-agent": `EdgeFleet/${AGENT_VERSION}`,
      "x-fleet-event": n.event,
      "x-fleet-delivery": n.id,
    };
    if (r.secret)
      headers["x-fleet-signature"] = `sha256=${createHmac("sha256", r.secret).update(body).digest("hex")}`;
    if (url.username || url.password) {
      // fetch refuses URLs with credentials: they go as Basic authentication (never logged).
      const user = decodeURIComponent(url.username);
      const pass = decodeURIComponent(url.password);
      headers.authorization = `Basic ${Buffer.from(`${user}:${pass}`).toString("base64")}`;
      url.username = "";
      url.password = "";
    }
    try {
      const res = await fetch(url, {
        method: "POST",
        headers,
        body,
        redirect: "error",
        signal: AbortSignal.timeout(this.opts.timeoutMs ?? 10_000),
      });
      await res.body?.cancel().catch(() => {});
      if (res.ok) return { ok: true, status: res.status };
      const retry = res.status >= 500 || res.status === 408 || res.status === 429;
      return { ok: false, status: res.status, error: `HTTP ${res.status}`, retry };
    } catch (err) {
      const e = err as Error & { cause?: { code?: string; message?: string } };
      const why =
        e.name === "TimeoutError"
          ? "no answer within the timeout"
          : (e.cause?.code ?? e.cause?.message ?? e.message);
      return { ok: false, error: why, retry: true };
    }
  }
}
