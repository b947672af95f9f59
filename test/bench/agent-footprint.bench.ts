// B3 agent footprint: resident memory once connected and idle, and time from start to
// connected, of a flashed agent (the self-contained bundle a device runs) vs a bare node
// process that only connects with MQTT.js, against the same fleet server in the same run.
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { it } from "vitest";
import { cli, cliJson, flashMoved, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
const IDLE_MS = 3000;

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function rssKb(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? 0);
}

/** Starts a process, waits for `ready` in its output, then idles; returns start->ready ms and RSS. */
async function measure(start: () => ChildProcess, ready: RegExp): Promise<{ ms: number; rssKb: number }> {
  const t = performance.now();
  const p = start();
  const ms = await new Promise<number>((res, rej) => {
    let out = "";
    const on = (d: Buffer) => {
      out += d.toString();
      if (ready.test(out)) res(performance.now() - t);
    };
    p.stdout?.on("data", on);
    p.stderr?.on("data", on);
    p.on("exit", (code) => rej(new Error(`exited ${code} before being ready: ${out}`)));
  });
  await new Promise((r) => setTimeout(r, IDLE_MS));
  const rss = rssKb(p.pid!);
  p.kill("SIGTERM");
  await new Promise((r) => p.once("exit", r));
  return { ms, rssKb: rss };
}

it(`B3: flashed agent vs bare MQTT.js process (${RUNS} runs each)`, async () => {
  const data = tempDir("fleet-b3-");
  await cli(["init", "--dir", data.dir]);
  const server = await startServer(data.dir);
  const cleanups: Array<() => void> = [data.cleanup];
  try {
    const env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
    const { root, cleanup } = await flashMoved("fp-agent", env);
    cleanups.push(cleanup);
    const bare = cliJson<{ password: string }>(await cli(["device", "add", "fp-bare", "--json"], env));
    const agent: Array<{ ms: number; rssKb: number }> = [];
    const plain: Array<{ ms: number; rssKb: number }> = [];
    for (let i = 0; i < RUNS; i++) {
      plain.push(
        await measure(
          () =>
            spawn(
              process.execPath,
              [
                new URL("./bare-client.mjs", import.meta.url).pathname,
                server.urls.mqtt,
                "fp-bare",
                bare.password,
                "fleet/v1",
              ],
              { stdio: ["ignore", "pipe", "pipe"] },
            ),
          /connected/,
        ),
      );
      agent.push(
        await measure(
          () =>
            spawn(join(root, "opt", "fleet-agent", "run"), ["--root", root], {
              cwd: "/",
              env: { PATH: process.env.PATH ?? "/usr/bin:/bin", FLEET_LOG_LEVEL: "info" },
              stdio: ["ignore", "pipe", "pipe"],
            }),
          /"msg":"connected"/,
        ),
      );
    }
    const a = { ms: median(agent.map((x) => x.ms)), mb: median(agent.map((x) => x.rssKb)) / 1024 };
    const b = { ms: median(plain.map((x) => x.ms)), mb: median(plain.map((x) => x.rssKb)) / 1024 };
    report("B3-agent-footprint", [
      {
        name: `resident memory, connected and idle ${IDLE_MS / 1000}s (median of ${RUNS})`,
        value: a.mb,
        unit: "MiB",
        baseline: b.mb,
        ratio: a.mb / b.mb,
        goal: "<= 1.5x bare MQTT.js process",
      },
      {
        name: `start -> connected (median of ${RUNS})`,
        value: a.ms,
        unit: "ms",
        baseline: b.ms,
        ratio: a.ms / b.ms,
        goal: "<= 2x bare MQTT.js process",
      },
    ]);
  } finally {
    server.proc.kill("SIGTERM");
    await server.exited;
    for (const c of cleanups) c();
  }
});
