// Where a device's messages enter the controller: topic and body checked, then each kind to
// the part that owns it — StatusBatch and SyncRequest to Delivery, DeviceState to the registry,
// Telemetry to the caller. The controller and the agent integration tests (test/helpers/
// controller.ts) both route device traffic through this one function.
import { decodeEnvelope, PayloadError } from "../../proto/envelope.js";
import type { Telemetry } from "../../proto/index.js";
import { parseDeviceTopic } from "../../proto/topics.js";
import type { Delivery } from "./delivery.js";
import type { Registry } from "./registry.js";

export interface InboxContext {
  prefix: string;
  maxPayloadBytes: number;
  registry: Registry;
  delivery: Delivery;
  onTelemetry(deviceId: string, t: Telemetry): void;
  /** A device came online or went offline (after the registry recorded it). */
  onDeviceChange?(deviceId: string, change: "online" | "offline"): Promise<void>;
  /** After a device's SyncRequest was answered (a gateway then gets its site's credentials). */
  onSync?(deviceId: string): void | Promise<void>;
  /** A payload refused, with a counter name. */
  drop(reason: string, detail: string): void;
  now(): number;
}

const EXPECTED = {
  status: "statusBatch",
  sync: "syncRequest",
  state: "deviceState",
  telemetry: "telemetry",
} as const;

export function deviceInbox(c: InboxContext): (topic: string, payload: Buffer) => Promise<void> {
  return async (topic, payload) => {
    const t = parseDeviceTopic(c.prefix, topic);
    if (!t) return c.drop("unexpected_topic", topic);
    if (t.channel === "state" && payload.length === 0) return; // a cleared retained message
    let env: ReturnType<typeof decodeEnvelope>;
    try {
      env = decodeEnvelope(payload, c.maxPayloadBytes);
    } catch (err) {
      if (err instanceof PayloadError) return c.drop(err.reason, `${topic}: ${err.message}`);
      throw err;
    }
    if (!c.registry.get(t.deviceId)) return c.drop("unknown_device", topic);
    const expected = EXPECTED[t.channel as keyof typeof EXPECTED];
    const siteStatus = env.body === "siteStatus" && t.channel === "status";
    if (env.body !== expected && !siteStatus) return c.drop("unexpected_body", `${env.body} on ${topic}`);
    switch (env.body) {
      case "siteStatus": {
        // A gateway's site: each batch is its device's own, and only for devices behind it.
        const applied: Promise<void>[] = [];
        for (const b of env.siteStatus!.batches ?? []) {
          const id = b.deviceId ?? "";
          if (c.registry.get(id)?.via !== t.deviceId) {
            c.drop("site_status_not_behind", `${t.deviceId} sent statuses for ${id}`);
            continue;
          }
          const s = b.batch ?? {};
          applied.push(
            c.delivery.onStatusBatch(id, s.statuses ?? [], s.epoch ?? "", Number(s.ackedSeq ?? 0)),
          );
        }
        await Promise.all(applied);
        return;
      }
      case "statusBatch":
        return c.delivery.onStatusBatch(
          t.deviceId,
          env.statusBatch!.statuses ?? [],
          env.statusBatch!.epoch ?? "",
          Number(env.statusBatch!.ackedSeq ?? 0),
        );
      case "syncRequest":
        c.registry.seen(t.deviceId, c.now());
        await c.delivery.onSync(t.deviceId);
        return c.onSync?.(t.deviceId);
      case "telemetry":
        return c.onTelemetry(t.deviceId, env.telemetry!);
      case "deviceState": {
        const change = c.registry.observeState(t.deviceId, env.deviceState!, c.now());
        if (!change) return;
        c.delivery.event({ kind: `device.${change}`, deviceId: t.deviceId });
        return c.onDeviceChange?.(t.deviceId, change);
      }
    }
  };
}
