// The wire types, generated from fleet.proto by protobufjs-cli at build time.
import "./numbers.js";
import { fleet } from "./gen/fleet.js";

export const pb = fleet.v1;
export type Envelope = fleet.v1.IEnvelope;
export type JobSpec = fleet.v1.IJobSpec;
export type TaskSpec = fleet.v1.ITaskSpec;
export type SignedJob = fleet.v1.ISignedJob;
export type JobAssignment = fleet.v1.IJobAssignment;
export type TaskStatus = fleet.v1.ITaskStatus;
export type DeviceState = fleet.v1.IDeviceState;
export type Telemetry = fleet.v1.ITelemetry;
export type SyncRequest = fleet.v1.ISyncRequest;
export type SyncResponse = fleet.v1.ISyncResponse;
export type Cancel = fleet.v1.ICancel;
export type SiteCredentials = fleet.v1.ISiteCredentials;
export type StatusBatch = fleet.v1.IStatusBatch;
export type StatusAck = fleet.v1.IStatusAck;
export type SiteJob = fleet.v1.ISiteJob;
export type SiteDeviceAck = fleet.v1.ISiteDeviceAck;
export type SiteState = fleet.v1.ISiteState;
export type SiteAck = fleet.v1.ISiteAck;
export type Requirement = fleet.v1.IRequirement;
export const TaskState = fleet.v1.TaskState;
export type TaskState = fleet.v1.TaskState;
export const Trigger = fleet.v1.Trigger;
export type Trigger = fleet.v1.Trigger;
export const OnUnmet = fleet.v1.OnUnmet;
export type OnUnmet = fleet.v1.OnUnmet;

export const TERMINAL_STATES: ReadonlySet<TaskState> = new Set([
  TaskState.SUCCEEDED,
  TaskState.FAILED,
  TaskState.TIMED_OUT,
  TaskState.CANCELED,
  TaskState.REJECTED,
  TaskState.SKIPPED,
]);

/**
 * Reason of the record an agent writes in place of a status whose write failed (state
 * unspecified): it fills that seq so that the controller, which applies seqs in order, goes on.
 */
export const LOST_WRITE = "lost_write";

/** A status that only fills the seq of a lost one (see LOST_WRITE). */
export const isLostWrite = (s: { state?: TaskState | null; reason?: string | null }): boolean =>
  !s.state && s.reason === LOST_WRITE;

/** States that count as a failure for `all_success` / `one_failed` triggers. */
export const UPSTREAM_FAILED_STATES: ReadonlySet<TaskState> = new Set([
  TaskState.FAILED,
  TaskState.TIMED_OUT,
  TaskState.CANCELED,
  TaskState.REJECTED,
  TaskState.SKIPPED,
]);

/** A state's name; an unspecified state is an assignment nobody acknowledged yet: PENDING. */
export function stateName(s: TaskState | number | null | undefined): string {
  if (!s) return "PENDING";
  return TaskState[s] ?? String(s);
}

/** Messages as decoded: every scalar field has its default, unlike the optional `I*` shapes. */
export type DecodedTask = InstanceType<typeof pb.TaskSpec>;
export type DecodedJobSpec = Omit<InstanceType<typeof pb.JobSpec>, "tasks"> & { tasks: DecodedTask[] };

export function decodeJobSpec(bytes: Uint8Array): DecodedJobSpec {
  return pb.JobSpec.decode(bytes) as DecodedJobSpec;
}
