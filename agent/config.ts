import { readFileSync } from "node:fs";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { z } from "zod";
import { bullets, formatIssues } from "../common/issues.js";
import { DEFAULT_MAX_PAYLOAD } from "../proto/envelope.js";
import { DEFAULT_PREFIX, DEVICE_ID_RE } from "../proto/topics.js";

export const CONFIG_RELATIVE_PATH = "etc/fleet-agent/config.json";

const brokerUrl = z.string().refine((u) => {
  try {
    return ["mqtt:", "mqtts:", "tcp:", "tls:", "ws:", "wss:"].includes(new URL(u).protocol);
  } catch {
    return false;
  }
}, "must be an mqtt://, mqtts://, ws:// or wss:// URL");

export const agentConfigSchema = z
  .object({
    deviceId: z.string().regex(DEVICE_ID_RE, "must match [A-Za-z0-9._-]{1,64}"),
    brokers: z.array(brokerUrl).min(1, "needs at least one broker URL"),
    username: z.string().optional(),
    password: z.string().optional(),
    cert: z.string().optional(),
    key: z.string().optional(),
    caCert: z.string().optional(),
    trustedKeys: z
      .array(z.object({ keyId: z.string().min(1), publicKey: z.string().min(1) }))
      .min(1, "needs at least one operator public key"),
    labels: z.record(z.string(), z.string()).default({}),
    dataDir: z.string().default("var/lib/fleet-agent"),
    /** The chunk cache's bound (chunked artifacts, DESIGN.md §11); current and previous releases stay. */
    chunkCacheBytes: z
      .number()
      .int()
      .min(0)
      .default(1024 * 1024 * 1024),
    allowShell: z.array(z.string().refine(isAbsolute, "must be an absolute path")).default([]),
    /** Where config, backup and software-update may touch (relative to the root); unset: anywhere. */
    allowPaths: z.array(z.string().min(1)).optional(),
    /** Task types this agent runs; default: every built-in type. */
    allowTaskTypes: z.array(z.string()).optional(),
    telemetryIntervalS: z.number().min(0).default(60),
    topicPrefix: z.string().default(DEFAULT_PREFIX),
    maxConcurrency: z.number().int().min(1).default(2),
    typeConcurrency: z.record(z.string(), z.number().int().min(1)).default({}),
    outputLimitBytes: z
      .number()
      .int()
      .min(256)
      .default(64 * 1024),
    maxPayloadBytes: z.number().int().min(1024).default(DEFAULT_MAX_PAYLOAD),
    /**
     * Statuses committed within this many ms go out in one batch, and a task's unsent
     * non-terminal status is replaced by its successor (outbox.ts); 0 sends every change.
     */
    statusFlushMs: z.number().int().min(0).max(1000).default(20),
    reconnect: z
      .object({
        minMs: z.number().min(10).default(1000),
        maxMs: z.number().min(10).default(60_000),
        /** On a fallback broker (the center, the gateway being gone): try the first again after. */
        preferFirstAfterS: z.number().min(0).default(300),
      })
      .default({ minMs: 1000, maxMs: 60_000, preferFirstAfterS: 300 }),
    /** The server's HTTP URL, for software artifacts. */
    artifactsUrl: z.string().url().optional(),
    /** How the `reboot` task (and updates that need one) reboot the machine. */
    rebootCommand: z.array(z.string()).min(1).default(["/bin/systemctl", "reboot"]),
    /** Reboots are only logged and "boot" means agent start (tests, demos, simulations). */
    systemDryRun: z.boolean().default(false),
    /** This agent is its site's gateway (DESIGN.md §11): an embedded broker for the site. */
    gateway: z
      .object({
        port: z.number().int().min(0).max(65535).default(8883),
        bind: z.string().default("0.0.0.0"),
        cert: z.string(),
        key: z.string(),
        /** The site's dashboard (HTTPS with the gateway's certificate; 0 = none). */
        dashboardPort: z.number().int().min(0).max(65535).default(8443),
        /** What the site may queue for the uplink while it is down (telemetry dropped first). */
        queueBytes: z
          .number()
          .int()
          .min(64 * 1024)
          .default(64 * 1024 * 1024),
      })
      .strict()
      .optional(),
    /**
     * Serving update chunks to the site's peers (DESIGN.md §11): HTTPS with the device's
     * fleet-CA certificate, only to devices whose certificate names the same site.
     */
    peer: z
      .object({
        port: z.number().int().min(0).max(65535).default(8445),
        bind: z.string().default("0.0.0.0"),
        /** How peers reach it (default: the first non-internal IPv4 address, else 127.0.0.1). */
        host: z.string().optional(),
        cert: z.string(),
        key: z.string(),
        /** At most this many chunk uploads at once, and this many bytes a second (0 = no cap). */
        maxUploads: z.number().int().min(1).default(8),
        uploadBytesPerSecond: z.number().int().min(0).default(0),
      })
      .strict()
      .optional(),
    /** Seconds a job's issued_at may be ahead of a trusted device clock. */
    maxClockSkewS: z.number().min(0).default(600),
    /** The longest validity (expiry - issue) of a job this device accepts (M14). */
    maxJobLifetimeDays: z.number().min(1).default(400),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.username !== undefined && c.username !== c.deviceId) {
      ctx.addIssue({ code: "custom", path: ["username"], message: "must equal deviceId" });
    }
    if (!c.password && !(c.cert && c.key)) {
      ctx.addIssue({
        code: "custom",
        path: ["password"],
        message: "needs a password, or cert and key for mTLS",
      });
    }
    if (c.reconnect.maxMs < c.reconnect.minMs) {
      ctx.addIssue({ code: "custom", path: ["reconnect", "maxMs"], message: "must be >= reconnect.minMs" });
    }
  });

export type AgentConfigInput = z.input<typeof agentConfigSchema>;
export type AgentConfig = z.output<typeof agentConfigSchema> & { root: string };

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly problems: string[],
  ) {
    super(`invalid agent config ${file}:\n${bullets(problems)}`);
    this.name = "ConfigError";
  }
}

/** Problems as an indented list, one per line. */
export function parseAgentConfig(raw: unknown, root: string, file = "<config>"): AgentConfig {
  const r = agentConfigSchema.safeParse(raw);
  if (!r.success) throw new ConfigError(file, formatIssues(r.error.issues));
  return { ...r.data, root: resolve(root) };
}

/** `--root DIR` reads DIR/etc/fleet-agent/config.json; `--config FILE` uses FILE's directory as root. */
export function loadAgentConfig(opts: { root?: string; config?: string }): AgentConfig {
  const file = opts.config
    ? resolve(opts.config)
    : opts.root
      ? join(resolve(opts.root), CONFIG_RELATIVE_PATH)
      : undefined;
  if (!file) throw new ConfigError("(none)", ["give --root DIR or --config FILE"]);
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(file, [`cannot read: ${(err as Error).message}`]);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(file, [`not valid JSON: ${(err as Error).message}`]);
  }
  return parseAgentConfig(raw, opts.root ?? dirname(file), file);
}

/** Resolves a config path (relative to the agent root). */
export function rootPath(cfg: Pick<AgentConfig, "root">, p: string): string {
  return isAbsolute(p) ? p : join(cfg.root, p);
}
