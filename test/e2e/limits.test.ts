// A reply that cannot fit the broker's payload limit (DESIGN.md §10): the operator gets an
// error naming the limit, and the controller keeps its connection and keeps serving.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, expect, it } from "vitest";
import { loadContext } from "../../cli/context.js";
import { RpcClient } from "../../cli/rpc.js";
import { cli, cliJson, type ServerProcess, startFleet, stopAll } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const LIMIT = 64 * 1024;
const data = tempDir("fleet-limits-");
const env = { FLEET_CONTEXT: join(data.dir, "operator.json") };
let server: ServerProcess;

beforeAll(async () => {
  ({ server } = await startFleet(data.dir, {
    config: (cfg) => {
      cfg.limits.maxPayloadBytes = LIMIT;
      cfg.metricsAuth = true;
    },
  }));
  expect((await cli(["device", "add", "big-1"], env)).code).toBe(0);
}, 60_000);

afterAll(() => stopAll(server, data.cleanup));

it("a job whose device view is far over the payload limit: a clear error, and the controller serves on", async () => {
  // 1,500 tasks: the signed job fits a request, its view for one device (every task) does not.
  const tasks = Array.from({ length: 1500 }, (_, i) => ({ id: `t${i}`, type: "noop" }));
  const file = join(data.dir, "many.json");
  writeFileSync(file, JSON.stringify({ name: "many", tasks }));
  const run = await cli(["run", "-f", file, "--device", "big-1"], env);
  expect(run.code, run.stderr).toBe(1);
  expect(run.stderr).toMatch(/jobs\.show would be \d+ bytes, over the payload limit of 65536 bytes/);
  const jobs = cliJson<Array<{ id: string; name: string; devices: number }>>(
    await cli(["jobs", "ls", "--json"], env),
  );
  expect(jobs).toEqual([expect.objectContaining({ name: "many", devices: 1 })]);
  const show = await cli(["jobs", "show", jobs[0]!.id], env);
  expect(show.code).toBe(1);
  expect(show.stderr).toContain("over the payload limit of 65536 bytes");
  // Still connected, still answering.
  const dev = await cli(["device", "show", "big-1", "--json"], env);
  expect(dev.code, dev.stderr).toBe(0);
  expect(cliJson<{ jobs: Array<{ jobId: string }> }>(dev).jobs.map((j) => j.jobId)).toEqual([jobs[0]!.id]);
  const health = (await (await fetch(`${server.urls.http}/healthz`)).json()) as { controller: string };
  expect(health.controller).toBe("active");
  // metricsAuth: operators only.
  expect((await fetch(`${server.urls.http}/metrics`)).status).toBe(401);
  const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
  const auth = `Basic ${Buffer.from(`${ctx.username}:${ctx.password}`).toString("base64")}`;
  const metrics = await (
    await fetch(`${server.urls.http}/metrics`, { headers: { authorization: auth } })
  ).text();
  expect(metrics).toMatch(/fleet_events_total\{name="rpc_reply_too_large"\} 2/);
  expect(metrics).not.toContain('name="payload_too_large"');
}, 60_000);

it("a CLI whose server stops answering mid-request still exits (close is bounded)", async () => {
  const rpc = await RpcClient.open(loadContext({ context: env.FLEET_CONTEXT }));
  server.proc.kill("SIGSTOP"); // the connection stays open; nothing answers, not even a PUBACK
  try {
    await expect(rpc.call("device.ls", {}, 1000)).rejects.toThrow(/no answer/);
    const t0 = performance.now();
    await rpc.close();
    expect(performance.now() - t0).toBeLessThan(10_000); // 2 s grace; unbounded before
  } finally {
    server.proc.kill("SIGCONT");
  }
}, 30_000);
