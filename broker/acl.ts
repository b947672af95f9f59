// Who may publish and subscribe where (DESIGN.md §3, a contract).
import { DEVICE_ID_RE } from "../proto/topics.js";

export type Identity =
  | { kind: "device"; id: string }
  | { kind: "controller"; id: string }
  | { kind: "operator"; id: string; clientId: string };

const DEVICE_PUBLISH = new Set(["status", "state", "telemetry", "sync"]);
const DEVICE_SUBSCRIBE = new Set(["job", "ctl"]);
const OPERATOR_READ = new Set(["state", "telemetry", "status"]);

function split(prefix: string, topic: string): string[] | undefined {
  if (!topic.startsWith(`${prefix}/`)) return undefined;
  return topic.slice(prefix.length + 1).split("/");
}

/**
 * `behind`: whether a device is behind this gateway device (DESIGN.md §11): a gateway may
 * publish and subscribe on those devices' topics as on its own.
 */
export type Behind = (gatewayId: string, deviceId: string) => boolean;

const mine = (who: { id: string }, id: string, behind?: Behind) =>
  id === who.id || Boolean(behind?.(who.id, id));

export function canPublish(who: Identity, prefix: string, topic: string, behind?: Behind): boolean {
  if (topic.startsWith("$") || topic.includes("+") || topic.includes("#")) return false;
  const parts = split(prefix, topic);
  if (!parts) return false;
  switch (who.kind) {
    case "controller":
      return true;
    case "device":
      return (
        parts.length === 3 &&
        parts[0] === "d" &&
        mine(who, parts[1]!, behind) &&
        DEVICE_PUBLISH.has(parts[2]!)
      );
    case "operator":
      return parts.length === 2 && parts[0] === "rpc" && parts[1] === "req";
  }
}

export function canSubscribe(who: Identity, prefix: string, topic: string, behind?: Behind): boolean {
  if (topic.startsWith("$")) return false;
  const parts = split(prefix, topic);
  if (!parts) return false;
  switch (who.kind) {
    case "controller":
      return true;
    case "device":
      return (
        parts.length === 3 &&
        parts[0] === "d" &&
        mine(who, parts[1]!, behind) &&
        DEVICE_SUBSCRIBE.has(parts[2]!)
      );
    case "operator": {
      if (parts.length === 1 && parts[0] === "events") return true;
      if (
        parts.length === 4 &&
        parts[0] === "rpc" &&
        parts[1] === "res" &&
        parts[2] === who.id &&
        parts[3] === who.clientId
      )
        return true;
      // Device state/telemetry/status of one device or of all (`+`), never `#`.
      return (
        parts.length === 3 &&
        parts[0] === "d" &&
        (parts[1] === "+" || DEVICE_ID_RE.test(parts[1]!)) &&
        OPERATOR_READ.has(parts[2]!)
      );
    }
  }
}
