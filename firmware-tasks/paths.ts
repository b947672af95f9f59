import { isAbsolute, posix, relative, resolve } from "node:path";
import { UnrecoverableError } from "./errors.js";

/** Resolves `p` under `root`, refusing anything that escapes it. */
export function underRoot(root: string, p: string): string {
  const abs = resolve(root, p.replace(/^\/+/, ""));
  const rel = relative(root, abs);
  if (rel.startsWith("..") || isAbsolute(rel))
    throw new UnrecoverableError(`path ${p} escapes the agent root`, { reason: "bad_path" });
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
