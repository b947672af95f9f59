import { z } from "zod";
import { defineHandler } from "./types.js";

export default defineHandler({
  type: "noop",
  paramsSchema: z.object({}).strict(),
  idempotent: true,
  scratch: false,
  async run() {
    return { message: "ok" };
  },
});
