// The whole loop with real processes: fleet init, fleet server, two flashed agents moved away
// from where they were flashed, and the CLI.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { JobJson } from "../../proto/api.js";
import {
  type AgentProc,
  cli,
  cliJson,
  FLEET,
  flashMoved,
  type ServerProcess,
  startAgent,
  startFleet,
  startServer,
  startWatch,
  stopAll,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-e2e-");
let server: ServerProcess;
let env: Record<string, string>;
const agents = new Map<string, AgentProc>();
const roots = new Map<string, string>();
const cleanups: Array<() => void> = [];

const online = (id: string, want = true) => waitOnline(env, id, want);

function start(id: string) {
  agents.set(id, startAgent(roots.get(id)!));
}

async function stopAgent(id: string, signal: NodeJS.Signals = "SIGTERM") {
  const a = agents.get(id)!;
  a.proc.kill(signal);
  await a.exited;
}

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir));
  for (const [id, labels] of [
    ["gw-berlin", ["--label", "site=berlin", "--label", "role=gateway"]],
    ["gw-paris", ["--label", "site=paris"]],
  ] as const) {
    const { root, cleanup } = await flashMoved(id, env, [...labels, "--allow-shell", "/bin/sh"]);
    roots.set(id, root);
    cleanups.push(cleanup);
    start(id);
  }
  await online("gw-berlin");
  await online("gw-paris");
}, 120_000);

afterAll(() => stopAll(agents.values(), server, cleanups, data.cleanup));

describe("fleet end to end", () => {
  it("runs a job by device id and by selector, with --wait", async () => {
    const byId = await cli(["run", "noop", "--device", "gw-paris", "--wait", "--json"], env);
    expect(byId.code).toBe(0);
    expect(cliJson<JobJson>(byId)).toMatchObject({
      state: "SUCCEEDED",
      devices: [{ deviceId: "gw-paris", state: "SUCCEEDED" }],
    });
    const bySel = await cli(
      [
        "run",
        "shell",
        "--param",
        "command=/bin/sh",
        "--param",
        'args=["-c","echo from $FLEET_ROOT"]',
        "--selector",
        "site=berlin,role in (gateway)",
        "--wait",
        "--json",
      ],
      env,
    );
    expect(bySel.code).toBe(0);
    const j = cliJson<JobJson>(bySel);
    expect(j.devices.map((d) => d.deviceId)).toEqual(["gw-berlin"]);
    expect(j.devices[0]!.tasks[0]).toMatchObject({ state: "SUCCEEDED", message: "exit 0" });
    const shown = cliJson<JobJson & { devices: Array<{ tasks: Array<{ output?: string }> }> }>(
      await cli(["jobs", "show", j.id, "--json"], env),
    );
    expect(shown.devices[0]!.tasks[0]!.output).toBe(`from ${roots.get("gw-berlin")}\n`);
  });

  it("a DAG job with a failing task: dependents SKIPPED, all_done ones run, --wait exits 1", async () => {
    const file = join(data.dir, "dag.yaml");
    writeFileSync(
      file,
      [
        "name: dag",
        "tasks:",
        "  - { id: prepare, type: noop }",
        "  - { id: break, type: shell, dependsOn: [prepare], params: { command: /bin/sh, args: [-c, 'echo oops; exit 3'] } }",
        "  - { id: install, type: noop, dependsOn: [break] }",
        "  - { id: report, type: noop, dependsOn: [break], trigger: all_done }",
      ].join("\n"),
    );
    const r = await cli(
      ["run", "-f", file, "--device", "gw-berlin", "--device", "gw-paris", "--wait", "--json"],
      env,
    );
    expect(r.code).toBe(1);
    const j = cliJson<JobJson>(r);
    expect(j.state).toBe("FAILED");
    for (const d of j.devices) {
      expect(Object.fromEntries(d.tasks.map((t) => [t.id, t.state]))).toEqual({
        prepare: "SUCCEEDED",
        break: "FAILED",
        install: "SKIPPED",
        report: "SUCCEEDED",
      });
    }
    const text = await cli(["run", "-f", file, "--device", "gw-paris", "--wait"], env);
    expect(text.code).toBe(1);
    expect(text.stdout).toMatch(/break\s+shell\s+FAILED\s+1\s+\/bin\/sh exit code 3/);
  });

  it("refuses bad input with exit 2 and a clear message", async () => {
    const cyc = join(data.dir, "cycle.json");
    writeFileSync(
      cyc,
      JSON.stringify({
        tasks: [
          { id: "a", type: "noop", dependsOn: ["b"] },
          { id: "b", type: "noop", dependsOn: ["a"] },
        ],
      }),
    );
    const r1 = await cli(["run", "-f", cyc, "--device", "gw-paris"], env);
    expect(r1.code).toBe(2);
    expect(r1.stderr).toContain("dependency cycle");
    const r2 = await cli(["run", "noop", "--selector", "site in (a"], env);
    expect(r2.code).toBe(2);
    expect(r2.stderr).toContain("column 11");
    const r3 = await cli(["run", "noop", "--device", "nobody"], env);
    expect(r3.code).toBe(2);
    expect(r3.stderr).toContain("unknown device(s): nobody");
    const r4 = await cli(["run", "noop"], env);
    expect(r4.code).toBe(2);
    const r5 = await cli(["device", "ls", "--bogus"], env);
    expect(r5.code).toBe(2);
    const r7 = await cli(["simulate", "--devices", "1", "--latency", "3000-0"], env);
    expect(r7.code).toBe(2);
    expect(r7.stderr).toContain("--latency ms or min-max (ms, min <= max)");
    const r6 = await cli(["device", "ls", "--server", "mqtt://127.0.0.1:1"], env);
    expect(r6.code).toBe(3);
    expect(r6.stderr.trim().split("\n")).toHaveLength(1);
    expect(r6.stderr).toContain("cannot connect to mqtt://127.0.0.1:1");
  });

  it("a job sent while a device is offline runs when it comes back", async () => {
    await stopAgent("gw-paris");
    await online("gw-paris", false);
    const waiting = cli(["run", "noop", "--device", "gw-paris", "--wait", "--json"], env);
    await new Promise((r) => setTimeout(r, 1000));
    start("gw-paris");
    const r = await waiting;
    expect(r.code).toBe(0);
    expect(cliJson<JobJson>(r).state).toBe("SUCCEEDED");
  });

  it("an agent SIGKILLed mid-task reports a truthful final state", async () => {
    const sent = cliJson<JobJson>(
      await cli(
        [
          "run",
          "shell",
          "--param",
          "command=/bin/sh",
          "--param",
          'args=["-c","sleep 30"]',
          "--device",
          "gw-berlin",
          "--json",
        ],
        env,
      ),
    );
    await waitUntil(
      "running",
      async () =>
        cliJson<JobJson>(await cli(["jobs", "show", sent.id, "--json"], env)).devices[0]!.tasks[0]!.state ===
        "RUNNING",
    );
    // The run's scratch directory (made just after RUNNING is written) is left behind by the
    // kill; the next start removes it.
    const scratch = join(roots.get("gw-berlin")!, "var", "lib", "fleet-agent", "scratch");
    await waitUntil(
      "the run's scratch directory",
      () => existsSync(scratch) && readdirSync(scratch).length === 1,
    );
    await stopAgent("gw-berlin", "SIGKILL");
    expect(readdirSync(scratch)).toHaveLength(1);
    start("gw-berlin");
    const done = await waitUntil("final", async () => {
      const j = cliJson<JobJson>(await cli(["jobs", "show", sent.id, "--json"], env));
      return j.state === "FAILED" ? j : undefined;
    });
    expect(done.devices[0]!.tasks[0]).toMatchObject({ state: "FAILED", reason: "interrupted" });
    expect(existsSync(scratch) ? readdirSync(scratch) : []).toEqual([]);
  });

  it("the server SIGKILLed mid-job: the job converges after a restart", async () => {
    await online("gw-berlin");
    // The tasks run until a gate file appears, so both are RUNNING however slow the machine is,
    // and they finish (each touches a file in its device root) while the server is down.
    const gate = join(data.dir, "server-down.gate");
    const script = `while [ ! -e '${gate}' ]; do sleep 0.1; done; touch "$FLEET_ROOT/server-down.done"`;
    const sent = cliJson<JobJson>(
      await cli(
        [
          "run",
          "shell",
          "--param",
          "command=/bin/sh",
          "--param",
          `args=${JSON.stringify(["-c", script])}`,
          "--device",
          "gw-berlin",
          "--device",
          "gw-paris",
          "--json",
        ],
        env,
      ),
    );
    let seen = "";
    try {
      await waitUntil("running", async () => {
        const states = cliJson<JobJson>(await cli(["jobs", "show", sent.id, "--json"], env)).devices.map(
          (d) => d.state,
        );
        seen = states.join(",");
        return states.every((s) => s === "RUNNING");
      });
    } catch (e) {
      throw new Error(`${(e as Error).message}; the devices' states last seen: ${seen}`);
    }
    server.proc.kill("SIGKILL");
    await server.exited;
    writeFileSync(gate, "");
    await waitUntil("the tasks done while the server is down", () =>
      ["gw-berlin", "gw-paris"].every((id) => existsSync(join(roots.get(id)!, "server-down.done"))),
    );
    await new Promise((r) => setTimeout(r, 500)); // the agents record the outcome
    server = await startServer(data.dir, server.ports);
    const done = await waitUntil(
      "converged",
      async () => {
        const j = cliJson<JobJson>(await cli(["jobs", "show", sent.id, "--json"], env));
        return j.state === "SUCCEEDED" ? j : undefined;
      },
      90_000,
    );
    expect(done.devices.map((d) => d.tasks[0]!.state)).toEqual(["SUCCEEDED", "SUCCEEDED"]);
  }, 120_000);

  it("agents connect over TLS with a fleet-CA client certificate (--mtls) and over WebSocket", async () => {
    const tls = await flashMoved("gw-tls", env, ["--mtls", "--broker", server.urls.mqtts]);
    const ws = await flashMoved("gw-ws", env, ["--broker", server.urls.ws]);
    cleanups.push(tls.cleanup, ws.cleanup);
    roots.set("gw-tls", tls.root);
    roots.set("gw-ws", ws.root);
    start("gw-tls");
    start("gw-ws");
    await online("gw-tls");
    await online("gw-ws");
    const r = await cli(["run", "noop", "--device", "gw-tls", "--device", "gw-ws", "--wait", "--json"], env);
    expect(r.code).toBe(0);
    expect(cliJson<JobJson>(r).devices.map((d) => d.state)).toEqual(["SUCCEEDED", "SUCCEEDED"]);
    await stopAgent("gw-tls");
    await stopAgent("gw-ws");
    // M9: removed and added again, the device's old certificate (CA-signed) no longer logs in.
    expect((await cli(["device", "rm", "gw-tls"], env)).code).toBe(0);
    expect((await cli(["device", "add", "gw-tls"], env)).code).toBe(0);
    start("gw-tls");
    await waitUntil("the old certificate refused", async () => {
      const m = await (await fetch(`${server.urls.http}/metrics`)).text();
      return /fleet_events_total\{name="cert_revoked"\} [1-9]/.test(m);
    });
    await stopAgent("gw-tls");
  });

  it("flash --tar writes the same root as a .tar.gz: config 0600, no absolute symlinks, and it runs", async () => {
    const t = tempDir("fleet-tar-");
    cleanups.push(t.cleanup);
    const tarFile = join(t.dir, "gw-tar.tar.gz");
    expect((await cli(["flash", "gw-tar", "--tar", tarFile, "--label", "site=sdcard"], env)).code).toBe(0);
    const root = join(t.dir, "sdcard");
    mkdirSync(root);
    execFileSync("tar", ["xzf", tarFile, "-C", root]);
    const listing = execFileSync("tar", ["tzvf", tarFile]).toString();
    expect(listing).not.toMatch(/^l.* -> \//m);
    // H7: no entries for the device's own directories, and ours are 0755 (the data dir 0700).
    const dirs = listing
      .split("\n")
      .filter((l) => l.startsWith("d"))
      .map((l) => ({
        mode: l.slice(0, 10),
        path: l.split(/\s+/).pop()!.replace(/^\.\//, "").replace(/\/$/, ""),
      }));
    for (const system of ["", ".", "etc", "var", "var/lib", "opt", "etc/systemd", "etc/systemd/system"])
      expect(dirs.map((d) => d.path)).not.toContain(system);
    for (const d of dirs)
      expect(d.mode, d.path).toBe(d.path === "var/lib/fleet-agent" ? "drwx------" : "drwxr-xr-x");
    expect(statSync(join(root, "etc", "fleet-agent", "config.json")).mode & 0o777).toBe(0o600);
    expect(statSync(join(root, "opt", "fleet-agent", "run")).mode & 0o111).toBeTruthy();
    expect(readFileSync(join(root, "etc", "systemd", "system", "fleet-agent.service"), "utf8")).toContain(
      "ExecStart=/opt/fleet-agent/run --root /",
    );
    expect(readFileSync(join(root, "etc", "systemd", "system", "fleet-agent.service"), "utf8")).toContain(
      "LogRateLimitBurst=",
    );
    for (const arch of ["linux-x64", "linux-arm64", "linux-arm"])
      expect(existsSync(join(root, "opt", "fleet-agent", "prebuilds", arch))).toBe(true);
    roots.set("gw-tar", root);
    start("gw-tar");
    await online("gw-tar");
    expect((await cli(["run", "noop", "--device", "gw-tar", "--wait"], env)).code).toBe(0);
    await stopAgent("gw-tar");
  });

  it("FleetEvents are not built while nobody watches (counted), and a watcher gets them at once", async () => {
    const unheard = async () =>
      Number(
        (await (await fetch(`${server.urls.http}/metrics`)).text()).match(
          /fleet_events_total\{name="events_unheard"\} (\d+)/,
        )?.[1] ?? 0,
      );
    const before = await unheard();
    // Without --wait: `run --wait` listens to the events itself.
    const { id } = cliJson<{ id: string }>(await cli(["run", "noop", "--device", "gw-paris", "--json"], env));
    for (let i = 0; i < 100; i++) {
      const job = cliJson<{ state: string }>(await cli(["jobs", "show", id, "--json"], env));
      if (job.state === "SUCCEEDED") break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(await unheard()).toBeGreaterThanOrEqual(before + 2); // job.created, task.status, ...
    // The next test: a watcher subscribes and gets every event of a job from then on.
  });

  it("watch --json streams parseable NDJSON events", async () => {
    const w = await startWatch(env);
    const job = cliJson<JobJson>(await cli(["run", "noop", "--device", "gw-paris", "--wait", "--json"], env));
    await w.until("the job's outcome in watch", (es) =>
      es.some((e) => e.jobId === job.id && e.kind === "task.status" && !e.taskId && e.state === "SUCCEEDED"),
    );
    const events = (await w.stop()).filter((e) => e.jobId === job.id);
    expect(events.some((e) => e.kind === "job.created")).toBe(true);
    expect(events.some((e) => e.kind === "task.status" && e.taskId && e.state === "SUCCEEDED")).toBe(true);
  });

  it("a reader that stops early (| head, | true) ends the command quietly", async () => {
    // `true` closes the pipe before the CLI has its answer: the write meets a closed pipe.
    const r = spawnSync(
      "bash",
      ["-o", "pipefail", "-c", `"${process.execPath}" "${FLEET}" device ls | true`],
      {
        env: { ...process.env, ...env },
        encoding: "utf8",
      },
    );
    expect(r.stderr).not.toMatch(/EPIPE|Unhandled/);
    expect(r.status).toBe(0);
  });

  it("device add / show / rm, and jobs ls / cancel", async () => {
    const added = cliJson<{ id: string; username: string; password: string }>(
      await cli(["device", "add", "spare-1", "--label", "site=lab", "--json"], env),
    );
    expect(added).toMatchObject({ id: "spare-1", username: "spare-1" });
    expect(added.password.length).toBeGreaterThanOrEqual(40);
    expect((await cli(["device", "add", "spare-1"], env)).code).toBe(2);
    expect((await cli(["device", "add", "op-sneaky"], env)).stderr).toContain("reserved prefix");
    const shown = cliJson<{ id: string; labels: Record<string, string>; online: boolean }>(
      await cli(["device", "show", "spare-1", "--json"], env),
    );
    expect(shown).toMatchObject({ id: "spare-1", labels: { site: "lab" }, online: false });
    const sel = cliJson<Array<{ id: string }>>(
      await cli(["device", "ls", "--selector", "site=lab", "--json"], env),
    );
    expect(sel.map((d) => d.id)).toEqual(["spare-1"]);
    const pending = cliJson<JobJson>(await cli(["run", "noop", "--device", "spare-1", "--json"], env));
    expect(pending.devices[0]!.state).toBe("PENDING");
    const canceled = cliJson<JobJson>(await cli(["jobs", "cancel", pending.id, "--json"], env));
    expect(canceled).toMatchObject({
      state: "CANCELED",
      devices: [{ state: "CANCELED", reason: "withdrawn" }],
    });
    const ls = cliJson<Array<{ id: string; state: string }>>(
      await cli(["jobs", "ls", "--device", "spare-1", "--json"], env),
    );
    expect(ls).toEqual([expect.objectContaining({ id: pending.id, state: "CANCELED" })]);
    expect((await cli(["device", "rm", "spare-1"], env)).code).toBe(0);
    expect((await cli(["device", "show", "spare-1"], env)).code).toBe(1);
  });
});
