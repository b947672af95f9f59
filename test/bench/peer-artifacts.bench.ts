// B9 peer artifacts (issue 13): (a) content-defined chunking speed against sha256 of the same
// bytes, in one process; (b) a site update — N real flashed agents of one site (BENCH_PEER_DEVICES,
// default 50), a 4 MiB incompressible release, the center's artifact bandwidth capped — with
// peer sharing on against the same update to another N devices with it off, in the same run:
// bytes the center served, and time from rollout create to all SUCCEEDED.
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { it } from "vitest";
import { chunkStream } from "../../common/chunking.js";
import {
  type AgentProc,
  cli,
  flashMoved,
  startAgent,
  startFleet,
  stopAll,
  waitOnline,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_PEER_DEVICES ?? 50);
const CAP = 4 * 1024 * 1024; // the center's artifact bytes a second

it("B9a: chunking speed vs sha256", async () => {
  const data = randomBytes(128 * 1024 * 1024);
  async function* parts() {
    for (let i = 0; i < data.length; i += 1 << 20) yield data.subarray(i, i + (1 << 20));
  }
  let t = performance.now();
  const list = await chunkStream(parts());
  const chunkMs = performance.now() - t;
  t = performance.now();
  createHash("sha256").update(data).digest();
  const shaMs = performance.now() - t;
  const mbps = (ms: number) => 128 / (ms / 1000);
  report("B9a-chunking", [
    {
      name: `FastCDC chunks + sha256 of each chunk and of the whole, 128 MiB (${list.chunks.length} chunks)`,
      value: mbps(chunkMs),
      unit: "MB/s",
      baseline: mbps(shaMs),
      ratio: shaMs / chunkMs,
      goal: "hundreds of MB/s (reported)",
    },
  ]);
}, 120_000);

it(`B9b: a ${N}-device site update, center capped at ${CAP / 1048576} MiB/s: peers on vs off`, async () => {
  const data = tempDir("fleet-bench-peers-");
  const { server, env } = await startFleet(data.dir, {
    config: (cfg) => {
      cfg.limits.artifactBytesPerSecond = CAP;
    },
  });
  const agents: AgentProc[] = [];
  const cleanups: Array<() => void> = [];
  try {
    for (const [site, peers] of [
      ["on", true],
      ["off", false],
    ] as const) {
      for (let i = 0; i < N; i++) {
        const id = `${site}-${i}`;
        const { root, cleanup } = await flashMoved(id, env, [
          "--label",
          `site=${site}`,
          "--peer-port",
          "0",
          "--peer-host",
          "127.0.0.1",
        ]);
        cleanups.push(cleanup);
        if (!peers) {
          // Peer sharing off: no peer server, no peer downloads.
          const file = join(root, "etc", "fleet-agent", "config.json");
          const cfg = JSON.parse(readFileSync(file, "utf8"));
          delete cfg.peer;
          writeFileSync(file, JSON.stringify(cfg), { mode: 0o600 });
        }
        agents.push(startAgent(root));
      }
    }
    for (let i = 0; i < N; i++) {
      await waitOnline(env, `on-${i}`);
      await waitOnline(env, `off-${i}`);
    }
    const src = join(data.dir, "src");
    mkdirSync(src, { recursive: true });
    writeFileSync(join(src, "data.bin"), randomBytes(4 * 1024 * 1024));
    writeFileSync(join(src, "VERSION"), "1\n");
    const file = join(data.dir, "app.tar.gz");
    execFileSync("tar", ["czf", file, "-C", src, "."]);
    const size = readFileSync(file).length;
    const push = await cli(["artifact", "push", file, "--name", "app", "--version", "1.0.0"], env);
    if (push.code !== 0) throw new Error(push.stderr);
    const job = join(data.dir, "update.yaml");
    writeFileSync(
      job,
      "name: app\ntasks:\n  - id: update\n    type: software-update\n    params: { artifact: app, version: 1.0.0, target: opt/app }\n",
    );
    const centerBytes = async () => {
      const t = await (await fetch(`${server.urls.http}/metrics`)).text();
      return Number(/^fleet_artifact_bytes_sent_total (\d+)/m.exec(t)?.[1] ?? 0);
    };
    const run = async (site: string) => {
      const before = await centerBytes();
      const t = performance.now();
      const r = await cli(
        [
          "rollout",
          "create",
          "-f",
          job,
          "--selector",
          `site=${site}`,
          "--waves",
          "1,100%",
          "--bake",
          "3s",
          "--wait",
        ],
        env,
        1_800_000,
      );
      if (r.code !== 0) throw new Error(`rollout to ${site}: ${r.stdout} ${r.stderr}`);
      return { ms: performance.now() - t, bytes: (await centerBytes()) - before };
    };
    const off = await run("off");
    const on = await run("on");
    report("B9b-site-update", [
      {
        name: `${N} devices, ${(size / 1048576).toFixed(1)} MiB release, waves 1,100% (3 s bake): center egress, peers on`,
        value: on.bytes / 1048576,
        unit: "MiB",
        baseline: off.bytes / 1048576,
        ratio: on.bytes / off.bytes,
        goal: "≈ 1 copy (reported)",
      },
      {
        name: "created -> all SUCCEEDED, peers on (baseline: off; center capped)",
        value: on.ms,
        unit: "ms",
        baseline: off.ms,
        ratio: on.ms / off.ms,
        goal: "(reported)",
      },
    ]);
  } finally {
    stopAll(agents, server, cleanups, data.cleanup);
  }
}, 3_600_000);
