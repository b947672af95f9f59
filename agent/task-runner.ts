// Runs one attempt of a task and says how it ended: the handler raced against its abort signal
// (cancel, timeout, agent stop), a scratch directory made and removed around it, the output cut
// to the policy's limit. It writes no state: the scheduler turns the outcome into a transition.
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { join } from "node:path";
import { truncateOutput } from "../common/output.js";
import {
  TaskCanceledError,
  TaskFailedError,
  TaskTimeoutError,
  UnrecoverableError,
} from "../firmware-tasks/errors.js";
import type { TaskContext, TaskHandler } from "../firmware-tasks/types.js";

export type Outcome =
  | {
      kind: "succeeded";
      message: string;
      output: string;
      bytesBySource?: Record<string, number>;
      droppedPeers?: string[];
    }
  | { kind: "canceled"; message: string; output: string }
  | { kind: "timed_out"; message: string; output: string }
  | { kind: "failed"; message: string; reason: string; output: string; retryable: boolean };

export interface RunRequest {
  handler: TaskHandler;
  /** The context without its scratch directory (made here, under `scratchRoot`). */
  context: Omit<TaskContext, "scratchDir">;
  /** Where scratch directories are made (the agent's own: it empties it when it starts). */
  scratchRoot: string;
  params: unknown;
  /** Aborted with a TaskCanceledError to cancel; the runner aborts it on timeout. */
  controller: AbortController;
  timeoutS: number;
  outputLimitBytes: number;
}

export async function runTask(r: RunRequest): Promise<Outcome> {
  const { controller } = r;
  const signal = controller.signal;
  const timer =
    r.timeoutS > 0
      ? setTimeout(() => controller.abort(new TaskTimeoutError(r.timeoutS)), r.timeoutS * 1000)
      : undefined;
  // A handler that ignores its signal must not hold the task: the race settles on abort.
  const aborted = new Promise<never>((_, reject) => {
    if (signal.aborted) reject(signal.reason);
    signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });
  aborted.catch(() => {});
  let scratchDir = "";
  try {
    if (r.handler.scratch !== false) scratchDir = await makeScratch(r.scratchRoot);
    const result = await Promise.race([
      // Added in place, not spread: the context's `log` is a getter made on first use.
      r.handler.run(Object.assign(r.context, { scratchDir }) as TaskContext, r.params, signal),
      aborted,
    ]);
    return {
      kind: "succeeded",
      message: result?.message ?? "ok",
      output: truncateOutput(result?.output ?? "", r.outputLimitBytes),
      ...(result?.bytesBySource ? { bytesBySource: result.bytesBySource } : {}),
      ...(result?.droppedPeers?.length ? { droppedPeers: result.droppedPeers } : {}),
    };
  } catch (err) {
    return classify(signal.aborted ? signal.reason : err, err, r.outputLimitBytes);
  } finally {
    if (timer) clearTimeout(timer);
    if (scratchDir) await rm(scratchDir, { recursive: true, force: true }).catch(() => {});
  }
}

/** A directory for one run; its root is made again if something removed it. */
async function makeScratch(root: string): Promise<string> {
  try {
    await mkdir(root, { recursive: true, mode: 0o700 });
    return await mkdtemp(join(root, "task-"));
  } catch (err) {
    throw new Error(`cannot make a scratch directory under ${root}: ${(err as Error).message}`);
  }
}

/** Maps why an attempt ended (the abort reason if aborted, else the error thrown) to an outcome. */
export function classify(reason: unknown, thrown: unknown, outputLimitBytes: number): Outcome {
  const output = truncateOutput(
    thrown instanceof TaskFailedError ? (thrown.details.output ?? "") : "",
    outputLimitBytes,
  );
  if (reason instanceof TaskCanceledError) return { kind: "canceled", message: reason.message, output };
  if (reason instanceof TaskTimeoutError) return { kind: "timed_out", message: reason.message, output };
  const message = (reason as Error)?.message ?? String(reason);
  if (reason instanceof TaskFailedError)
    return {
      kind: "failed",
      message,
      reason: reason.details.reason ?? "failed",
      output,
      retryable: !(reason instanceof UnrecoverableError),
    };
  return { kind: "failed", message, reason: "error", output, retryable: true };
}
