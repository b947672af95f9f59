// Device registry: identities, labels, token hashes, presence. Held in memory (the broker's
// authentication reads it on every CONNECT) and written through to LevelDB; presence and
// last-seen changes are flushed in one batch per interval, not one write per message.

import { ApiError } from "../../proto/api.js";
import type { DeviceState } from "../../proto/index.js";
import { type LabelRequirement, matchesSelector } from "../../proto/selector.js";
import { DEVICE_ID_RE } from "../../proto/topics.js";
import { mosquittoHash, newToken, tokenHash, tokenMatches } from "../credentials.js";
import type { ControllerStore, DeviceRecord } from "./store.js";

/** Client ids we use ourselves; a device may not take them (no session takeover). */
export const RESERVED_PREFIXES = ["op-", "fleet-"];

export function checkDeviceId(id: string): void {
  if (!DEVICE_ID_RE.test(id) || id === "." || id === "..")
    throw new ApiError(`device id "${id}" must match [A-Za-z0-9._-]{1,64} and not be . or ..`);
  if (RESERVED_PREFIXES.some((p) => id.startsWith(p))) {
    throw new ApiError(`device id "${id}" uses a reserved prefix (${RESERVED_PREFIXES.join(", ")})`);
  }
}

export function deviceJson(
  d: Pick<DeviceRecord, "id" | "online" | "labels" | "agentVersion" | "lastSeen" | "via" | "gateway">,
) {
  return {
    id: d.id,
    online: d.online,
    labels: d.labels,
    agentVersion: d.agentVersion,
    lastSeen: d.lastSeen ? new Date(d.lastSeen).toISOString() : null,
    ...(d.via ? { via: d.via } : {}),
    ...(d.gateway ? { gateway: d.gateway } : {}),
  };
}

export class Registry {
  private readonly devices = new Map<string, DeviceRecord>();
  private readonly dirty = new Set<string>();
  /** Device ids in order, for paging; rebuilt after a device is added or removed. */
  private sorted: string[] | undefined;

  constructor(private readonly store: ControllerStore) {}

  async load(): Promise<void> {
    for await (const d of this.store.devices.values()) {
      // Presence is re-learned from retained DeviceState after a restart.
      this.devices.set(d.id, { ...d, online: false });
    }
  }

  get size(): number {
    return this.devices.size;
  }

  get(id: string): DeviceRecord | undefined {
    return this.devices.get(id);
  }

  all(): IterableIterator<DeviceRecord> {
    return this.devices.values();
  }

  /**
   * Devices in id order after `after` (exclusive) that match `reqs`, lazily: a page reads
   * only as far as it needs.
   */
  *ordered(reqs: readonly LabelRequirement[] | undefined, after?: string): Generator<DeviceRecord> {
    this.sorted ??= [...this.devices.keys()].sort();
    const ids = this.sorted;
    let lo = 0;
    if (after !== undefined) {
      let hi = ids.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (ids[mid]! <= after) lo = mid + 1;
        else hi = mid;
      }
    }
    for (let i = lo; i < ids.length; i++) {
      const d = this.devices.get(ids[i]!);
      if (d && (!reqs || matchesSelector(reqs, d.labels))) yield d;
    }
  }

  select(reqs: readonly LabelRequirement[] | undefined): DeviceRecord[] {
    const all = [...this.all()];
    return reqs ? all.filter((d) => matchesSelector(reqs, d.labels)) : all;
  }

  /** Records the one client certificate this device may use from now on (others are revoked). */
  async setCert(id: string, serial: string): Promise<void> {
    const d = this.devices.get(id);
    if (!d) return;
    d.certSerials = [serial.toUpperCase()];
    await this.store.batch([this.store.put(this.store.devices, id, d)]);
    await this.mirror?.put([d]);
    this.onCredentials?.([d], false);
  }

  /** A client certificate's serial is this device's current one. */
  certAllowed(id: string, serial: string | undefined): boolean {
    const d = this.devices.get(id);
    return Boolean(d && serial && d.certSerials?.includes(serial.toUpperCase()));
  }

  verifyToken(id: string, password: string | Buffer | undefined): boolean {
    const d = this.devices.get(id);
    return Boolean(d?.tokenHash && password && tokenMatches(password, d.tokenHash));
  }

  /** Registers a device (or, with `rotate`, issues a new secret); the secret is returned once. */
  async add(
    id: string,
    labels: Record<string, string>,
    rotate = false,
    site: { via?: string; gateway?: { hosts: string[]; port: number } } = {},
  ): Promise<{ device: DeviceRecord; token: string }> {
    const [made] = await this.addMany([{ id, labels, ...site }], rotate);
    return { device: this.devices.get(id)!, token: made!.password };
  }

  /** Registers (or re-keys) many devices in one batch; secrets are returned once. */
  async addMany(
    list: ReadonlyArray<{
      id: string;
      labels: Record<string, string>;
      via?: string;
      gateway?: { hosts: string[]; port: number };
    }>,
    rotate: boolean,
  ): Promise<Array<{ id: string; username: string; password: string }>> {
    const out: Array<{ id: string; username: string; password: string }> = [];
    const ops = [];
    const made: DeviceRecord[] = [];
    for (const { id, labels, via, gateway } of list) {
      checkDeviceId(id);
      if (via !== undefined && !this.devices.get(via)?.gateway)
        throw new ApiError(`${via} is not a gateway (flash it with --gateway first)`);
      const existing = this.devices.get(id);
      if (existing && !rotate) throw new ApiError(`device ${id} already exists`);
      const token = newToken();
      const secret = { tokenHash: tokenHash(token), brokerHash: mosquittoHash(token) };
      const site = { ...(via ? { via } : {}), ...(gateway ? { gateway } : {}) };
      const device: DeviceRecord = existing
        ? { ...existing, labels: { ...existing.labels, ...labels }, ...secret, certSerials: [], ...site }
        : {
            id,
            labels,
            ...secret,
            ...site,
            createdAt: Date.now(),
            lastSeen: 0,
            online: false,
            agentVersion: "",
            queueDepth: 0,
          };
      ops.push(this.store.put(this.store.devices, id, device));
      made.push(device);
      out.push({ id, username: id, password: token });
    }
    await this.store.batch(ops);
    for (const d of made) {
      if (!this.devices.has(d.id)) this.sorted = undefined;
      this.devices.set(d.id, d);
    }
    await this.mirror?.put(made);
    this.onCredentials?.(made, false);
    return out;
  }

  async remove(id: string): Promise<boolean> {
    const gone = this.devices.get(id);
    if (!gone) return false;
    await this.store.batch([this.store.del(this.store.devices, id), this.store.del(this.store.seqs, id)]);
    this.devices.delete(id);
    this.onCredentials?.([gone], true);
    this.sorted = undefined;
    this.dirty.delete(id);
    await this.mirror?.del(id);
    this.onRemoved?.(id);
    return true;
  }

  /** A copy of the credentials elsewhere (the cluster's Redis), kept in step with every change. */
  mirror: { put(devices: DeviceRecord[]): Promise<void>; del(id: string): Promise<void> } | undefined;

  /** Called when a device's facts were refused (too large, too deep, not an object). */
  onBadFacts: ((id: string) => void) | undefined;

  /** A device's credentials changed or it was removed (its gateway is told). */
  onCredentials: ((devices: DeviceRecord[], removed: boolean) => void) | undefined;

  /** The devices that connect through gateway `id`. */
  behind(id: string): DeviceRecord[] {
    return [...this.devices.values()].filter((d) => d.via === id);
  }

  /** Called after a device is removed (the embedded broker disconnects it). */
  onRemoved: ((id: string) => void) | undefined;

  /** Applies a retained DeviceState; returns the presence change, if any. */
  observeState(id: string, s: DeviceState, now: number): "online" | "offline" | undefined {
    const d = this.devices.get(id);
    if (!d) return undefined;
    const was = d.online;
    d.online = Boolean(s.online);
    if (s.online) {
      d.agentVersion = (s.agentVersion ?? d.agentVersion).slice(0, 64);
      d.queueDepth = Math.max(0, Math.min(Number(s.queueDepth ?? 0) || 0, 1e9));
      // Kept for gateways only (a few per site): what they relay is what /metrics shows of them.
      if (d.gateway && s.counters)
        d.counters = Object.fromEntries(
          Object.entries(s.counters)
            .slice(0, 200)
            .map(([k, v]) => [k.slice(0, 64), Number(v) || 0]),
        );
      if (typeof s.peerUrl === "string") d.peerUrl = s.peerUrl.slice(0, 256) || undefined;
      if (s.artifactsHeld) d.artifactsHeld = s.artifactsHeld.slice(0, 64).map((a) => a.slice(0, 140));
      if (s.factsJson) {
        const facts = boundedFacts(s.factsJson);
        if (facts) d.facts = facts;
        else this.onBadFacts?.(id);
      }
    }
    d.lastSeen = now;
    this.dirty.add(id);
    return was === d.online ? undefined : d.online ? "online" : "offline";
  }

  /**
   * The tracker (DESIGN.md §11): online devices of `deviceId`'s site (same `site` label) that
   * serve chunks, holders of `artifact` (name@version) first, then holders of another version
   * of it (their chunks may be shared); at most `max`.
   */
  peersFor(deviceId: string, artifact: string, max = 16) {
    const me = this.devices.get(deviceId);
    const site = me?.labels.site;
    if (!site) return [];
    const name = artifact.split("@")[0];
    const exact: DeviceRecord[] = [];
    const related: DeviceRecord[] = [];
    for (const d of this.devices.values()) {
      if (d.id === deviceId || !d.online || !d.peerUrl || d.labels.site !== site) continue;
      if (d.artifactsHeld?.includes(artifact)) exact.push(d);
      else if (d.artifactsHeld?.some((a) => a.split("@")[0] === name)) related.push(d);
    }
    // The downloading agent picks among them at random (agent/peers.ts).
    return [...exact, ...related].slice(0, max).map((d) => ({
      id: d.id,
      url: d.peerUrl!,
      holds: d.artifactsHeld?.includes(artifact) ?? false,
      gateway: Boolean(d.gateway) || d.id === me?.via,
    }));
  }

  seen(id: string, now: number): void {
    const d = this.devices.get(id);
    if (!d) return;
    d.lastSeen = now;
    this.dirty.add(id);
  }

  async flush(): Promise<void> {
    if (!this.dirty.size) return;
    const ops = [...this.dirty].flatMap((id) => {
      const d = this.devices.get(id);
      return d ? [this.store.put(this.store.devices, id, d)] : [];
    });
    this.dirty.clear();
    await this.store.batch(ops, false);
  }
}

const MAX_FACTS_BYTES = 32 * 1024;
const MAX_FACTS_DEPTH = 6;

/**
 * A device's facts as it reported them, if they are a JSON object of at most 32 KiB and six
 * levels (M2): the registry keeps them in memory and writes them to LevelDB, so a device must
 * not be able to make them large or deep.
 */
export function boundedFacts(json: string): Record<string, unknown> | undefined {
  if (json.length > MAX_FACTS_BYTES) return undefined;
  let v: unknown;
  try {
    v = JSON.parse(json);
  } catch {
    return undefined;
  }
  const depth = (x: unknown, d: number): boolean =>
    d <= MAX_FACTS_DEPTH &&
    (typeof x !== "object" || x === null || Object.values(x).every((y) => depth(y, d + 1)));
  if (typeof v !== "object" || v === null || Array.isArray(v) || !depth(v, 1)) return undefined;
  return v as Record<string, unknown>;
}
