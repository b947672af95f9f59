// `fleet server --external-broker` against the real Mosquitto from Debian: the broker enforces
// what `fleet acl export --format mosquitto` wrote ($7$ password_file, pattern ACL with %u), the
// controller, two flashed agents and the CLI all go through it, and a device cannot reach beyond
// its own topics. Mosquitto grants a denied subscription and acknowledges a denied publish, then
// drops the messages, so the matrix checks what is delivered, through an observer.
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { JobJson } from "../../proto/api.js";
import { type External, startMosquitto } from "../helpers/external.js";
import {
  type AgentProc,
  addOperator,
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

const data = tempDir("fleet-ext-");
const mdir = tempDir("fleet-mosq-");
let mosq: External;
let server: ServerProcess;
let env: Record<string, string>;
const creds: Record<string, string> = {};
const agents: AgentProc[] = [];
const cleanups: Array<() => void> = [];

function mosqTool(tool: "mosquitto_pub" | "mosquitto_sub", args: string[], timeoutMs = 8000) {
  return new Promise<{ code: number; out: string }>((res) => {
    execFile(
      tool,
      ["-h", "127.0.0.1", "-p", String(mosq.port), ...args],
      { timeout: timeoutMs, encoding: "utf8" },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : -1) : 0;
        res({ code, out: `${stdout}${stderr}` });
      },
    );
  });
}

const as = (user: string, clientId: string) => ["-i", clientId, "-u", user, "-P", creds[user]!];

/** Re-export through the running server and make Mosquitto re-read the files. */
async function reexport(): Promise<void> {
  const r = await cli(["acl", "export", "--out", mdir.dir, "--json"], env);
  expect(r.code, r.stderr).toBe(0);
  const reloads = () => mosq.log().split("Reloading config").length;
  const before = reloads();
  mosq.proc.kill("SIGHUP");
  await waitUntil("Mosquitto reloaded", () => reloads() > before, 5000);
}

beforeAll(async () => {
  expect((await cli(["init", "--dir", data.dir])).code).toBe(0);
  // The first export comes straight from the data directory: the controller needs it to get in.
  const first = await cli(["acl", "export", "--dir", data.dir, "--out", mdir.dir]);
  expect(first.code, first.stderr).toBe(0);
  expect(readFileSync(join(mdir.dir, "password_file"), "utf8")).toMatch(/^fleet-controller:\$7\$101\$/);
  // Our fleet.conf as written, but for its listener (the test uses a free loopback port).
  const conf = readFileSync(join(mdir.dir, "fleet.conf"), "utf8")
    .split("\n")
    .filter((l) => l && !l.startsWith("#") && !l.startsWith("listener") && !l.startsWith("persistence"));
  mosq = await startMosquitto(mdir.dir, [...conf, "persistence false"]);
  server = await startServer(data.dir, [0, 0, 0, 0, 0], ["--external-broker", mosq.url]);
  expect(server.urls.mqtt).toBe(mosq.url);
  env = { FLEET_CONTEXT: setContextServer(data.dir, mosq.url) };
  const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
  creds[ctx.username] = ctx.password;
  const cfg = JSON.parse(readFileSync(join(data.dir, "server.json"), "utf8"));
  creds["fleet-controller"] = cfg.controller.password;
  const roots: string[] = [];
  for (const id of ["dev-a", "dev-b"]) {
    const { root, cleanup } = await flashMoved(id, env, ["--label", "site=ext"]);
    cleanups.push(cleanup);
    roots.push(root);
    creds[id] = JSON.parse(readFileSync(join(root, "etc", "fleet-agent", "config.json"), "utf8")).password;
  }
  await reexport();
  for (const root of roots) agents.push(startAgent(root));
  await waitOnline(env, "dev-a");
  await waitOnline(env, "dev-b");
}, 120_000);

afterAll(async () => {
  for (const a of agents) a.proc.kill("SIGKILL");
  server?.proc.kill("SIGKILL");
  mosq?.stop();
  for (const c of cleanups) c();
  data.cleanup();
  mdir.cleanup();
});

describe("fleet server --external-broker with Mosquitto", () => {
  it("runs a job on both agents through Mosquitto", async () => {
    const r = await cli(["run", "noop", "--selector", "site=ext", "--wait", "--json"], env);
    expect(r.code, r.stderr).toBe(0);
    const job = cliJson<JobJson>(r);
    expect(job.state).toBe("SUCCEEDED");
    expect(job.devices.map((d) => [d.deviceId, d.state]).sort()).toEqual([
      ["dev-a", "SUCCEEDED"],
      ["dev-b", "SUCCEEDED"],
    ]);
  });

  it("the ACL export over HTTP is for operators only", async () => {
    const url = `${server.urls.http}/v1/acl/mosquitto`;
    const basic = (u: string) => ({
      authorization: `Basic ${Buffer.from(`${u}:${creds[u]}`).toString("base64")}`,
    });
    const none = await fetch(url);
    expect([none.status, ((await none.json()) as { error: string }).error]).toEqual([
      401,
      "authentication required",
    ]);
    const device = await fetch(url, { headers: basic("dev-a") });
    expect([device.status, ((await device.json()) as { error: string }).error]).toEqual([
      403,
      "operators only",
    ]);
    const ok = await fetch(url, { headers: basic("admin") });
    expect(ok.status).toBe(200);
    const body = (await ok.json()) as { passwordFile: string; skipped: unknown[] };
    expect(body.passwordFile).toMatch(/^dev-a:\$7\$101\$/m);
    expect(body.skipped).toEqual([]);
  });

  it("refuses bad, missing and unknown credentials", async () => {
    for (const args of [
      ["-i", "dev-a", "-u", "dev-a", "-P", "not-the-token"],
      ["-i", "dev-a"],
      ["-i", "ghost", "-u", "ghost", "-P", "x"],
    ]) {
      const r = await mosqTool("mosquitto_pub", [...args, "-t", "fleet/v1/d/dev-a/status", "-m", "x"]);
      expect(r.code).not.toBe(0);
      expect(r.out).toMatch(/not authori[sz]ed|refused/i);
    }
  });

  it("a device receives nothing from other devices' topics, whatever it subscribes to", async () => {
    const denied = [
      "fleet/v1/d/dev-b/job",
      "fleet/v1/d/dev-b/ctl",
      "fleet/v1/d/dev-b/status",
      "fleet/v1/d/dev-b/state",
      "fleet/v1/d/+/job",
      "fleet/v1/#",
      "#",
      "fleet/v1/rpc/res/#",
      "fleet/v1/events",
      "$SYS/#",
    ];
    const listener = mosqTool(
      "mosquitto_sub",
      [
        ...as("dev-a", "dev-a-probe"),
        "-v",
        "-W",
        "4",
        ...[...denied, "fleet/v1/d/dev-a/ctl"].flatMap((t) => ["-t", t]),
      ],
      8000,
    );
    await new Promise((r) => setTimeout(r, 700));
    for (const t of ["d/dev-b/job", "d/dev-b/ctl", "d/dev-b/status", "rpc/res/admin/op-admin-1", "events"]) {
      const r = await mosqTool("mosquitto_pub", [
        ...as("fleet-controller", "probe-ctl"),
        "-t",
        `fleet/v1/${t}`,
        "-q",
        "1",
        "-m",
        `secret ${t}`,
      ]);
      expect(r.code).toBe(0);
    }
    // The one message it may get, on its own ctl topic (the agent drops it as a bad payload).
    await mosqTool("mosquitto_pub", [
      ...as("fleet-controller", "probe-ctl"),
      "-t",
      "fleet/v1/d/dev-a/ctl",
      "-q",
      "1",
      "-m",
      "mine",
    ]);
    const lines = (await listener).out.split("\n").filter((l) => l.startsWith("fleet/") || l.startsWith("$"));
    // dev-b's retained state would show up under `#` and `fleet/v1/#` if the ACL let it through.
    expect(lines).toEqual(["fleet/v1/d/dev-a/ctl mine"]);
  }, 20_000);

  it("what a device publishes beyond its own topics never arrives", async () => {
    const observer = mosqTool(
      "mosquitto_sub",
      [
        ...as("fleet-controller", "probe-observer"),
        "-v",
        "-W",
        "4",
        "-t",
        "fleet/v1/#",
        "-T",
        "fleet/v1/d/+/state",
      ],
      8000,
    );
    await new Promise((r) => setTimeout(r, 700));
    for (const t of [
      "d/dev-b/status",
      "d/dev-b/state",
      "d/dev-b/sync",
      "d/dev-a/job",
      "d/dev-a/ctl",
      "rpc/req",
      "events",
      "rpc/res/admin/op-admin-1",
    ]) {
      await mosqTool("mosquitto_pub", [
        ...as("dev-a", "dev-a-probe"),
        "-t",
        `fleet/v1/${t}`,
        "-q",
        "1",
        "-m",
        `forged ${t}`,
      ]);
    }
    await mosqTool("mosquitto_pub", [
      ...as("dev-a", "dev-a-probe"),
      "-t",
      "fleet/v1/d/dev-a/telemetry",
      "-q",
      "1",
      "-m",
      "marker",
    ]);
    const lines = (await observer).out
      .split("\n")
      .filter((l) => l.includes("forged") || l.includes("marker"));
    expect(lines).toEqual(["fleet/v1/d/dev-a/telemetry marker"]);
  }, 20_000);

  it("a device added later gets in after re-export + SIGHUP; a removed one is shut out", async () => {
    const add = cliJson<{ password: string }>(await cli(["device", "add", "late-1", "--json"], env));
    creds["late-1"] = add.password;
    const pub = () =>
      mosqTool("mosquitto_pub", [...as("late-1", "late-1"), "-t", "fleet/v1/d/late-1/telemetry", "-m", "x"]);
    expect((await pub()).code).not.toBe(0); // not in password_file yet
    await reexport();
    expect((await pub()).code).toBe(0);
    expect((await cli(["device", "rm", "late-1"], env)).code).toBe(0);
    await reexport();
    const r = await pub();
    expect(r.code).not.toBe(0);
    expect(r.out).toMatch(/not authori[sz]ed|refused/i);
  }, 30_000);

  it("H8: an operator reads only its own replies; a device cannot take the controller's session", async () => {
    // A second operator: the server restarted to know her, the files exported again.
    await addOperator(data.dir, "eve", "eve-pass");
    creds.eve = "eve-pass";
    server.proc.kill("SIGTERM");
    await server.exited;
    server = await startServer(data.dir, [0, 0, 0, 0, 0], ["--external-broker", mosq.url]);
    await reexport();
    // Eve listens to every reply topic she can; admin asks for the fleet (with device tokens
    // in other replies, e.g. device add).
    const spy = mosqTool(
      "mosquitto_sub",
      [...as("eve", "op-eve-spy"), "-t", "fleet/v1/rpc/res/#", "-v", "-W", "4"],
      8000,
    );
    await new Promise((r) => setTimeout(r, 700));
    // A device connecting with the controller's former fixed client id: the controller (now a
    // random id) keeps its session.
    await mosqTool("mosquitto_pub", [
      ...as("dev-a", "fleet-controller"),
      "-t",
      "fleet/v1/d/dev-a/telemetry",
      "-m",
      "x",
    ]);
    const add = await cli(["device", "add", "h8-dev", "--json"], env);
    expect(add.code, add.stderr).toBe(0);
    expect((await spy).out).not.toContain("fleet/v1/rpc/res/admin/");
    expect((await cli(["device", "ls", "--json"], env)).code).toBe(0);
    expect(server.stderr()).not.toContain("the controller lost its broker connection");
  }, 30_000);

  it("/healthz says so when the controller has lost its broker", async () => {
    const health = async () => {
      const res = await fetch(`${server.urls.http}/healthz`);
      return { status: res.status, body: (await res.json()) as { ok: boolean; controller: string } };
    };
    expect(await health()).toEqual({
      status: 200,
      body: expect.objectContaining({ ok: true, controller: "active" }),
    });
    mosq.stop();
    const down = await waitUntil("healthz to report the lost broker", async () => {
      const h = await health();
      return h.status === 503 ? h : undefined;
    });
    expect(down.body).toMatchObject({ ok: false, controller: "disconnected" });
  });
});
