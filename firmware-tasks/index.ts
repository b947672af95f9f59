import noop from "./noop.js";
import shell from "./shell.js";
import sleep from "./sleep.js";
import type { TaskHandler } from "./types.js";

export const builtinHandlers: readonly TaskHandler[] = [noop, sleep, shell];

export type { TaskContext, TaskHandler, TaskPolicy, TaskResult } from "./types.js";
