// Site gateways (issue 12, DESIGN.md §11), first part: real processes — the server, a flashed
// gateway, devices flashed behind it and moved to other roots — and Debian's mosquitto clients
// for the ACL through the gateway and at the center.
import { readFileSync, writeFileSync } from "node:fs";
import { request as httpsRequest } from "node:https";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import mqtt from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { DeviceJson, JobJson } from "../../proto/api.js";
import { encodeEnvelope } from "../../proto/envelope.js";
import { freePort, mosquittoClient } from "../helpers/external.js";
import {
  type AgentProc,
  cli,
  cliJson,
  flashMoved,
  type ServerProcess,
  simulate,
  startAgent,
  startFleet,
  startServer,
  startWatch,
  stopAll,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-gw-");
let server: ServerProcess;
let env: Record<string, string>;
let gwPort = 0;
/** Simulated devices behind the gateway in the scale step (the bench B8 goes to 1,000). */
const SITE_SIM = 400;
let dashPort = 0;

/** A request to the gateway's dashboard (HTTPS, the fleet CA). */
function dashboard(path: string, o: { cookie?: string; form?: Record<string, string> } = {}) {
  return new Promise<{ status: number; cookie?: string; body: string }>((resolve, reject) => {
    const body = o.form ? new URLSearchParams(o.form).toString() : undefined;
    const req = httpsRequest(
      `https://127.0.0.1:${dashPort}${path}`,
      {
        method: body ? "POST" : "GET",
        ca: readFileSync(caFile()),
        headers: {
          ...(o.cookie ? { cookie: o.cookie } : {}),
          ...(body ? { "content-type": "application/x-www-form-urlencoded" } : {}),
        },
        agent: false,
      },
      (res) => {
        let text = "";
        res.on("data", (d) => {
          text += d;
        });
        res.on("end", () =>
          resolve({
            status: res.statusCode ?? 0,
            cookie: res.headers["set-cookie"]?.[0]?.split(";")[0],
            body: text,
          }),
        );
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}
const roots = new Map<string, string>();
const agents = new Map<string, AgentProc>();
const cleanups: Array<() => void> = [];

const configOf = (id: string) =>
  JSON.parse(readFileSync(join(roots.get(id)!, "etc", "fleet-agent", "config.json"), "utf8"));
const caFile = () => join(roots.get("gw-1")!, "etc", "fleet-agent", "ca.pem");

function mosq(tool: "mosquitto_pub" | "mosquitto_sub", port: number, args: string[], tls = true) {
  const ca = tls ? ["--cafile", caFile()] : [];
  return mosquittoClient(tool, ["-h", "127.0.0.1", "-p", String(port), ...ca, ...args]);
}
const as = (id: string) => ["-i", id, "-u", id, "-P", configOf(id).password as string];

async function flash(id: string, args: string[]) {
  const { root, cleanup } = await flashMoved(id, env, args);
  roots.set(id, root);
  cleanups.push(cleanup);
}

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir));
  gwPort = await freePort();
  await flash("gw-1", [
    "--gateway",
    "--gateway-host",
    "127.0.0.1",
    "--gateway-port",
    String(gwPort),
    "--label",
    "site=hall",
  ]);
  // The site's dashboard on a free port (the default 8443 may be the center's on this machine).
  dashPort = await freePort();
  const gwFile = join(roots.get("gw-1")!, "etc", "fleet-agent", "config.json");
  const gwCfg = configOf("gw-1");
  gwCfg.gateway.dashboardPort = dashPort;
  writeFileSync(gwFile, JSON.stringify(gwCfg), { mode: 0o600 });
  agents.set("gw-1", startAgent(roots.get("gw-1")!));
  await waitOnline(env, "gw-1");
  await flash("dev-1", ["--via", "gw-1", "--label", "site=hall"]);
  // Its only broker is the gateway.
  const file = join(roots.get("dev-1")!, "etc", "fleet-agent", "config.json");
  const cfg = configOf("dev-1");
  expect(cfg.brokers).toEqual([`mqtts://127.0.0.1:${gwPort}`, server.urls.mqtt]);
  cfg.brokers = [cfg.brokers[0]];
  writeFileSync(file, JSON.stringify(cfg), { mode: 0o600 });
  agents.set("dev-1", startAgent(roots.get("dev-1")!));
  await waitOnline(env, "dev-1");
  // A device of another site (behind a gateway that is not running) and one without a gateway.
  await flash("gw-2", [
    "--gateway",
    "--gateway-host",
    "127.0.0.1",
    "--gateway-port",
    String(await freePort()),
  ]);
  await flash("dev-2", ["--via", "gw-2"]);
  await flash("dev-9", []);
}, 120_000);

afterAll(() => stopAll(agents.values(), server, cleanups, data.cleanup));

describe("site gateway", () => {
  it("a device whose only broker is the gateway runs jobs and reports; device ls shows via", async () => {
    const r = await cli(["run", "noop", "--device", "dev-1", "--wait", "--json"], env);
    expect(r.code).toBe(0);
    expect(cliJson<JobJson>(r)).toMatchObject({
      state: "SUCCEEDED",
      devices: [{ deviceId: "dev-1", state: "SUCCEEDED" }],
    });
    const ls = cliJson<DeviceJson[]>(await cli(["device", "ls", "--json"], env));
    expect(ls.find((d) => d.id === "dev-1")).toMatchObject({ online: true, via: "gw-1" });
    expect(ls.find((d) => d.id === "gw-1")).toMatchObject({
      gateway: { hosts: ["127.0.0.1"], port: gwPort },
    });
    const bad = await cli(["flash", "x-1", "--via", "dev-9", "--root", join(data.dir, "x-1")], env);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain("dev-9 is not a gateway");
  }, 60_000);

  it("the gateway applies the same ACL to its devices (mosquitto clients)", async () => {
    for (const topic of ["fleet/v1/d/dev-2/job", "fleet/v1/d/+/ctl", "#"]) {
      const r = await mosq("mosquitto_sub", gwPort, [
        ...as("dev-1"),
        "-i",
        "dev-1-probe",
        "-t",
        topic,
        "-W",
        "2",
      ]);
      // The client id must be the device id: a probe with another id is refused outright.
      expect(r.out).toMatch(/refused|identifier rejected/i);
    }
    // With its own id (the agent's session is taken over for a moment, then it reconnects).
    const sub = await mosq("mosquitto_sub", gwPort, [
      ...as("dev-1"),
      "-t",
      "fleet/v1/d/dev-2/job",
      "-W",
      "2",
    ]);
    expect(sub.out).toContain("All subscription requests were denied");
    const pub = await mosq("mosquitto_pub", gwPort, [
      ...as("dev-1"),
      "-t",
      "fleet/v1/d/dev-2/status",
      "-q",
      "1",
      "-m",
      "x",
    ]);
    expect(pub.code).not.toBe(0);
    await waitOnline(env, "dev-1");
  }, 60_000);

  it("an unauthenticated client announcing a huge packet is cut off at its header (the center's H1 limit)", async () => {
    const socket = tlsConnect({ host: "127.0.0.1", port: gwPort, ca: readFileSync(caFile()) });
    await new Promise<void>((r) => socket.once("secureConnect", () => r()));
    const closed = new Promise<void>((r) => socket.once("close", () => r()));
    // A PUBLISH fixed header claiming 200 MiB of body, before any CONNECT.
    socket.write(Buffer.from([0x30, 0x80, 0x80, 0x80, 0x64]));
    socket.write(Buffer.alloc(1024));
    await closed;
    await waitUntil("the gateway logged it", () =>
      agents.get("gw-1")!.stderr().includes("packet over the limit"),
    );
  });

  it("a device of another site, one without a gateway, and an unknown one are refused by the gateway", async () => {
    for (const id of ["dev-2", "dev-9", "gw-2"]) {
      const r = await mosq("mosquitto_pub", gwPort, [...as(id), "-t", `fleet/v1/d/${id}/status`, "-m", "x"]);
      expect(r.code, id).not.toBe(0);
      expect(r.out).toMatch(/bad user name or password|not authori[sz]ed|refused/i);
    }
    const ghost = await mosq("mosquitto_pub", gwPort, [
      "-i",
      "ghost",
      "-u",
      "ghost",
      "-P",
      "x",
      "-t",
      "a",
      "-m",
      "x",
    ]);
    expect(ghost.code).not.toBe(0);
  });

  it("at the center, a gateway acts for exactly the devices behind it", async () => {
    const center = Number(server.urls.mqtt.split(":").pop());
    const gw = ["-i", "gw-1-probe", "-u", "gw-1", "-P", configOf("gw-1").password as string];
    // Its own client id is taken by the running gateway: probes use their own and are refused, so
    // ask with the gateway's id only where the outcome is a SUBACK or a closed connection.
    expect(
      (await mosq("mosquitto_sub", center, [...gw, "-t", "fleet/v1/d/dev-1/job", "-W", "1"], false)).out,
    ).toMatch(/refused|identifier rejected/i);
    const asGw = ["-i", "gw-1", "-u", "gw-1", "-P", configOf("gw-1").password as string];
    const mine = await mosq(
      "mosquitto_sub",
      center,
      [...asGw, "-t", "fleet/v1/d/dev-1/job", "-W", "1"],
      false,
    );
    expect(mine.out).not.toContain("denied");
    const other = await mosq(
      "mosquitto_sub",
      center,
      [...asGw, "-t", "fleet/v1/d/dev-9/job", "-W", "1"],
      false,
    );
    expect(other.out).toContain("All subscription requests were denied");
    const forge = await mosq(
      "mosquitto_pub",
      center,
      [...asGw, "-t", "fleet/v1/d/dev-9/status", "-q", "1", "-m", "x"],
      false,
    );
    expect(forge.code).not.toBe(0);
    await waitOnline(env, "gw-1");
    await waitOnline(env, "dev-1");
  }, 60_000);

  it("the center takes site statuses from a gateway only for devices behind it", async () => {
    const metrics = async () => {
      const text = await (await fetch(`${server.urls.http}/metrics`)).text();
      return Number(/fleet_events_total\{name="dropped_site_status_not_behind"\} (\d+)/.exec(text)?.[1] ?? 0);
    };
    const before = await metrics();
    const forged = encodeEnvelope({
      siteStatus: {
        batches: [{ deviceId: "dev-9", batch: { statuses: [{ seq: 1, jobId: "X", taskId: "", state: 2 }] } }],
      },
    });
    const c = await mqtt.connectAsync(server.urls.mqtt, {
      clientId: "gw-1",
      username: "gw-1",
      password: configOf("gw-1").password as string,
    });
    await c.publishAsync("fleet/v1/d/gw-1/status", Buffer.from(forged), { qos: 1 });
    await c.endAsync();
    await waitUntil("refused and counted", async () => (await metrics()) > before);
    await waitOnline(env, "gw-1");
  }, 60_000);

  const taskOf = async (jobId: string) => {
    const j = cliJson<JobJson>(await cli(["jobs", "show", jobId, "--json"], env));
    return { state: j.state, task: j.devices[0]?.tasks[0] };
  };
  const startSleep = async (seconds: number) => {
    const r = await cli(
      ["run", "sleep", "--device", "dev-1", "--param", `seconds=${seconds}`, "--json"],
      env,
    );
    expect(r.code).toBe(0);
    const id = cliJson<JobJson>(r).id;
    // Started: RUNNING, or on a machine so busy that a CLI poll outlasts the nap, already done
    // (waiting for RUNNING alone would then wait for ever).
    await waitUntil("the task running", async () =>
      ["RUNNING", "SUCCEEDED"].includes((await taskOf(id)).task?.state ?? ""),
    );
    return id;
  };

  const converged = (id: string) =>
    waitUntil(
      `job ${id} SUCCEEDED at the center`,
      async () => {
        const t = await taskOf(id);
        return t.state === "SUCCEEDED" ? t : undefined;
      },
      60_000,
    );

  it("with the center SIGKILLed, the site's job runs on, a LAN operator runs a job at the gateway, and everything converges when it returns", async () => {
    const atGateway = (args: string[]) => cli([...args, "--server", `mqtts://127.0.0.1:${gwPort}`], env);
    // With the center reachable, jobs are run there.
    const early = await atGateway(["run", "noop", "--device", "dev-1"]);
    expect(early.code).not.toBe(0);
    expect(early.stderr).toMatch(/the center is reachable: run jobs there/);
    const id = await startSleep(5);
    server.proc.kill("SIGKILL");
    await server.exited;
    // Local control: signed by the operator, checked by the gateway, for its own devices only.
    const local = await atGateway([
      "run",
      "sleep",
      "--param",
      "seconds=1",
      "--device",
      "dev-1",
      "--wait",
      "--json",
    ]);
    expect(local.stderr).toBe("");
    const siteJob = cliJson<JobJson>(local);
    expect(siteJob).toMatchObject({ state: "SUCCEEDED", origin: "site" });
    expect(siteJob.devices.map((d) => [d.deviceId, d.state])).toEqual([["dev-1", "SUCCEEDED"]]);
    const other = await atGateway(["run", "noop", "--device", "dev-2"]);
    expect(other.code).not.toBe(0);
    expect(other.stderr).toMatch(/not a device of this gateway's site: dev-2/);
    const ls = cliJson<Array<{ id: string; origin: string }>>(await atGateway(["jobs", "ls", "--json"]));
    expect(ls.map((j) => j.id)).toEqual([siteJob.id]);
    const devices = cliJson<DeviceJson[]>(await atGateway(["device", "ls", "--json"]));
    expect(devices.find((d) => d.id === "dev-1")).toMatchObject({ online: true, via: "gw-1" });
    // The site's dashboard, served by the gateway with the operators the center sent it.
    const op = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
    expect((await dashboard("/jobs")).status).toBe(303);
    const bad = await dashboard("/login", { form: { username: op.username, password: "wrong" } });
    expect(bad.body).toContain("Wrong operator name or password.");
    const login = await dashboard("/login", { form: { username: op.username, password: op.password } });
    expect(login.status).toBe(303);
    const jobsPage = await dashboard("/jobs", { cookie: login.cookie! });
    expect(jobsPage.body).toContain(siteJob.id);
    expect((await dashboard(`/jobs/${siteJob.id}`, { cookie: login.cookie! })).body).toContain("SUCCEEDED");
    expect((await dashboard("/devices?selector=site%3Dhall", { cookie: login.cookie! })).body).toContain(
      "dev-1",
    );
    expect((await dashboard("/static/uPlot.iife.min.js")).status).toBe(200);
    // The first job ends while the center is gone (the noop before it, the LAN sleep, and it).
    await waitUntil(
      "the first job done",
      () =>
        (agents
          .get("dev-1")!
          .stderr()
          .match(/"msg":"task succeeded"/g)?.length ?? 0) >= 3,
    );
    server = await startServer(data.dir, server.ports);
    const done = await converged(id);
    expect(done.task).toMatchObject({ state: "SUCCEEDED", attempt: 1 });
    // What the site sent while the center was gone was kept by the gateway and sent after.
    expect(agents.get("gw-1")!.stderr()).toMatch(
      /"msg":"sent what the site queued while the uplink was down"/,
    );
    // The center learns of the site's job (origin site) and of its outcome.
    const atCenter = await waitUntil("the site job at the center", async () => {
      const r = await cli(["jobs", "show", siteJob.id, "--json"], env);
      const j = r.code === 0 ? cliJson<JobJson & { origin?: string; site?: string }>(r) : undefined;
      return j?.state === "SUCCEEDED" ? j : undefined;
    });
    expect(atCenter).toMatchObject({ origin: "site", site: "gw-1" });
    expect(atCenter.devices.map((d) => [d.deviceId, d.state, d.tasks[0]?.attempt])).toEqual([
      ["dev-1", "SUCCEEDED", 1],
    ]);
    const listed = cliJson<Array<{ id: string; origin?: string }>>(await cli(["jobs", "ls", "--json"], env));
    expect(listed.find((j) => j.id === siteJob.id)?.origin).toBe("site");
    const audit = await cli(["audit", "ls", "--json"], env);
    expect(audit.stdout).toContain(`run at site gw-1`);
  }, 120_000);

  it("the gateway SIGKILLed mid-job: nothing lost, nothing run twice", async () => {
    const id = await startSleep(4);
    const gw = agents.get("gw-1")!;
    gw.proc.kill("SIGKILL");
    await gw.exited;
    // The center learns the site is cut off (the gateway's will), not only the gateway.
    await waitOnline(env, "dev-1", false);
    agents.set("gw-1", startAgent(roots.get("gw-1")!));
    const done = await converged(id);
    expect(done.task).toMatchObject({ state: "SUCCEEDED", attempt: 1 });
    expect(
      agents
        .get("dev-1")!
        .stderr()
        .match(/"msg":"task succeeded"/g)?.length,
    ).toBe(4); // noop, two sleeps, and the LAN operator's sleep
  }, 120_000);

  it("a device that also lists the center falls back to it while the gateway is gone, and returns", async () => {
    await flash("dev-3", ["--via", "gw-1", "--label", "site=hall"]);
    const file = join(roots.get("dev-3")!, "etc", "fleet-agent", "config.json");
    const cfg = configOf("dev-3");
    cfg.reconnect = { minMs: 200, maxMs: 1000, preferFirstAfterS: 2 };
    writeFileSync(file, JSON.stringify(cfg), { mode: 0o600 });
    agents.set("dev-3", startAgent(roots.get("dev-3")!));
    const log = () => agents.get("dev-3")!.stderr();
    const connectedTo = (url: string) =>
      (log().match(new RegExp(`"broker":"${url}[^}]*"msg":"connected"`, "g")) ?? []).length;
    const gwUrl = `mqtts://127.0.0.1:${gwPort}`;
    await waitUntil("dev-3 through the gateway", () => connectedTo(gwUrl) >= 1);
    const gw = agents.get("gw-1")!;
    gw.proc.kill("SIGKILL");
    await gw.exited;
    await waitUntil("dev-3 fell back to the center", () => connectedTo(server.urls.mqtt) >= 1, 30_000);
    await waitOnline(env, "dev-3");
    agents.set("gw-1", startAgent(roots.get("gw-1")!));
    await waitUntil("dev-3 back through the gateway", () => connectedTo(gwUrl) >= 2, 30_000);
    const r = await cli(["run", "noop", "--device", "dev-3", "--wait"], env);
    expect(r.code).toBe(0);
  }, 120_000);

  it("a job for several devices of the site crosses the uplink once; each device reports its own", async () => {
    await waitOnline(env, "dev-1");
    await waitOnline(env, "dev-3");
    const before =
      agents
        .get("gw-1")!
        .stderr()
        .match(/handed a job to the site's devices/g)?.length ?? 0;
    const r = await cli(["run", "noop", "--selector", "site=hall", "--wait", "--json"], env);
    expect(r.code).toBe(0);
    const job = cliJson<JobJson>(r);
    expect(job.devices.map((d) => [d.deviceId, d.state]).sort()).toEqual([
      ["dev-1", "SUCCEEDED"],
      ["dev-3", "SUCCEEDED"],
      ["gw-1", "SUCCEEDED"],
    ]);
    const log = agents.get("gw-1")!.stderr();
    expect(log.match(/handed a job to the site's devices/g)?.length).toBe(before + 1);
    expect(log).toMatch(/"devices":2,"of":2,"msg":"handed a job to the site's devices"/);
  }, 60_000);

  it("simulated devices behind the gateway (simulate --via); the gateway's figures reach /metrics and watch", async () => {
    const watch = await startWatch(env);
    const sim = await simulate(env, [
      "--devices",
      String(SITE_SIM),
      "--prefix",
      "simsite-",
      "--label",
      "pool=simsite",
      "--via",
      "gw-1",
    ]);
    try {
      const r = await cli(["run", "noop", "--selector", "pool=simsite", "--wait", "--json"], env);
      if (r.code !== 0) console.error("DEBUG server stderr:\n" + server.stderr().slice(-6000));
      expect(r.code, r.stderr).toBe(0);
      expect(cliJson<JobJson>(r).counts).toMatchObject({ total: SITE_SIM, succeeded: SITE_SIM });
      await cli(["run", "noop", "--device", "gw-1", "--wait"], env); // it reports its counters with its state
      const text = await waitUntil("gateway counters in /metrics", async () => {
        const t = await (await fetch(`${server.urls.http}/metrics`)).text();
        return /fleet_gateway_reported\{gateway="gw-1",name="gateway_site_jobs_in"\} [1-9]/.test(t)
          ? t
          : undefined;
      });
      expect(text).toMatch(/fleet_gateway_reported\{gateway="gw-1",name="gateway_site_status_sent"\} [1-9]/);
      // Gauges: the site's size, its connections, the queue, the uplink (reported within ~2 s).
      const gauges = await waitUntil("gateway gauges in /metrics", async () => {
        const t = await (await fetch(`${server.urls.http}/metrics`)).text();
        const g = (name: string) =>
          Number(
            new RegExp(`fleet_gateway_reported\\{gateway="gw-1",name="${name}"\\} (\\d+)`).exec(t)?.[1] ?? -1,
          );
        const v = {
          devices: g("gateway_devices"),
          connected: g("gateway_connected_clients"),
          queued: g("gateway_queue_bytes"),
          uplink: g("gateway_uplink_ready"),
        };
        return v.connected >= SITE_SIM ? v : undefined;
      });
      expect(gauges.devices).toBeGreaterThanOrEqual(SITE_SIM + 2);
      // Hundreds of devices' states and statuses go up split to the payload limit, never over it.
      const metrics = await (await fetch(`${server.urls.http}/metrics`)).text();
      expect(metrics).not.toMatch(/name="gateway_site_status_too_large"/);
      expect(metrics).not.toMatch(/fleet_events_total\{name="dropped_[a-z_]*too_large"\}/);
      expect(gauges).toMatchObject({ queued: 0, uplink: 1 });
      const events = await watch.until("gw-1's figures in watch", (es) =>
        es.some((e) => e.kind === "gateway.state" && e.deviceId === "gw-1"),
      );
      expect(events.find((e) => e.kind === "gateway.state" && e.deviceId === "gw-1")?.gateway).toMatchObject({
        uplink: true,
      });
    } finally {
      sim.kill("SIGKILL");
      await watch.stop();
    }
  }, 120_000);

  it("a device removed at the center is disconnected by the gateway at once and refused after", {
    timeout: 150_000,
  }, async () => {
    const password = configOf("dev-1").password as string;
    // dev-1 is back through the gateway (restarted above; its reconnect backoff has grown).
    await waitUntil(
      "dev-1 connected to the gateway again",
      () => {
        const lines = agents
          .get("dev-1")!
          .stderr()
          .match(/"msg":"(connected|disconnected; reconnecting after backoff)"/g);
        return lines?.at(-1)?.includes('"connected"');
      },
      90_000,
    );
    expect((await cli(["device", "rm", "dev-1"], env)).code).toBe(0);
    await waitUntil("the gateway closed its connection", () =>
      agents.get("gw-1")!.stderr().includes("device no longer of this site: closing its connection"),
    );
    await waitUntil("dev-1 refused at the gateway", () =>
      agents.get("dev-1")!.stderr().includes("Bad username or password"),
    );
    const r = await mosq("mosquitto_pub", gwPort, [
      "-i",
      "dev-1",
      "-u",
      "dev-1",
      "-P",
      password,
      "-t",
      "fleet/v1/d/dev-1/status",
      "-m",
      "x",
    ]);
    expect(r.code).not.toBe(0);
  });
});
