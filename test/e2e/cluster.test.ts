// `fleet server --cluster redis://…` with Debian's redis-server: two broker nodes share
// subscriptions, sessions and retained messages through Redis, and exactly one runs the
// controller (a lease in Redis). An agent on node A, the CLI on node B; node A is SIGKILLed
// while the agent runs a job: the agent moves to node B (its second broker URL), node B takes
// the lease over, and the job converges.
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { JobJson } from "../../proto/api.js";
import { type External, startRedis } from "../helpers/external.js";
import {
  type AgentProc,
  cli,
  cliJson,
  flashMoved,
  type ServerProcess,
  setContextServer,
  startAgent,
  startServer,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-cluster-");
let redis: External;
const nodes: Record<string, ServerProcess> = {};
let env: Record<string, string>;
let agent: AgentProc;
const cleanups: Array<() => void> = [];

const node = (id: string) =>
  startServer(data.dir, [0, 0, 0, 0, 0], ["--cluster", redis.url, "--node-id", id, "--lease-ms", "3000"]);

async function health(n: ServerProcess): Promise<{ controller: string; node: string }> {
  return (await (await fetch(`${n.urls.http}/healthz`)).json()) as { controller: string; node: string };
}

beforeAll(async () => {
  redis = await startRedis();
  expect((await cli(["init", "--dir", data.dir])).code).toBe(0);
  nodes.A = await node("A");
  await waitUntil("node A runs the controller", async () => (await health(nodes.A!)).controller === "active");
  nodes.B = await node("B");
  env = { FLEET_CONTEXT: setContextServer(data.dir, nodes.B.urls.mqtt) };
  const { root, cleanup } = await flashMoved("dev-c", env, [
    "--broker",
    `${nodes.A.urls.mqtt},${nodes.B.urls.mqtt}`,
  ]);
  cleanups.push(cleanup);
  const cfg = JSON.parse(readFileSync(join(root, "etc", "fleet-agent", "config.json"), "utf8"));
  expect(cfg.brokers).toEqual([nodes.A.urls.mqtt, nodes.B.urls.mqtt]);
  agent = startAgent(root);
  await waitOnline(env, "dev-c");
}, 120_000);

afterAll(() => {
  agent?.proc.kill("SIGKILL");
  for (const n of Object.values(nodes)) n.proc.kill("SIGKILL");
  redis?.stop();
  for (const c of cleanups) c();
  data.cleanup();
});

describe("fleet server --cluster", () => {
  it("one controller: node B is a standby that still serves MQTT", async () => {
    expect(await health(nodes.A!)).toMatchObject({ controller: "active", node: "A" });
    expect(await health(nodes.B!)).toMatchObject({ controller: "standby", node: "B" });
    // The standby has no registry or artifact store of its own to answer from.
    expect((await fetch(`${nodes.B!.urls.http}/v1/artifacts`)).status).toBe(503);
    // The CLI on node B reached the controller on node A, and the agent on node A is online.
    expect(agent.stderr()).toContain(`"broker":"${nodes.A!.urls.mqtt}"`);
    const r = await cli(["run", "noop", "--device", "dev-c", "--wait", "--json"], env);
    expect(cliJson<JobJson>(r).state).toBe("SUCCEEDED");
  });

  it("node A SIGKILLed mid-job: the agent moves to node B, node B takes over, the job converges", async () => {
    const sent = cliJson<JobJson>(
      await cli(["run", "sleep", "--param", "seconds=5", "--device", "dev-c", "--json"], env),
    );
    const show = async () => cliJson<JobJson>(await cli(["jobs", "show", sent.id, "--json"], env));
    // Acknowledged: RUNNING, or on a machine so busy that a CLI poll outlasts the nap, done.
    await waitUntil("the job runs", async () => ["RUNNING", "SUCCEEDED"].includes((await show()).state));
    nodes.A!.proc.kill("SIGKILL");
    await nodes.A!.exited;
    await waitUntil(
      "node B runs the controller",
      async () => (await health(nodes.B!)).controller === "active",
    );
    const done = await waitUntil(
      "the job converges",
      async () => {
        const j = await show().catch(() => undefined);
        return j && j.state === "SUCCEEDED" ? j : undefined;
      },
      60_000,
    );
    expect(done.devices).toHaveLength(1);
    expect(done.devices[0]!.tasks.map((t) => [t.state, t.attempt])).toEqual([["SUCCEEDED", 1]]);
    expect(agent.stderr()).toContain(`"broker":"${nodes.B!.urls.mqtt}"`);
    // And the cluster keeps working on node B alone.
    const again = await cli(["run", "noop", "--device", "dev-c", "--wait", "--json"], env);
    expect(cliJson<JobJson>(again).state).toBe("SUCCEEDED");
  }, 90_000);

  it("a leader whose lease another node holds stops at once: the process exits 1 and says why (fail-stop)", async () => {
    // Another holder, as after a pause longer than the lease: node B's next renewal finds it.
    const port = new URL(redis.url).port;
    execFileSync("redis-cli", ["-p", port, "SET", "edgefleet:fleet/v1:controller-lease", "Z", "PX", "60000"]);
    expect(await nodes.B!.exited).toBe(1);
    expect(nodes.B!.stderr()).toMatch(/the controller lease is held by another node or expired/);
    expect(nodes.B!.stderr()).toContain(
      "fleet: the server stopped (exit code 1): the controller lease is held by another node or expired",
    );
  }, 30_000);
});
