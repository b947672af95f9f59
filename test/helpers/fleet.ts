// Real fleet processes for e2e tests: `fleet server`, the `fleet` CLI, flashed agents.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { hashPassword, mosquittoHash } from "../../broker/credentials.js";
import { generateSigningKey } from "../../proto/signing.js";
import { tempDir } from "./keys.js";
import { waitUntil } from "./wait.js";

export const FLEET = resolve(import.meta.dirname, "..", "..", "bin", "fleet");

export interface ServerProcess {
  proc: ChildProcess;
  urls: { mqtt: string; mqtts: string; ws: string; http: string; https: string };
  ports: number[];
  stderr: () => string;
  exited: Promise<number | null>;
}

export async function startServer(
  dir: string,
  ports = [0, 0, 0, 0, 0],
  extra: string[] = [],
): Promise<ServerProcess> {
  const [m, s, w, h, hs] = ports.map(String);
  const proc = spawn(
    process.execPath,
    [
      // e.g. FLEET_SERVER_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" to profile the server
      ...(process.env.FLEET_SERVER_NODE_ARGS?.split(" ").filter(Boolean) ?? []),
      FLEET,
      "server",
      "--dir",
      dir,
      "--host",
      "127.0.0.1",
      "--mqtt-port",
      m!,
      "--mqtts-port",
      s!,
      "--ws-port",
      w!,
      "--http-port",
      h!,
      "--https-port",
      hs!,
      ...extra,
    ],
    {
      env: { ...process.env, FLEET_LOG_LEVEL: process.env.TEST_LOG_LEVEL ?? "warn" },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let err = "";
  proc.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  const exited = new Promise<number | null>((r) => proc.on("exit", (code) => r(code)));
  const line = await new Promise<string>((res, rej) => {
    let out = "";
    proc.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const l = out.split("\n").find((x) => x.startsWith("fleet server listening"));
      if (l) res(l);
    });
    void exited.then((code) => rej(new Error(`server exited ${code}: ${err}`)));
  });
  const [mqtt, mqtts, ws, http, https] = line.split(" ").slice(3) as [string, string, string, string, string];
  const urls = { mqtt, mqtts, ws, http, https };
  const actual = [mqtt, mqtts, ws, http, https].map((u) => Number(u.split(":").pop()));
  return { proc, urls, ports: actual, stderr: () => err, exited };
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function cli(
  args: string[],
  env: Record<string, string> = {},
  timeoutMs = 60_000,
): Promise<CliResult> {
  return new Promise((res) => {
    execFile(
      process.execPath,
      [FLEET, ...args],
      { env: { ...process.env, ...env }, timeout: timeoutMs, maxBuffer: 512 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err
          ? typeof (err as { code?: unknown }).code === "number"
            ? (err as { code: number }).code
            : 1
          : 0;
        res({ code, stdout, stderr });
      },
    );
  });
}

export function cliJson<T = unknown>(r: CliResult): T {
  if (r.code !== 0 && !r.stdout.trim()) throw new Error(`fleet exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}

/** Points operator.json at the server's (ephemeral) MQTT URL. */
export function setContextServer(dir: string, url: string): string {
  const file = join(dir, "operator.json");
  const ctx = JSON.parse(readFileSync(file, "utf8"));
  ctx.server = url;
  writeFileSync(file, JSON.stringify(ctx, null, 2), { mode: 0o600 });
  return file;
}

/** Flashes a device into a temp root, then moves the root elsewhere (it must still work). */
export async function flashMoved(id: string, env: Record<string, string>, args: string[] = []) {
  const a = tempDir("fleet-flash-");
  const b = tempDir("fleet-moved-");
  const r = await cli(["flash", id, "--root", join(a.dir, "root"), "--json", ...args], env);
  if (r.code !== 0) throw new Error(`flash failed: ${r.stderr}`);
  const moved = join(b.dir, "device-root");
  renameSync(join(a.dir, "root"), moved);
  a.cleanup();
  return { root: moved, cleanup: b.cleanup };
}

export interface AgentProc {
  proc: ChildProcess;
  exited: Promise<number | null>;
  stderr: () => string;
}

/**
 * Agents (and watchers) started here and still running: killed when the test process exits, so
 * that one a test did not stop does not outlive the run (two did, reconnecting to a server long
 * gone).
 */
const children = new Set<ChildProcess>();
process.once("exit", () => {
  for (const p of children) p.kill("SIGKILL");
});

/** Starts a flashed agent the way a device does: ROOT/opt/fleet-agent/run --root ROOT, from `/`. */
export function startAgent(root: string, extraEnv: Record<string, string> = {}): AgentProc {
  const proc = spawn(join(root, "opt", "fleet-agent", "run"), ["--root", root], {
    cwd: "/",
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", FLEET_LOG_LEVEL: "info", ...extraEnv },
    stdio: ["ignore", "ignore", "pipe"],
  });
  children.add(proc);
  proc.once("exit", () => children.delete(proc));
  let err = "";
  proc.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  return { proc, exited: new Promise((r) => proc.on("exit", (code) => r(code))), stderr: () => err };
}

export { waitUntil };

/** One line of `fleet watch --json`. */
export interface WatchEvent {
  kind: string;
  deviceId?: string;
  jobId?: string;
  taskId?: string;
  state?: string;
  message?: string;
  detail?: { wave?: number; peer?: string; rolloutId?: string };
  gateway?: { uplink: boolean };
}

/**
 * `fleet watch --json`, running until `stop()`. It resolves once the watcher is subscribed (its
 * first line: the retained state of an online device, so the fleet must have one), not after a
 * guessed delay; a test then waits for the events it needs instead of a fixed lifetime.
 */
export async function startWatch(env: Record<string, string>, args: string[] = []) {
  const proc = spawn(process.execPath, [FLEET, "watch", "--json", ...args], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(proc);
  let out = "";
  let err = "";
  let code: number | null | undefined;
  proc.stdout!.on("data", (d: Buffer) => {
    out += d.toString();
  });
  proc.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  const exited = new Promise<void>((r) =>
    proc.once("exit", (c) => {
      code = c;
      children.delete(proc);
      r();
    }),
  );
  const events = (): WatchEvent[] =>
    out
      .slice(0, out.lastIndexOf("\n") + 1)
      .split("\n")
      .filter(Boolean)
      .map((l) => JSON.parse(l) as WatchEvent);
  await waitUntil("fleet watch subscribed (its first event)", () => {
    if (code !== undefined) throw new Error(`fleet watch exited ${code}: ${err}`);
    return out.includes("\n");
  });
  return {
    events,
    /** Waits until `pred` holds for the events so far, and returns them. */
    until: (what: string, pred: (events: WatchEvent[]) => boolean, timeoutMs?: number) =>
      waitUntil(what, () => (pred(events()) ? events() : undefined), timeoutMs),
    stop: async (): Promise<WatchEvent[]> => {
      proc.kill("SIGTERM");
      await exited;
      return events();
    },
  };
}

/** Waits until `fleet device ls` shows the device online (or offline). */
export async function waitOnline(env: Record<string, string>, id: string, want = true): Promise<void> {
  await waitUntil(`${id} online=${want}`, async () => {
    const ls = cliJson<Array<{ id: string; online: boolean }>>(await cli(["device", "ls", "--json"], env));
    return ls.find((d) => d.id === id)?.online === want;
  });
}

/** Changes a data directory's server.json (the server reads it at start). */
export function editServerConfig(dir: string, edit: (cfg: Record<string, any>) => void): void {
  const file = join(dir, "server.json");
  const cfg = JSON.parse(readFileSync(file, "utf8"));
  edit(cfg);
  writeFileSync(file, JSON.stringify(cfg), { mode: 0o600 });
}

/** Adds an operator account (with a fresh signing key) to a data directory's server.json. */
export async function addOperator(dir: string, username: string, password: string) {
  const key = generateSigningKey();
  const passwordHash = await hashPassword(password);
  editServerConfig(dir, (cfg) => {
    cfg.operators.push({
      username,
      passwordHash,
      keyId: key.keyId,
      publicKey: key.publicKeyPem,
      brokerHash: mosquittoHash(password),
    });
  });
  return key;
}

/**
 * The prologue of every e2e file: `fleet init` in `dir`, an optional server.json edit, the
 * server started, and an operator context pointing at it.
 */
export async function startFleet(
  dir: string,
  o: { config?: (cfg: Record<string, any>) => void; serverArgs?: string[] } = {},
): Promise<{ server: ServerProcess; env: Record<string, string> }> {
  const init = await cli(["init", "--dir", dir]);
  if (init.code !== 0) throw new Error(`fleet init failed: ${init.stderr}`);
  if (o.config) editServerConfig(dir, o.config);
  const server = await startServer(dir, undefined, o.serverArgs);
  return { server, env: { FLEET_CONTEXT: setContextServer(dir, server.urls.mqtt) } };
}

type Ending = { proc: ChildProcess } | ChildProcess | (() => void) | undefined;

/** The epilogue: processes SIGKILLed, then directories removed (functions called). */
export function stopAll(...parts: Array<Ending | Iterable<Ending>>): void {
  const flat = parts.flatMap((p) =>
    p && typeof p === "object" && Symbol.iterator in p ? [...(p as Iterable<Ending>)] : [p as Ending],
  );
  for (const p of flat) if (p && typeof p === "object") ("proc" in p ? p.proc : p).kill("SIGKILL");
  for (const p of flat) if (typeof p === "function") p();
}

/** `fleet simulate …`, resolved once its devices are connected ("simulating" on stdout). */
export async function simulate(env: Record<string, string>, args: string[]): Promise<ChildProcess> {
  const p = spawn(process.execPath, [FLEET, "simulate", "--connect-rate", "2000", ...args], {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  await new Promise<void>((res, rej) => {
    let out = "";
    let err = "";
    p.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("simulating")) res();
    });
    p.stderr!.on("data", (d: Buffer) => {
      err += d.toString();
    });
    p.on("exit", (code) => rej(new Error(`simulate exited ${code}: ${err.slice(-500)}`)));
  });
  return p;
}
