// MQTT topic layout (DESIGN.md §3, a public contract).
export const DEFAULT_PREFIX = "fleet/v1";
export const DEVICE_ID_RE = /^[A-Za-z0-9._-]{1,64}$/;

export type DeviceChannel = "job" | "ctl" | "status" | "state" | "telemetry" | "sync";

export function deviceTopic(prefix: string, deviceId: string, channel: DeviceChannel): string {
  return `${prefix}/d/${deviceId}/${channel}`;
}

/** Parses `{prefix}/d/{id}/{channel}`; undefined for anything else. */
export function parseDeviceTopic(
  prefix: string,
  topic: string,
): { deviceId: string; channel: string } | undefined {
  if (!topic.startsWith(`${prefix}/d/`)) return undefined;
  const rest = topic.slice(prefix.length + 3).split("/");
  if (rest.length !== 2 || !rest[0] || !rest[1]) return undefined;
  return { deviceId: rest[0], channel: rest[1] };
}

export const rpcRequestTopic = (prefix: string) => `${prefix}/rpc/req`;
/**
 * Replies to an operator: under the operator's name (of the key that signed the request), so a
 * broker's ACL can give each operator only its own replies (Mosquitto: `rpc/res/<user>/#`).
 */
export const rpcResponseTopic = (prefix: string, operator: string, clientId: string) =>
  `${prefix}/rpc/res/${operator}/${clientId}`;
export const eventsTopic = (prefix: string) => `${prefix}/events`;
