// `reboot {}`: asks the machine to reboot through the system port, and succeeds only once the
// agent runs again in a new boot (the task is resumable: the request is saved first).
import { z } from "zod";
import { defineHandler } from "./types.js";

export default defineHandler({
  type: "reboot",
  paramsSchema: z.object({}).strict(),
  idempotent: false,
  resumable: true,
  async run(ctx, _p, signal) {
    const key = `reboot/${ctx.jobId}/${ctx.executionId}/${ctx.taskId}`;
    const requested = await ctx.kv.get<{ bootId: string; at: number }>(key);
    const boot = await ctx.system.bootId();
    if (requested && requested.bootId !== boot) {
      await ctx.kv.del(key);
      return { message: `rebooted; running again since boot ${boot.slice(0, 8)}` };
    }
    // Persist, then act: after the reboot the saved request tells us it happened.
    await ctx.kv.put(key, { bootId: boot, at: ctx.now() });
    ctx.progress(50, "reboot requested");
    await ctx.system.reboot();
    // The machine goes down under us; if it does not, the task's timeout ends it.
    return new Promise((_, reject) => {
      if (signal.aborted) reject(signal.reason);
      signal.addEventListener("abort", () => reject(signal.reason), { once: true });
    });
  },
});
