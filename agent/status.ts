// Every TaskStatus the agent sends is built here: a task's, an execution's end, and the
// job-level answers to a delivery (accepted, duplicate, rejected, cancelled). The outbox gives
// them their seq when they are committed (outbox.ts).
import { TaskState, type TaskStatus } from "../proto/index.js";
import type { ExecutionRecord, TaskRun } from "./store.js";

/** The status describing a task run as it is now. */
export function taskStatus(e: ExecutionRecord, taskId: string, taskType: string, atMs: number): TaskStatus {
  const run: TaskRun = e.tasks[taskId]!;
  return {
    jobId: e.jobId,
    taskId,
    executionId: e.execId,
    taskType,
    state: run.state,
    attempt: run.attempt,
    progress: run.progress,
    message: run.message,
    reason: run.reason,
    output: run.output ?? "",
    ...(run.bytesBySource ? { bytesBySource: run.bytesBySource } : {}),
    ...(run.droppedPeers?.length ? { droppedPeers: run.droppedPeers } : {}),
    atMs,
    startedAtMs: run.startedAt ?? 0,
    finishedAtMs: run.finishedAt ?? 0,
  };
}

/** The job-level status of an execution that ended: its state and a count of task states. */
export function executionEnded(e: ExecutionRecord, atMs: number): TaskStatus {
  const counts = new Map<string, number>();
  for (const t of Object.values(e.tasks)) {
    const name = TaskState[t.state]!;
    counts.set(name, (counts.get(name) ?? 0) + 1);
  }
  return {
    jobId: e.jobId,
    taskId: "",
    executionId: e.execId,
    state: e.jobState!,
    message: [...counts].map(([s, n]) => `${n} ${s}`).join(", "),
    atMs,
    finishedAtMs: atMs,
  };
}

/** A job-level status that is not about one execution (accepted, rejected, duplicate, cancelled). */
export function jobStatus(
  jobId: string,
  state: TaskState,
  message: string,
  atMs: number,
  more: Pick<TaskStatus, "reason" | "executionId" | "specDigest"> = {},
): TaskStatus {
  return { jobId, taskId: "", executionId: "", state, message, atMs, ...more };
}
