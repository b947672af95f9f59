import { describe, expect, it } from "vitest";
import { canPublish, canSubscribe, type Identity } from "../../broker/acl.js";
import { deviceTopic } from "../../proto/topics.js";

const P = "fleet/v1";
const dev: Identity = { kind: "device", id: "a" };
const op: Identity = { kind: "operator", id: "admin", clientId: "op-admin-1" };
const ctl: Identity = { kind: "controller", id: "fleet-controller" };

describe("ACL", () => {
  it("a device publishes exactly what the agent publishes, on its own topics only", () => {
    for (const ch of ["status", "state", "telemetry", "sync"] as const) {
      expect(canPublish(dev, P, deviceTopic(P, "a", ch))).toBe(true);
      expect(canPublish(dev, P, deviceTopic(P, "b", ch))).toBe(false);
    }
    for (const ch of ["job", "ctl"] as const) {
      expect(canPublish(dev, P, deviceTopic(P, "a", ch))).toBe(false);
      expect(canSubscribe(dev, P, deviceTopic(P, "a", ch))).toBe(true);
      expect(canSubscribe(dev, P, deviceTopic(P, "b", ch))).toBe(false);
    }
    for (const t of [
      "#",
      `${P}/#`,
      `${P}/d/+/job`,
      `${P}/d/a/#`,
      "$SYS/#",
      `${P}/rpc/req`,
      `${P}/events`,
      `${P}/d/a/+`,
    ]) {
      expect(canSubscribe(dev, P, t), t).toBe(false);
    }
  });

  it("an operator sends RPC, reads its own responses, events and device state/telemetry/status", () => {
    expect(canPublish(op, P, `${P}/rpc/req`)).toBe(true);
    expect(canPublish(op, P, deviceTopic(P, "a", "job"))).toBe(false);
    expect(canSubscribe(op, P, `${P}/rpc/res/admin/op-admin-1`)).toBe(true);
    expect(canSubscribe(op, P, `${P}/rpc/res/admin/op-admin-2`)).toBe(false);
    expect(canSubscribe(op, P, `${P}/rpc/res/eve/op-admin-1`)).toBe(false);
    expect(canSubscribe(op, P, `${P}/rpc/res/op-admin-1`)).toBe(false);
    expect(canSubscribe(op, P, `${P}/events`)).toBe(true);
    expect(canSubscribe(op, P, `${P}/d/+/state`)).toBe(true);
    expect(canSubscribe(op, P, `${P}/d/a/telemetry`)).toBe(true);
    expect(canSubscribe(op, P, `${P}/d/+/job`)).toBe(false);
    expect(canSubscribe(op, P, `${P}/d/#`)).toBe(false);
    expect(canSubscribe(op, P, "$SYS/#")).toBe(false);
  });

  it("only the controller writes to job/ctl, and nobody publishes wildcards", () => {
    expect(canPublish(ctl, P, deviceTopic(P, "a", "job"))).toBe(true);
    expect(canPublish(ctl, P, `${P}/d/+/job`)).toBe(false);
    expect(canPublish(ctl, P, "other/topic")).toBe(false);
  });
});
