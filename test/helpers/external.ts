// Third-party servers for tests and benchmarks, from Debian's packages: Mosquitto and Redis,
// each on a free loopback port in its own process.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { join } from "node:path";

export function freePort(): Promise<number> {
  return new Promise((res) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const p = (s.address() as { port: number }).port;
      s.close(() => res(p));
    });
  });
}

/** Resolves once something accepts TCP connections on the port. */
export async function waitForPort(port: number, timeoutMs = 10_000): Promise<void> {
  const start = Date.now();
  for (;;) {
    const ok = await new Promise<boolean>((res) => {
      const c = createConnection({ port, host: "127.0.0.1" }, () => {
        c.destroy();
        res(true);
      });
      c.on("error", () => res(false));
    });
    if (ok) return;
    if (Date.now() - start > timeoutMs) throw new Error(`nothing listens on port ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface External {
  proc: ChildProcess;
  port: number;
  url: string;
  log: () => string;
  stop: () => void;
}

/** Starts a server process and waits until it listens on `port` (else stops it and says why). */
async function run(cmd: string, args: string[], port: number, url: string): Promise<External> {
  const proc = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  proc.on("error", (err) => {
    log += `${cmd}: ${err.message}\n`;
  });
  proc.stdout!.on("data", (d: Buffer) => {
    log += d.toString();
  });
  proc.stderr!.on("data", (d: Buffer) => {
    log += d.toString();
  });
  const stop = () => proc.kill("SIGKILL");
  await waitForPort(port).catch((err) => {
    stop();
    throw new Error(`${err.message}: ${log}`);
  });
  return { proc, port, url, log: () => log, stop };
}

/** Mosquitto with a config file written into `dir`: a loopback listener plus `lines`. */
export async function startMosquitto(dir: string, lines: string[] = []): Promise<External> {
  const port = await freePort();
  const conf = join(dir, "mosquitto.conf");
  const asRoot = process.getuid?.() === 0 ? ["user root"] : [];
  writeFileSync(conf, [`listener ${port} 127.0.0.1`, ...asRoot, ...lines, ""].join("\n"));
  return run(process.env.MOSQUITTO ?? "/usr/sbin/mosquitto", ["-c", conf], port, `mqtt://127.0.0.1:${port}`);
}

/** A throwaway redis-server (no persistence) on a free port. */
export async function startRedis(): Promise<External> {
  const port = await freePort();
  return run(
    process.env.REDIS_SERVER ?? "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    port,
    `redis://127.0.0.1:${port}`,
  );
}

/** Runs mosquitto_pub or mosquitto_sub (Debian's mosquitto-clients); never rejects. */
export function mosquittoClient(
  tool: "mosquitto_pub" | "mosquitto_sub",
  args: string[],
  timeoutMs = 5000,
): Promise<{ code: number; out: string }> {
  return new Promise((res) => {
    execFile(tool, args, { timeout: timeoutMs, encoding: "utf8" }, (err, stdout, stderr) => {
      const code = err
        ? typeof (err as { code?: unknown }).code === "number"
          ? (err as { code: number }).code
          : -1
        : 0;
      res({ code, out: `${stdout}${stderr}` });
    });
  });
}
