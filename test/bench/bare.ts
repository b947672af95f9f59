import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";

/** Starts the bare aedes of the baselines in its own process (as the fleet server runs). */
export async function bareAedes(): Promise<{ url: string; pid: number; stop: () => void }> {
  const p = spawn(process.execPath, [new URL("./bare-aedes.mjs", import.meta.url).pathname], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const port = await new Promise<string>((res) =>
    p.stdout!.once("data", (d: Buffer) => res(d.toString().trim())),
  );
  return { url: `mqtt://127.0.0.1:${port}`, pid: p.pid!, stop: () => p.kill() };
}

/** CPU time (user + system, ms) a process has used so far, from /proc (Linux; 100 Hz ticks). */
export function cpuMsOf(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * 10; // utime, stime (fields 14, 15)
}
