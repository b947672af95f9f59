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

describe("ACL for a site gateway", () => {
  const gw = { kind: "device", id: "gw-1" } as const;
  const behind = (g: string, d: string) => g === "gw-1" && (d === "dev-1" || d === "dev-2");
  it("acts for exactly the devices behind it, on their device topics", () => {
    expect(canPublish(gw, "fleet/v1", "fleet/v1/d/dev-1/status", behind)).toBe(true);
    expect(canPublish(gw, "fleet/v1", "fleet/v1/d/dev-1/state", behind)).toBe(true);
    expect(canSubscribe(gw, "fleet/v1", "fleet/v1/d/dev-2/job", behind)).toBe(true);
    expect(canPublish(gw, "fleet/v1", "fleet/v1/d/dev-9/status", behind)).toBe(false);
    expect(canSubscribe(gw, "fleet/v1", "fleet/v1/d/dev-9/ctl", behind)).toBe(false);
    expect(canSubscribe(gw, "fleet/v1", "fleet/v1/d/+/job", behind)).toBe(false);
    expect(canPublish(gw, "fleet/v1", "fleet/v1/d/dev-1/job", behind)).toBe(false); // never the center's side
    // A device behind it gains nothing over the gateway or its neighbours.
    expect(canPublish({ kind: "device", id: "dev-1" }, "fleet/v1", "fleet/v1/d/dev-2/status", behind)).toBe(
      false,
    );
  });
});
