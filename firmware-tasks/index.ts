import backup from "./backup.js";
import config from "./config.js";
import noop from "./noop.js";
import reboot from "./reboot.js";
import scan from "./scan.js";
import shell from "./shell.js";
import sleep from "./sleep.js";
import softwareUpdate from "./software-update.js";
import type { TaskHandler } from "./types.js";

export const builtinHandlers: readonly TaskHandler[] = [
  noop,
  sleep,
  shell,
  config,
  reboot,
  scan,
  backup,
  softwareUpdate,
];

export type { TaskContext, TaskHandler, TaskPolicy, TaskResult } from "./types.js";
