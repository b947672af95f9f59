import { spawn } from "node:child_process";

/** Starts the bare aedes of the baselines in its own process (as the fleet server runs). */
export async function bareAedes(): Promise<{ url: string; stop: () => void }> {
  const p = spawn(process.execPath, [new URL("./bare-aedes.mjs", import.meta.url).pathname], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const port = await new Promise<string>((res) =>
    p.stdout!.once("data", (d: Buffer) => res(d.toString().trim())),
  );
  return { url: `mqtt://127.0.0.1:${port}`, stop: () => p.kill() };
}
