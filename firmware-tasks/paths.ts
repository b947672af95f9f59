import { existsSync, realpathSync } from "node:fs";
import { dirname, isAbsolute, posix, relative, resolve } from "node:path";
import { UnrecoverableError } from "./errors.js";

/**
 * Resolves `p` under `root`, refusing anything that escapes it: by its text (`..`), and through
 * symlinks already under the root (the deepest part of the path that exists is resolved).
 */
export function underRoot(root: string, p: string): string {
  const abs = resolve(root, p.replace(/^\/+/, ""));
  const escapes = (base: string, x: string) => {
    const rel = relative(base, x);
    return rel.startsWith("..") || isAbsolute(rel);
  };
  if (escapes(root, abs))
    throw new UnrecoverableError(`path ${p} escapes the agent root`, { reason: "bad_path" });
  let probe = abs;
  while (!existsSync(probe) && probe !== dirname(probe)) probe = dirname(probe);
  if (existsSync(probe) && existsSync(root) && escapes(realpathSync(root), realpathSync(probe)))
    throw new UnrecoverableError(`path ${p} leads out of the agent root through a symlink`, {
      reason: "bad_path",
    });
  return abs;
}

/**
 * Whether `p` (relative to the root) lies under one of `allowed` (compared by path segments,
 * after normalising `.` and `..`); undefined allows anything under the root.
 */
export function pathAllowed(p: string, allowed: readonly string[] | undefined): string | undefined {
  if (!allowed) return undefined;
  const norm = (x: string) => posix.normalize(`/${x}`).replace(/\/+$/, "") || "/";
  const target = norm(p);
  const ok = allowed.some((a) => {
    const base = norm(a);
    return base === "/" || target === base || target.startsWith(`${base}/`);
  });
  return ok ? undefined : `${p} is outside this device's allowPaths (${allowed.join(", ")})`;
}

/** The environment a command started by a task gets: a minimal PATH, never the agent's secrets. */
export function taskEnv(
  root: string,
  home: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return { PATH: process.env.PATH ?? "/usr/bin:/bin", HOME: home, FLEET_ROOT: root, ...extra };
}
