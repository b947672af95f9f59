// Software updates end to end: artifacts pushed to a real fleet server, a flashed agent process,
// and a power cut (SIGKILL) right after the update saves each of its states.
import { existsSync, readFileSync, readlinkSync, realpathSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { JobJson } from "../../proto/api.js";
import { makeRelease } from "../helpers/artifacts.js";
import {
  type AgentProc,
  cli,
  cliJson,
  flashMoved,
  type ServerProcess,
  startAgent,
  startFleet,
  stopAll,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-upd-");
let server: ServerProcess;
let env: Record<string, string>;
let root: string;
let agent: AgentProc;
const DEV = "upd-dev";

async function push(version: string, healthExit = 0) {
  const r = makeRelease(data.dir, "app", version, { healthExit });
  const file = join(data.dir, `app-${version}.tar.gz`);
  writeFileSync(file, r.bytes);
  const res = await cli(["artifact", "push", file, "--name", "app", "--version", version, "--json"], env);
  expect(res.code, res.stderr).toBe(0);
}

const online = (want: boolean) => waitOnline(env, DEV, want);

function operatorAuth(): Record<string, string> {
  const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
  return { authorization: `Basic ${Buffer.from(`${ctx.username}:${ctx.password}`).toString("base64")}` };
}

/** `fleet run software-update` of app `version` into opt/app on `device`. */
const updateArgs = (device: string, version: string, ...more: string[]) => [
  "run",
  "software-update",
  "--param",
  "artifact=app",
  "--param",
  `version=${version}`,
  "--param",
  "target=opt/app",
  "--device",
  device,
  ...more,
];

async function send(version: string): Promise<string> {
  const r = await cli(
    updateArgs(DEV, version, "--param", 'healthCheck={"command":["./health.sh"]}', "--json"),
    env,
  );
  expect(r.code, r.stderr).toBe(0);
  return cliJson<JobJson>(r).id;
}

async function finished(jobId: string): Promise<JobJson> {
  return waitUntil(
    "job done",
    async () => {
      const j = cliJson<JobJson>(await cli(["jobs", "show", jobId, "--json"], env));
      return ["SUCCEEDED", "FAILED"].includes(j.state) ? j : undefined;
    },
    60_000,
  );
}

/** `current` always names a complete release: its VERSION file matches its directory. */
function currentVersion(): string {
  const link = readlinkSync(join(root, "opt/app/current"));
  expect(link).toMatch(/^releases\/[^/]+$/); // relative
  const dir = realpathSync(join(root, "opt/app/current"));
  const v = readFileSync(join(dir, "VERSION"), "utf8").trim();
  expect(dir.endsWith(`/releases/${v}`)).toBe(true);
  expect(existsSync(join(dir, "health.sh"))).toBe(true);
  return v;
}

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir));
  const flashed = await flashMoved(DEV, env, ["--dry-run-system"]);
  root = flashed.root;
  agent = startAgent(root);
  await online(true);
  await push("1.0.0");
  const first = await finished(await send("1.0.0"));
  expect(first.state).toBe("SUCCEEDED");
}, 120_000);

afterAll(() => stopAll(agent, server, data.cleanup));

describe("artifacts", () => {
  it("push, ls, rm; devices read only what a job names for them", async () => {
    await push("0.0.1");
    const ls = cliJson<Array<{ name: string; version: string; size: number; sha256: string }>>(
      await cli(["artifact", "ls", "--json"], env),
    );
    const a = ls.find((x) => x.version === "0.0.1")!;
    expect(a.sha256).toMatch(/^[0-9a-f]{64}$/);
    const password = JSON.parse(readFileSync(join(root, "etc/fleet-agent/config.json"), "utf8")).password;
    const auth = { authorization: `Basic ${Buffer.from(`${DEV}:${password}`).toString("base64")}` };
    expect(
      (await fetch(`${server.urls.http}/v1/artifacts/app/0.0.1/manifest`, { headers: auth })).status,
    ).toBe(403);
    expect((await fetch(`${server.urls.http}/v1/blobs/${a.sha256}`, { headers: auth })).status).toBe(403);
    expect((await fetch(`${server.urls.http}/v1/blobs/${a.sha256}`)).status).toBe(401);
    expect((await fetch(`${server.urls.http}/v1/artifacts`, { headers: auth })).status).toBe(403);
    expect(
      (
        await cli(
          ["artifact", "push", join(data.dir, "app-0.0.1.tar.gz"), "--name", "app", "--version", "0.0.1"],
          env,
        )
      ).code,
    ).toBe(2);
    // Paged like every list: page by page, --limit stops early, --ndjson streams.
    await push("0.0.2");
    const all = cliJson<Array<{ version: string }>>(await cli(["artifact", "ls", "--json"], env));
    expect(all.length).toBe(ls.length + 1);
    const first = cliJson<Array<{ version: string }>>(
      await cli(["artifact", "ls", "--limit", "1", "--json"], env),
    );
    expect(first).toEqual([all[0]]);
    const nd = (await cli(["artifact", "ls", "--ndjson"], env)).stdout.trim().split("\n");
    expect(nd.map((l) => JSON.parse(l).version)).toEqual(all.map((a) => a.version));
    const bad = await fetch(`${server.urls.http}/v1/artifacts?limit=0`, { headers: operatorAuth() });
    expect(bad.status).toBe(400);
    expect((await cli(["artifact", "rm", "app", "0.0.2"], env)).code).toBe(0);
    expect((await cli(["artifact", "rm", "app", "0.0.1"], env)).code).toBe(0);
    expect(cliJson<unknown[]>(await cli(["artifact", "ls", "--json"], env)).length).toBe(ls.length - 1);
  });

  it("backup with upload: the archive lands in the server's store for this device", async () => {
    const r = await cli(
      [
        "run",
        "backup",
        "--param",
        'paths=["opt/app/current/"]',
        "--param",
        "name=app",
        "--param",
        "upload=true",
        "--device",
        DEV,
        "--wait",
        "--json",
      ],
      env,
    );
    expect(r.code, r.stdout).toBe(0);
    const ups = cliJson<Array<{ deviceId: string; file: string; size: number }>>(
      await cli(["artifact", "ls", "--uploads", "--json"], env),
    );
    const mine = ups.filter((u) => u.deviceId === DEV);
    expect(mine).toHaveLength(1);
    expect(mine[0]!.file).toMatch(/^app-.*\.tar\.gz$/);
    expect(mine[0]!.size).toBeGreaterThan(0);
    // M4: with no job asking for one, a device cannot upload.
    const password = JSON.parse(readFileSync(join(root, "etc/fleet-agent/config.json"), "utf8")).password;
    const put = await fetch(`${server.urls.http}/v1/uploads/unasked.bin`, {
      method: "PUT",
      body: "x",
      headers: {
        authorization: `Basic ${Buffer.from(`${DEV}:${password}`).toString("base64")}`,
        "x-fleet-sha256": "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881",
      },
    });
    expect(put.status).toBe(403);
    expect(((await put.json()) as { error: string }).error).toMatch(
      /no job assigned to upd-dev asks for an upload/,
    );
    const got = await fetch(`${server.urls.http}/v1/uploads/${DEV}/${mine[0]!.file}`, {
      headers: operatorAuth(),
    });
    expect(got.status).toBe(200);
    expect((await got.arrayBuffer()).byteLength).toBe(mine[0]!.size);
  });

  it("a zero-byte artifact is stored and downloads as zero bytes", async () => {
    const file = join(data.dir, "empty.bin");
    writeFileSync(file, "");
    expect((await cli(["artifact", "push", file, "--name", "empty", "--version", "1"], env)).code).toBe(0);
    const sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    for (const range of [undefined, "bytes=0-"]) {
      const res = await fetch(`${server.urls.http}/v1/blobs/${sha}`, {
        headers: { ...operatorAuth(), ...(range ? { range } : {}) },
      });
      expect(res.status).toBe(200);
      expect((await res.arrayBuffer()).byteLength).toBe(0);
    }
    expect((await cli(["artifact", "rm", "empty", "1"], env)).code).toBe(0);
  });

  it("the same tarball pushed under two versions: the second downloads too (M10)", async () => {
    const r = makeRelease(data.dir, "app", "5.0.0");
    const file = join(data.dir, "twice.tar.gz");
    writeFileSync(file, r.bytes);
    for (const v of ["5.0.0", "5.0.1"])
      expect((await cli(["artifact", "push", file, "--name", "app", "--version", v], env)).code).toBe(0);
    const dev = await flashMoved("upd-twice", env, ["--dry-run-system"]);
    const a = startAgent(dev.root);
    try {
      await waitOnline(env, "upd-twice");
      const run = await cli(updateArgs("upd-twice", "5.0.1", "--wait", "--json"), env);
      expect(run.code, run.stdout).toBe(0);
      expect(readlinkSync(join(dev.root, "opt/app/current"))).toBe("releases/5.0.1");
    } finally {
      a.proc.kill("SIGKILL");
      dev.cleanup();
      for (const v of ["5.0.0", "5.0.1"]) await cli(["artifact", "rm", "app", v], env);
    }
  });

  it("a device with a client certificate (no token) downloads over HTTPS", async () => {
    const tls = await flashMoved("upd-tls", env, [
      "--mtls",
      "--broker",
      server.urls.mqtts,
      "--dry-run-system",
    ]);
    const cfg = JSON.parse(readFileSync(join(tls.root, "etc/fleet-agent/config.json"), "utf8"));
    expect(cfg.password).toBeUndefined();
    expect(cfg.artifactsUrl).toBe(server.urls.https);
    const a = startAgent(tls.root);
    try {
      await waitOnline(env, "upd-tls");
      const r = await cli(updateArgs("upd-tls", "1.0.0", "--wait", "--json"), env);
      expect(r.code, r.stdout).toBe(0);
      expect(readlinkSync(join(tls.root, "opt/app/current"))).toBe("releases/1.0.0");
    } finally {
      a.proc.kill("SIGKILL");
      tls.cleanup();
    }
  });
});

describe("power cut at each update state", () => {
  let minor = 0;
  it.each([
    ["FETCHING", "SUCCEEDED"],
    ["DOWNLOADING", "SUCCEEDED"],
    ["UNPACKING", "SUCCEEDED"],
    ["SWITCHING", "SUCCEEDED"],
    ["CHECKING", "SUCCEEDED"],
    ["COMMITTED", "SUCCEEDED"],
    ["CHECKING", "ROLLED_BACK"],
    ["ROLLING_BACK", "ROLLED_BACK"],
    ["ROLLED_BACK", "ROLLED_BACK"],
  ])(
    "SIGKILL after saving %s: the update ends %s, and a complete release runs throughout",
    async (state, outcome) => {
      const before = currentVersion();
      const version = `2.${++minor}.0`;
      await push(version, outcome === "ROLLED_BACK" ? 1 : 0);
      agent.proc.kill("SIGTERM");
      await agent.exited;
      agent = startAgent(root, { FLEET_TEST_CRASH_AT: state });
      await online(true);
      const jobId = await send(version);
      if (state !== "FETCHING") {
        // FETCHING is the initial state, never saved: the run goes through without a crash.
        expect(await agent.exited).toBeNull(); // killed by SIGKILL
        currentVersion(); // whatever it is, it is complete
        agent = startAgent(root);
      }
      const job = await finished(jobId);
      const task = job.devices[0]!.tasks[0]!;
      if (outcome === "SUCCEEDED") {
        expect(job.state).toBe("SUCCEEDED");
        expect(currentVersion()).toBe(version);
      } else {
        expect(task).toMatchObject({ state: "FAILED", reason: "rolled_back" });
        expect(currentVersion()).toBe(before);
      }
    },
    90_000,
  );
});
