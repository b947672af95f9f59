// Where a device's messages enter the controller: topic and body checked, then each kind to
// the part that owns it — StatusBatch and SyncRequest to Delivery, DeviceState to the registry,
// Telemetry to the caller. The controller and the agent integration tests (test/helpers/
// controller.ts) both route device traffic through this one function.
import { decodeEnvelope, encodeEnvelope, PayloadError } from "../../proto/envelope.js";
import type { DeviceState, SiteDeviceAck, SiteJob, Telemetry } from "../../proto/index.js";
import { deviceTopic, parseDeviceTopic } from "../../proto/topics.js";
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
  /** A gateway's SyncRequest carries jobs run at its site while the center was unreachable. */
  onSiteJobs?(gatewayId: string, jobs: SiteJob[]): Promise<void>;
  /** After a device's SyncRequest was answered (a gateway then gets its site's credentials). */
  onSync?(deviceId: string): void | Promise<void>;
  publish(topic: string, payload: Uint8Array, qos: 0 | 1, retain?: boolean): void;
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
  /**
   * A device's state, as it published it or in its gateway's SiteStatus (`relayed`: then
   * republished retained on the device's own state topic, where operators' `watch` reads it).
   */
  const observeState = async (deviceId: string, state: DeviceState, relayed: boolean) => {
    if (relayed)
      c.publish(deviceTopic(c.prefix, deviceId, "state"), encodeEnvelope({ deviceState: state }), 1, true);
    const change = c.registry.observeState(deviceId, state, c.now());
    if (!change) return;
    c.delivery.event({ kind: `device.${change}`, deviceId });
    return c.onDeviceChange?.(deviceId, change);
  };
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
        // A gateway's site: each batch and state is its device's own, and only for devices
        // behind it. The acks of the whole message go back to the gateway in one SiteAck.
        const gateway = t.deviceId;
        const behind = (id: string) => {
          if (c.registry.get(id)?.via === gateway) return true;
          c.drop("site_status_not_behind", `${gateway} sent statuses for ${id}`);
          return false;
        };
        const acks: SiteDeviceAck[] = [];
        const applied: Promise<void>[] = [];
        for (const b of env.siteStatus!.batches ?? []) {
          const id = b.deviceId ?? "";
          if (!behind(id)) continue;
          const s = b.batch ?? {};
          applied.push(
            c.delivery.onStatusBatch(id, s.statuses ?? [], s.epoch ?? "", Number(s.ackedSeq ?? 0), (ack) =>
              acks.push({ deviceId: id, ack }),
            ),
          );
        }
        for (const st of env.siteStatus!.states ?? []) {
          const id = st.deviceId ?? "";
          if (st.state && behind(id)) await observeState(id, st.state, true);
        }
        await Promise.all(applied);
        if (acks.length)
          c.publish(deviceTopic(c.prefix, gateway, "ctl"), encodeEnvelope({ siteAck: { acks } }), 1);
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
        // A gateway's jobs run at its site are recorded before its sync is answered: only then
        // does it send its site's statuses for them (DESIGN.md §11).
        if (env.syncRequest!.siteJobs?.length) await c.onSiteJobs?.(t.deviceId, env.syncRequest!.siteJobs);
        await c.delivery.onSync(t.deviceId, Number(env.syncRequest!.requestId ?? 0));
        return c.onSync?.(t.deviceId);
      case "telemetry":
        return c.onTelemetry(t.deviceId, env.telemetry!);
      case "deviceState":
        return observeState(t.deviceId, env.deviceState!, false);
    }
  };
}
