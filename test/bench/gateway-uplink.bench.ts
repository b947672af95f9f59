// B8 gateway uplink (issue 12): a one-wave noop rollout to N simulated devices behind one site
// gateway against the same rollout to N devices connected directly, in the same run: time, and
// the messages that crossed the site's uplink (the gateway's own counters, as it reports them
// in its DeviceState), against the messages a direct fleet exchanges with the center.
import type { ChildProcess } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { it } from "vitest";
import { freePort } from "../helpers/external.js";
import {
  type AgentProc,
  cli,
  cliJson,
  flashMoved,
  simulate,
  startAgent,
  startFleet,
  stopAll,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_SITE_DEVICES ?? 1000);
const ROUNDS = 5;

it(`B8: rollout to ${N} devices behind one gateway vs ${N} connected directly`, async () => {
  const data = tempDir("fleet-bench-gw-");
  const { server, env } = await startFleet(data.dir, {
    config: (cfg) => {
      cfg.limits.connectsPerSecondPerAddress = 100_000;
    },
  });
  const sims: ChildProcess[] = [];
  let gw: AgentProc | undefined;
  const cleanups: Array<() => void> = [];
  try {
    const port = await freePort();
    const flashed = await flashMoved("gw-b8", env, [
      "--gateway",
      "--gateway-host",
      "127.0.0.1",
      "--gateway-port",
      String(port),
    ]);
    cleanups.push(flashed.cleanup);
    gw = startAgent(flashed.root);
    await waitOnline(env, "gw-b8");
    sims.push(
      await simulate(env, [
        "--devices",
        String(N),
        "--prefix",
        "site-",
        "--label",
        "pool=site",
        "--via",
        "gw-b8",
      ]),
    );
    sims.push(await simulate(env, ["--devices", String(N), "--prefix", "dir-", "--label", "pool=direct"]));
    const noop = join(data.dir, "noop.yaml");
    writeFileSync(noop, "name: noop-b8\ntasks:\n  - { id: a, type: noop }\n");
    const rollout = async (pool: string) => {
      const t = performance.now();
      const r = await cli(
        [
          "rollout",
          "create",
          "-f",
          noop,
          "--selector",
          `pool=${pool}`,
          "--waves",
          "100%",
          "--wait",
          "--json",
        ],
        env,
        600_000,
      );
      if (r.code !== 0) throw new Error(`rollout to ${pool}: ${r.stderr}`);
      return performance.now() - t;
    };
    const counters = async () => {
      // A job on the gateway itself makes it publish its state (and counters); it does so at
      // most every 2 s, so the figures are read once they stop changing.
      await cli(["run", "noop", "--device", "gw-b8", "--wait"], env);
      const read = async () =>
        cliJson<{ counters?: Record<string, number> }>(await cli(["device", "show", "gw-b8", "--json"], env))
          .counters ?? {};
      let last = JSON.stringify(await read());
      for (;;) {
        await new Promise((r) => setTimeout(r, 2500));
        const now = await read();
        if (JSON.stringify(now) === last) return now;
        last = JSON.stringify(now);
      }
    };
    // Alternating rounds, medians: one rollout's time varies with the controller's 250 ms step.
    const direct: number[] = [];
    const site: number[] = [];
    const before = await counters();
    for (let i = 0; i < ROUNDS; i++) {
      direct.push(await rollout("direct"));
      site.push(await rollout("site"));
    }
    const after = await counters();
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const directMs = median(direct);
    const siteMs = median(site);
    const delta = (k: string) => ((after[k] ?? 0) - (before[k] ?? 0)) / ROUNDS;
    // Up: site status messages and other relayed publishes; down: job hand-offs, site acks and
    // relayed messages (StatusAcks, cancels). The gateway's own job (for the counters) is a few of these.
    const up = delta("gateway_site_status_sent") + delta("gateway_relayed_up");
    const down =
      delta("gateway_site_jobs_in") + delta("gateway_site_acks_in") + delta("gateway_relayed_down");
    // Direct: each device received its assignment and at least one StatusAck, and sent at
    // least one status batch: a lower bound of 3 messages per device.
    const directMessages = 3 * N;
    report("B8-gateway-uplink", [
      {
        name: `rollout to ${N} devices behind one gateway, created -> all SUCCEEDED (median of ${ROUNDS})`,
        value: siteMs,
        unit: "ms",
        baseline: directMs,
        ratio: siteMs / directMs,
        goal: "<= 1 (time <= direct)",
      },
      {
        name: `uplink messages per job, ${Math.round((delta("gateway_up_bytes") + delta("gateway_down_bytes")) / 1024)} KiB (up ${up.toFixed(1)}: site statuses + relayed; down ${down.toFixed(1)}: job hand-offs ${delta("gateway_site_jobs_in")} + site acks ${delta("gateway_site_acks_in")} + relayed)`,
        value: up + down,
        unit: "msgs",
        baseline: directMessages,
        ratio: (up + down) / directMessages,
        goal: "<= 0.01 of direct (lower bound 3 per device)",
      },
    ]);
  } finally {
    stopAll(sims, gw, server, cleanups, data.cleanup);
  }
}, 1_200_000);
