import { isAbsolute, relative, resolve } from "node:path";
import { UnrecoverableError } from "./errors.js";

/** Resolves `p` under `root`, refusing anything that escapes it. */
export function underRoot(root: string, p: string): string {
  const abs = resolve(root, p.replace(/^\/+/, ""));
  const rel = relative(root, abs);
  if (rel.startsWith("..") || isAbsolute(rel))
    throw new UnrecoverableError(`path ${p} escapes the agent root`, { reason: "bad_path" });
  return abs;
}

/** The environment a command started by a task gets: a minimal PATH, never the agent's secrets. */
export function taskEnv(
  root: string,
  home: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: home, FLEET_ROOT: root, ...extra };
}
