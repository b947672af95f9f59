import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ulid } from "ulid";
import type { AgentConfig, AgentConfigInput } from "../../agent/config.js";
import { parseAgentConfig } from "../../agent/config.js";
import { type JobSpec, type SignedJob, type TaskSpec, Trigger } from "../../proto/index.js";
import { generateSigningKey, signJob } from "../../proto/signing.js";

export const operator = generateSigningKey();

export function tempDir(prefix = "fleet-test-"): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export function agentConfig(
  root: string,
  deviceId: string,
  brokers: string[],
  over: Partial<AgentConfigInput> = {},
): AgentConfig {
  return parseAgentConfig(
    {
      deviceId,
      brokers,
      password: "test-secret",
      trustedKeys: [{ keyId: operator.keyId, publicKey: operator.publicKeyPem }],
      telemetryIntervalS: 0,
      reconnect: { minMs: 50, maxMs: 500 },
      ...over,
    },
    root,
  );
}

export type TaskInput = Omit<TaskSpec, "paramsJson" | "trigger"> & {
  params?: unknown;
  trigger?: "all_success" | "all_done" | "one_failed";
};

/** A JobSpec with sane defaults (issued now, expires in an hour). */
export function jobSpec(tasks: TaskInput[], over: Partial<JobSpec> = {}): JobSpec {
  const now = Date.now();
  return {
    jobId: ulid(),
    name: "test",
    issuedAtMs: now,
    expiresAtMs: now + 3600_000,
    tasks: tasks.map(({ params, trigger, ...t }) => ({
      ...t,
      paramsJson: JSON.stringify(params ?? {}),
      trigger:
        trigger === "all_done"
          ? Trigger.TRIGGER_ALL_DONE
          : trigger === "one_failed"
            ? Trigger.TRIGGER_ONE_FAILED
            : Trigger.TRIGGER_ALL_SUCCESS,
    })),
    ...over,
  };
}

export function sign(spec: JobSpec): SignedJob {
  return signJob(spec, operator.privateKeyPem, operator.keyId);
}
