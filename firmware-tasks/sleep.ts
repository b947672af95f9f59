import { setTimeout as delay } from "node:timers/promises";
import { z } from "zod";
import { defineHandler } from "./types.js";

export default defineHandler({
  type: "sleep",
  paramsSchema: z
    .object({
      seconds: z
        .number()
        .min(0)
        .max(7 * 24 * 3600),
    })
    .strict(),
  idempotent: true,
  scratch: false,
  async run(ctx, params, signal) {
    const step = Math.max(params.seconds / 10, 0.05);
    for (let t = 0; t < params.seconds; t += step) {
      await delay(Math.min(step, params.seconds - t) * 1000, undefined, { signal });
      ctx.progress(Math.min(100, Math.round(((t + step) / params.seconds) * 100)));
    }
    return { message: `slept ${params.seconds}s` };
  },
});
