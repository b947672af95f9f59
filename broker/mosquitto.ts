// `fleet acl export --format mosquitto`: the files that make Mosquitto enforce what the embedded
// broker enforces (DESIGN.md §3 and §9) when the fleet server runs with --external-broker.
//
//   password_file  one `user:$7$...` line per device, operator and the controller (PBKDF2-SHA512,
//                  as mosquitto_passwd writes; hashes are made when a secret is issued)
//   acl_file       `pattern` lines with %u for devices, `user` sections for the controller and
//                  the operators
//   fleet.conf     a listener snippet with absolute paths to both (include it or copy from it)
//
// Mosquitto re-reads both files on SIGHUP, so adding a device is: `fleet device add`, re-export,
// `kill -HUP $(pidof mosquitto)`.
import { join } from "node:path";
import { writeFileAtomic } from "../common/files.js";
import type { ServerConfig } from "./config.js";
import { mosquittoHash } from "./credentials.js";

export interface MosquittoExport {
  passwordFile: string;
  aclFile: string;
  maxPayloadBytes: number;
  /** Accounts that could not be exported (no PBKDF2 hash on record), with the reason. */
  skipped: Array<{ username: string; reason: string }>;
  devices: number;
}

export function mosquittoExport(
  config: ServerConfig,
  devices: Iterable<{ id: string; brokerHash?: string }>,
  now = new Date(),
): MosquittoExport {
  const p = config.prefix;
  const pw: string[] = [`${config.controller.username}:${mosquittoHash(config.controller.password)}`];
  const skipped: MosquittoExport["skipped"] = [];
  const acl: string[] = [
    `# EdgeFleet ACL for Mosquitto, written by \`fleet acl export\` at ${now.toISOString()}.`,
    "# Equivalent to the embedded broker's ACL (DESIGN.md §3). Re-export and SIGHUP after changes.",
    "",
    "# Every device (username = device id): publish its status, state, telemetry and sync;",
    "# receive its jobs and control messages. Nothing else.",
    ...["status", "state", "telemetry", "sync"].map((t) => `pattern write ${p}/d/%u/${t}`),
    ...["job", "ctl"].map((t) => `pattern read ${p}/d/%u/${t}`),
    "",
    "# The controller",
    `user ${config.controller.username}`,
    `topic readwrite ${p}/#`,
  ];
  for (const op of config.operators) {
    acl.push(
      "",
      `# Operator ${op.username}: signed RPC requests, replies, events, device state/telemetry/status`,
      `user ${op.username}`,
      `topic write ${p}/rpc/req`,
      `topic read ${p}/rpc/res/${op.username}/#`,
      `topic read ${p}/events`,
      ...["state", "telemetry", "status"].map((t) => `topic read ${p}/d/+/${t}`),
    );
    if (op.brokerHash) pw.push(`${op.username}:${op.brokerHash}`);
    else
      skipped.push({
        username: op.username,
        reason: "no PBKDF2 hash: made by a fleet init older than `fleet acl export`",
      });
  }
  let n = 0;
  for (const d of devices) {
    if (d.brokerHash) {
      pw.push(`${d.id}:${d.brokerHash}`);
      n++;
    } else
      skipped.push({
        username: d.id,
        reason: "no PBKDF2 hash: rotate its secret (fleet device add --rotate)",
      });
  }
  return {
    passwordFile: `${pw.join("\n")}\n`,
    aclFile: `${acl.join("\n")}\n`,
    skipped,
    devices: n,
    maxPayloadBytes: config.limits.maxPayloadBytes,
  };
}

/** A Mosquitto configuration snippet for the exported files in `dir`. */
export function mosquittoConf(dir: string, maxPayloadBytes: number, port = 1883): string {
  return [
    "# EdgeFleet: Mosquitto listener for devices, operators and the controller (fleet acl export).",
    `listener ${port}`,
    "allow_anonymous false",
    `password_file ${join(dir, "password_file")}`,
    `acl_file ${join(dir, "acl_file")}`,
    "persistence true",
    "# Queue QoS 1 jobs for offline devices (persistent sessions); the packet limit is EdgeFleet's",
    "# payload limit plus room for the topic. password_file must be readable by the mosquitto user.",
    `max_packet_size ${maxPayloadBytes + 1024}`,
    "max_queued_messages 10000",
    "",
  ].join("\n");
}

/** Writes the three files into `dir` (secrets 0600). */
export function writeMosquittoExport(dir: string, e: MosquittoExport): string[] {
  const files = [join(dir, "password_file"), join(dir, "acl_file"), join(dir, "fleet.conf")];
  writeFileAtomic(files[0]!, e.passwordFile, 0o600);
  writeFileAtomic(files[1]!, e.aclFile, 0o644);
  writeFileAtomic(files[2]!, mosquittoConf(dir, e.maxPayloadBytes), 0o644);
  return files;
}
