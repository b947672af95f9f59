// The task handler contract (DESIGN.md §5): one file per task type exports a TaskHandler.
import type { KeyObject } from "node:crypto";
import type { Logger } from "pino";
import type { z } from "zod";

import type { FactValue } from "../proto/jobspec.js";

export type { FactValue };

/** The agent's durable key-value store, as handlers see it. */
export interface KeyValue {
  get<T = unknown>(key: string): Promise<T | undefined>;
  put(key: string, value: unknown): Promise<void>;
  del(key: string): Promise<void>;
}

export interface TaskPolicy {
  /** Absolute paths of executables the `shell` task may run. */
  allowShell: readonly string[];
  /** Output kept per task run, in bytes (the tail is kept). */
  outputLimitBytes: number;
  /**
   * Where `config`, `backup` and `software-update` may touch, as paths relative to the agent's
   * root; undefined: anywhere under the root. The device owner's choice (agent config `allowPaths`).
   */
  allowPaths?: readonly string[];
}

/** What a task may do to the machine itself; injectable so that tests run it dry. */
export interface SystemPort {
  /** Identifies this boot (a dry-run system: this agent process). */
  bootId(): Promise<string>;
  /** Asks the machine to reboot; the agent is expected to be stopped by it. */
  reboot(): Promise<void>;
}

/** Where software comes from: the server's artifact store, with the device's credentials. */
export type ByteSource = "local" | "peers" | "gateway" | "center";

export interface ArtifactSource {
  /** The signed manifest (serialized SignedManifest) of name@version. */
  manifest(name: string, version: string, signal: AbortSignal): Promise<Uint8Array>;
  /** The blob from byte `start` on; the body is read by the caller. */
  blob(
    sha256: string,
    start: number,
    signal: AbortSignal,
  ): Promise<{ status: number; body: AsyncIterable<Uint8Array> }>;
  /**
   * One chunk of a chunked artifact (DESIGN.md §11), from the nearest source that has it — the
   * local cache, the site's peers, the gateway, the center — verified against `sha256` and
   * `size` (from the signed manifest) before it is returned or cached.
   */
  chunk?(
    c: { sha256: string; size: number },
    signal: AbortSignal,
    artifact: string,
  ): Promise<{ data: Buffer; source: ByteSource }>;
  /** Peers that served a bad chunk during this artifact's download (dropped, to be reported). */
  droppedPeers?(artifact: string): string[];
  /** A release was installed: its chunks stay cached (current and previous release) and are shared. */
  installed?(artifact: string, version: string, chunks: readonly string[]): Promise<void>;
  /** Uploads a local file (a backup) to the server's store for this device. */
  upload(file: string, name: string, sha256: string, signal: AbortSignal): Promise<void>;
}

export interface TaskContext {
  jobId: string;
  taskId: string;
  executionId: string;
  attempt: number;
  /** The agent's root; paths in params are resolved under it. */
  root: string;
  /** The agent's data directory (absolute); handlers keep files under their own subdirectory. */
  dataDir: string;
  /** A directory for this run only; removed after the run. */
  scratchDir: string;
  facts: Readonly<Record<string, FactValue>>;
  kv: KeyValue;
  log: Logger;
  policy: TaskPolicy;
  system: SystemPort;
  artifacts: ArtifactSource;
  /** Operator keys this agent trusts (job and manifest signatures). */
  trustedKeys: ReadonlyMap<string, KeyObject>;
  /** True when a resumable task continues after an agent restart. */
  resumed: boolean;
  /** The agent's trusted time (never below its durable floor; not the raw wall clock). */
  now(): number;
  progress(percent: number, message?: string): void;
}

export interface TaskResult {
  message?: string;
  output?: string;
  /** An update's bytes by where they came from: local, peers, gateway, center (DESIGN.md §11). */
  bytesBySource?: Record<string, number>;
  /** Peers that served bad chunks during this task (dropped; reported to the center). */
  droppedPeers?: string[];
}

export interface TaskHandler<P = unknown> {
  type: string;
  paramsSchema: z.ZodType<P>;
  /** Safe to run again after a crash mid-run (DESIGN.md §4.5). */
  idempotent: boolean;
  /**
   * Continues after a crash or restart from the state it saved in ctx.kv (same attempt):
   * a reboot, a software update. Takes precedence over `idempotent` in crash recovery.
   */
  resumable?: boolean;
  /** False for handlers that never touch ctx.scratchDir: no directory is made for them. */
  scratch?: boolean;
  /** Extra checks at accept time against the device's policy; returns a problem or undefined. */
  check?(params: P, policy: TaskPolicy): string | undefined;
  run(ctx: TaskContext, params: P, signal: AbortSignal): Promise<TaskResult | undefined>;
}

export function defineHandler<P>(h: TaskHandler<P>): TaskHandler<unknown> {
  return h as TaskHandler<unknown>;
}
