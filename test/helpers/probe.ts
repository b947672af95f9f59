// A task type for scheduler tests: records when it starts and ends, can take time, fail its
// first N attempts, or ignore its abort signal.
import { setTimeout as delay } from "node:timers/promises";
import { z } from "zod";
import { TaskFailedError } from "../../firmware-tasks/errors.js";
import { builtinHandlers } from "../../firmware-tasks/index.js";
import { defineHandler, type TaskHandler } from "../../firmware-tasks/types.js";

export const events: string[] = [];
const attempts = new Map<string, number>();

const params = z.object({
  ms: z.number().default(0),
  failTimes: z.number().default(0),
  ignoreAbort: z.boolean().default(false),
  key: z.string().optional(),
});

const probe = (type: string, idempotent: boolean) =>
  defineHandler({
    type,
    idempotent,
    paramsSchema: params,
    async run(ctx, p, signal) {
      const key = p.key ?? `${ctx.jobId}/${ctx.taskId}`;
      events.push(`start:${ctx.taskId}`);
      const n = (attempts.get(key) ?? 0) + 1;
      attempts.set(key, n);
      try {
        if (p.ms) await delay(p.ms, undefined, p.ignoreAbort ? {} : { signal });
      } finally {
        events.push(`end:${ctx.taskId}`);
      }
      if (n <= p.failTimes) throw new TaskFailedError(`planned failure ${n}`, { output: `out${n}` });
      return { message: `attempt ${n}` };
    },
  });

export const testHandlers: TaskHandler[] = [
  ...builtinHandlers,
  probe("probe", false),
  probe("probe-idem", true),
];
