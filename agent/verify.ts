// Acceptance checks for an incoming job (DESIGN.md §5). Each rejection has a machine-readable
// reason that ends up in the REJECTED status.
import type { KeyObject } from "node:crypto";
import type { TaskHandler, TaskPolicy } from "../firmware-tasks/types.js";
import type { DecodedJobSpec, JobAssignment } from "../proto/index.js";
import { checkGraph } from "../proto/jobspec.js";
import { matchesSelector, parseSelector, SelectorError } from "../proto/selector.js";
import { type SignatureCheck, type VerifiedSignatures, verifySignedJob } from "../proto/signing.js";
import type { TrustedClock } from "./clock.js";
import { cronProblem } from "./cron.js";
import { REQUIREMENT_OPS } from "./facts.js";

export type RejectReason =
  | "unsigned"
  | "unknown_key"
  | "bad_signature"
  | "malformed"
  | "no_expiry"
  | "expired"
  | "lifetime_too_long"
  | "issued_in_future"
  | "wrong_target"
  | "id_reused"
  | "duplicate_task_id"
  | "unknown_dependency"
  | "dependency_cycle"
  | "unknown_task_type"
  | "task_type_not_allowed"
  | "invalid_params"
  | "invalid_schedule";

export type Spec = DecodedJobSpec;

export type Verdict =
  | { ok: true; spec: Spec; params: Map<string, unknown> }
  | { ok: false; reason: RejectReason; message: string };

export interface VerifyContext {
  deviceId: string;
  labels: Readonly<Record<string, string>>;
  trustedKeys: ReadonlyMap<string, KeyObject>;
  clock: TrustedClock;
  maxSkewMs: number;
  /** The longest a signed job may be valid (expires_at - issued_at). */
  maxLifetimeMs: number;
  /** Jobs expiring at or before this were forgotten (compacted): refused, they may have run. */
  forgottenUpTo: number;
  handlers: ReadonlyMap<string, TaskHandler>;
  allowTaskTypes?: readonly string[];
  policy: TaskPolicy;
}

const reject = (reason: RejectReason, message: string): Verdict => ({ ok: false, reason, message });

export function checkSignature(
  a: JobAssignment,
  v: Pick<VerifyContext, "trustedKeys">,
  verified?: VerifiedSignatures,
): SignatureCheck {
  if (!a.job) return { ok: false, reason: "unsigned", message: "assignment carries no job" };
  return verifySignedJob(a.job, v.trustedKeys, verified);
}

/** Everything after the signature check and the duplicate-id check. */
export function checkSpec(a: JobAssignment, spec: Spec, v: VerifyContext): Verdict {
  if (!spec.jobId) return reject("malformed", "job has no id");
  const now = v.clock.now();
  if (!spec.expiresAtMs) return reject("no_expiry", "job has no expiry (expires_at_ms)");
  if (spec.expiresAtMs <= now)
    return reject("expired", `job expired at ${new Date(spec.expiresAtMs).toISOString()}`);
  if (spec.expiresAtMs <= v.forgottenUpTo)
    return reject(
      "expired",
      `job expires at ${new Date(spec.expiresAtMs).toISOString()}, before jobs this device has forgotten: it may have run`,
    );
  if (spec.expiresAtMs - spec.issuedAtMs > v.maxLifetimeMs)
    return reject(
      "lifetime_too_long",
      `job is valid for ${Math.round((spec.expiresAtMs - spec.issuedAtMs) / 86_400_000)} days, more than this device allows (${Math.round(v.maxLifetimeMs / 86_400_000)})`,
    );
  if (v.clock.wallTrusted() && spec.issuedAtMs > now + v.maxSkewMs) {
    return reject(
      "issued_in_future",
      `issued_at ${new Date(spec.issuedAtMs).toISOString()} is ahead of device time`,
    );
  }
  if (a.deviceId && a.deviceId !== v.deviceId) return reject("wrong_target", `assigned to ${a.deviceId}`);
  const ids = spec.target?.deviceIds ?? [];
  if (ids.length && !ids.includes(v.deviceId))
    return reject("wrong_target", `targets ${ids.join(",")}, not this device`);
  if (spec.target?.selector) {
    try {
      if (!matchesSelector(parseSelector(spec.target.selector), v.labels)) {
        return reject("wrong_target", `labels do not match selector "${spec.target.selector}"`);
      }
    } catch (err) {
      if (err instanceof SelectorError) return reject("wrong_target", err.message.split("\n")[0]!);
      throw err;
    }
  }
  if (!spec.tasks.length) return reject("malformed", "job has no tasks");
  const graph = checkGraph(spec.tasks);
  if (graph) return reject(graph.reason, graph.message);
  for (const [what, c] of [
    ["window", spec.window],
    ["schedule", spec.schedule],
  ] as const) {
    if (!c?.cron) continue;
    const problem = cronProblem(c.cron, c.timezone);
    if (problem) return reject("invalid_schedule", `${what}: ${problem}`);
  }
  if (spec.window?.cron && spec.window.cron.trim().split(/\s+/).length !== 5) {
    return reject("invalid_schedule", "window: cron must have 5 fields (minute resolution)");
  }
  const params = new Map<string, unknown>();
  for (const t of spec.tasks) {
    const h = v.handlers.get(t.type);
    if (!h) return reject("unknown_task_type", `task ${t.id}: this agent has no task type "${t.type}"`);
    if (v.allowTaskTypes && !v.allowTaskTypes.includes(t.type)) {
      return reject(
        "task_type_not_allowed",
        `task ${t.id}: task type "${t.type}" is not allowed on this agent`,
      );
    }
    for (const r of t.requires ?? []) {
      if (!r.fact || !(REQUIREMENT_OPS as readonly string[]).includes(r.op ?? "")) {
        return reject("invalid_params", `task ${t.id}: bad precondition ${r.fact ?? "?"} ${r.op ?? "?"}`);
      }
    }
    let raw: unknown;
    try {
      raw = t.paramsJson ? JSON.parse(t.paramsJson) : {};
    } catch (err) {
      return reject("invalid_params", `task ${t.id}: params are not JSON: ${(err as Error).message}`);
    }
    const parsed = h.paramsSchema.safeParse(raw);
    if (!parsed.success) {
      const problems = parsed.error.issues.map((i) => `${i.path.join(".") || "params"}: ${i.message}`);
      return reject("invalid_params", `task ${t.id} (${t.type}): ${problems.join("; ")}`);
    }
    const policyProblem = h.check?.(parsed.data, v.policy);
    if (policyProblem) return reject("task_type_not_allowed", `task ${t.id}: ${policyProblem}`);
    params.set(t.id, parsed.data);
  }
  return { ok: true, spec, params };
}
