// The fleet server's data directory (`fleet init` writes it; `fleet server` reads it).
//
//   D/server.json     controller credentials, operator accounts, limits        (0600)
//   D/operator.json   the operator context for the CLI (DESIGN.md §7)          (0600)
//   D/operator.key    the operator's ed25519 signing key                        (0600)
//   D/tls/            fleet CA and server certificate (keys 0600)
//   D/db/             the controller's LevelDB
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { bullets, formatIssues } from "../common/issues.js";
import { DEFAULT_PREFIX } from "../proto/topics.js";

export const serverConfigSchema = z
  .object({
    prefix: z.string().default(DEFAULT_PREFIX),
    controller: z.object({
      username: z.string(),
      password: z.string(),
      /**
       * The controller's MQTT client id: random, so that on a broker that does not tie client
       * ids to users (Mosquitto) no client can take over its session (H8). Older data
       * directories have none and use the username.
       */
      clientId: z.string().optional(),
    }),
    operators: z
      .array(
        z.object({
          username: z.string(),
          passwordHash: z.string(),
          keyId: z.string(),
          publicKey: z.string(),
          /** Mosquitto `$7$` hash of the password, for `fleet acl export`. */
          brokerHash: z.string().optional(),
        }),
      )
      .min(1),
    historyRetentionDays: z.number().min(1).default(30),
    /** /metrics for operators only (HTTP Basic), instead of for whoever reaches the HTTP port. */
    metricsAuth: z.boolean().default(false),
    limits: z
      .object({
        maxConnections: z.number().int().min(1).default(20_000),
        connectsPerSecondPerAddress: z.number().min(1).default(50),
        maxPayloadBytes: z
          .number()
          .int()
          .min(1024)
          .default(256 * 1024),
        /** A connection that has not sent an accepted CONNECT by then is closed. */
        connectTimeoutMs: z.number().int().min(100).default(10_000),
        /**
         * Clients must declare a keepalive of at most this (and not 0): a silent connection is
         * closed after 1.5 times its keepalive, so no socket stays idle for ever.
         */
        maxKeepaliveS: z.number().int().min(1).max(65535).default(600),
        /**
         * The artifact bytes the center serves per second, all devices together (0 = no cap):
         * keeps an update from filling a shared uplink (DESIGN.md §11).
         */
        artifactBytesPerSecond: z.number().int().min(0).default(0),
      })
      .default({
        maxConnections: 20_000,
        connectsPerSecondPerAddress: 50,
        maxPayloadBytes: 256 * 1024,
        connectTimeoutMs: 10_000,
        maxKeepaliveS: 600,
        artifactBytesPerSecond: 0,
      }),
    /** Hosts the server certificate is valid for. */
    hosts: z.array(z.string()).default(["localhost", "127.0.0.1"]),
  })
  .strict();

export type ServerConfig = z.output<typeof serverConfigSchema>;

export const operatorContextSchema = z.object({
  server: z.string(),
  username: z.string(),
  password: z.string(),
  keyId: z.string(),
  signingKey: z.string(),
  caCert: z.string().optional(),
  prefix: z.string().default(DEFAULT_PREFIX),
  /** More operators' public keys that devices flashed from this context trust (besides ours). */
  trustedKeys: z.array(z.object({ keyId: z.string(), publicKey: z.string() })).default([]),
});
export type OperatorContext = z.output<typeof operatorContextSchema>;

export const paths = (dir: string) => ({
  server: join(dir, "server.json"),
  operator: join(dir, "operator.json"),
  caCert: join(dir, "tls", "ca.pem"),
  caKey: join(dir, "tls", "ca.key"),
  serverCert: join(dir, "tls", "server.pem"),
  serverKey: join(dir, "tls", "server.key"),
  db: join(dir, "db"),
  /** Where a running server says it listens (ports chosen at start); removed when it stops. */
  listening: join(dir, "listening.json"),
});

/** What `fleet server` records in listening.json for CLIs using its data directory. */
export const listeningSchema = z.object({
  pid: z.number().int(),
  mqtt: z.string(),
  mqtts: z.string(),
  ws: z.string(),
  http: z.string(),
  https: z.string(),
});

export class BadConfigError extends Error {}

export function readJsonFile<T>(file: string, schema: z.ZodType<T>): T {
  if (!existsSync(file)) throw new BadConfigError(`${file} does not exist`);
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, "utf8"));
  } catch (err) {
    throw new BadConfigError(`${file}: not valid JSON: ${(err as Error).message}`);
  }
  const r = schema.safeParse(raw);
  if (!r.success) throw new BadConfigError(`${file}:\n${bullets(formatIssues(r.error.issues))}`);
  return r.data;
}
