// Updates at a site (issue 13, DESIGN.md §11): real processes — the server and 8 flashed devices
// of one site, each serving chunks to its peers. An 8 MiB incompressible release rolled out in
// waves 1,100%: the center serves little more than one copy; a second release that changes
// 64 KiB: the center serves a small part of it; every device's files are byte-identical to the
// release. A peer whose cache was tampered with cannot make a device install a wrong byte (it is
// dropped and reported); a device of another site, or without a fleet certificate, gets nothing.
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createReadStream, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { request } from "node:https";
import { join } from "node:path";
import { createGunzip } from "node:zlib";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { chunkStream } from "../../common/chunking.js";
import type { JobJson } from "../../proto/api.js";
import { pb } from "../../proto/index.js";
import { signManifest } from "../../proto/signing.js";
import {
  type AgentProc,
  cli,
  cliJson,
  flashMoved,
  type ServerProcess,
  startAgent,
  startFleet,
  startWatch,
  stopAll,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-peers-");
let server: ServerProcess;
let env: Record<string, string>;
const roots = new Map<string, string>();
const agents = new Map<string, AgentProc>();
const cleanups: Array<() => void> = [];
const SITE = Array.from({ length: 8 }, (_, i) => `p-${i + 1}`);
const SIZE = 8 * 1024 * 1024;

async function flash(id: string, site: string) {
  const { root, cleanup } = await flashMoved(id, env, [
    "--label",
    `site=${site}`,
    "--peer-port",
    "0",
    "--peer-host",
    "127.0.0.1",
  ]);
  roots.set(id, root);
  cleanups.push(cleanup);
}

/** A release directory's .tar.gz pushed as app@version. */
async function push(src: string, version: string) {
  writeFileSync(join(src, "VERSION"), `${version}\n`);
  const file = join(data.dir, `app-${version}.tar.gz`);
  execFileSync("tar", ["czf", file, "-C", src, "."]);
  const r = await cli(["artifact", "push", file, "--name", "app", "--version", version], env);
  expect(r.code, r.stderr).toBe(0);
  return statSync(file).size;
}

const centerBytes = async () => {
  const t = await (await fetch(`${server.urls.http}/metrics`)).text();
  return Number(/^fleet_artifact_bytes_sent_total (\d+)/m.exec(t)?.[1] ?? 0);
};

async function rollout(version: string, selector = "site=shop") {
  const job = join(data.dir, `update-${version}.yaml`);
  writeFileSync(
    job,
    `name: app-${version}\ntasks:\n  - id: update\n    type: software-update\n    params: { artifact: app, version: "${version}", target: opt/app }\n`,
  );
  // The first wave seeds the site: a short bake lets its devices announce what they hold (a
  // state goes up within 2 s; 5 s leaves room on a busy machine).
  const r = await cli(
    [
      "rollout",
      "create",
      "-f",
      job,
      "--selector",
      selector,
      "--waves",
      "1,100%",
      "--bake",
      "5s",
      "--wait",
      "--json",
    ],
    env,
    240_000,
  );
  expect(r.code, r.stderr).toBe(0);
  return cliJson<{ state: string; bytes?: Record<string, number>; bytesSaved?: number; jobId: string }>(r);
}

const installed = (id: string, file: string) =>
  readFileSync(join(roots.get(id)!, "opt", "app", "current", file));

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir));
  for (const id of SITE) await flash(id, "shop");
  await flash("q-1", "other");
  for (const id of SITE) agents.set(id, startAgent(roots.get(id)!));
  for (const id of SITE) await waitOnline(env, id);
}, 240_000);

afterAll(() => {
  stopAll([...agents.values()], server, cleanups, data.cleanup);
});

describe("updates at a site: peers and deltas", () => {
  const src = join(data.dir, "src");
  const padding = randomBytes(SIZE);

  it("an 8 MiB release in waves 1,100%: the center serves about one copy", async () => {
    mkdirSync(src, { recursive: true });
    writeFileSync(join(src, "data.bin"), padding);
    const size = await push(src, "1.0.0");
    const before = await centerBytes();
    const r = await rollout("1.0.0");
    expect(r.state).toBe("SUCCEEDED");
    const served = (await centerBytes()) - before;
    expect(served).toBeLessThanOrEqual(1.5 * size);
    expect(r.bytes?.peers ?? 0).toBeGreaterThan(5 * size);
    expect(r.bytesSaved).toBeGreaterThan(5 * size);
    for (const id of SITE) expect(installed(id, "data.bin").equals(padding)).toBe(true);
    const metrics = await (await fetch(`${server.urls.http}/metrics`)).text();
    expect(Number(/fleet_artifact_bytes_by_source_total\{source="peers"\} (\d+)/.exec(metrics)?.[1])).toBe(
      r.bytes?.peers,
    );
    process.stdout.write(
      `B: release 1 (${size} B): center served ${served} B (${(served / size).toFixed(2)}x); ${JSON.stringify(r.bytes)}\n`,
    );
  }, 240_000);

  it("a second release that changes 64 KiB: the center serves a small part of it", async () => {
    const changed = Buffer.from(padding);
    randomBytes(64 * 1024).copy(changed, 3 * 1024 * 1024);
    writeFileSync(join(src, "data.bin"), changed);
    const size = await push(src, "1.1.0");
    const before = await centerBytes();
    const r = await rollout("1.1.0");
    expect(r.state).toBe("SUCCEEDED");
    const served = (await centerBytes()) - before;
    expect(served).toBeLessThan(0.1 * size);
    expect(r.bytes?.local ?? 0).toBeGreaterThan(7 * size);
    for (const id of SITE) expect(installed(id, "data.bin").equals(changed)).toBe(true);
    process.stdout.write(
      `B: release 2 (${size} B, 64 KiB changed): center served ${served} B; ${JSON.stringify(r.bytes)}\n`,
    );
  }, 240_000);

  it("a peer with a tampered cache cannot make a device install a wrong byte; it is dropped and reported", async () => {
    // Every chunk p-1 holds is overwritten with garbage of the same size.
    const dir = join(roots.get("p-1")!, "var", "lib", "fleet-agent", "chunks");
    let n = 0;
    for (const f of readdirSync(dir))
      if (/^[0-9a-f]{64}$/.test(f)) {
        writeFileSync(join(dir, f), randomBytes(statSync(join(dir, f)).size));
        n++;
      }
    expect(n).toBeGreaterThan(100);
    // A new device of the site fetches the current release; only p-1 and p-2 serve (the others
    // stop), so p-1 is picked for about half the chunks.
    for (const id of SITE.slice(2)) {
      agents.get(id)!.proc.kill("SIGTERM");
      await agents.get(id)!.exited;
    }
    await flash("p-9", "shop");
    agents.set("p-9", startAgent(roots.get("p-9")!));
    await waitOnline(env, "p-9");
    const watch = await startWatch(env);
    const r = await cli(
      [
        "run",
        "software-update",
        "--param",
        "artifact=app",
        "--param",
        "version=1.1.0",
        "--param",
        "target=opt/app",
        "--device",
        "p-9",
        "--wait",
        "--json",
      ],
      env,
      120_000,
    );
    expect(r.code, r.stdout).toBe(0);
    const task = cliJson<JobJson>(r).devices[0]!.tasks[0]!;
    expect(task.message).toMatch(/dropped peer\(s\) that served bad chunks: p-1/);
    expect(installed("p-9", "data.bin").equals(readFileSync(join(src, "data.bin")))).toBe(true);
    expect(agents.get("p-9")!.stderr()).toMatch(/"peer":"p-1".*does not match the signed manifest/);
    // Operators see it live.
    await watch.until("peer.bad_chunk in watch", (es) => es.some((e) => e.kind === "peer.bad_chunk"));
    const events = await watch.stop();
    expect(events.find((e) => e.kind === "peer.bad_chunk")).toMatchObject({
      deviceId: "p-9",
      detail: { peer: "p-1" },
    });
  }, 240_000);

  it("the server refuses a push whose signed chunk list does not match its content", async () => {
    const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
    const key = readFileSync(ctx.signingKey, "utf8");
    const file = join(data.dir, "app-1.1.0.tar.gz");
    const bytes = readFileSync(file);
    const list = await chunkStream(createReadStream(file).pipe(createGunzip()));
    const push = async (chunks: Array<{ sha256: string; size: number }>, body: Buffer, version: string) => {
      const manifest = {
        name: "app",
        version,
        size: body.length,
        sha256: createHash("sha256").update(body).digest("hex"),
        hardware: [],
        createdAtMs: Date.now(),
        chunks: chunks.map((c) => ({ sha256: Buffer.from(c.sha256, "hex"), size: c.size })),
        contentSha256: Buffer.from(list.contentSha256, "hex"),
        contentSize: list.contentSize,
      };
      const signed = pb.SignedManifest.encode(signManifest(manifest, key, ctx.keyId)).finish();
      const res = await fetch(`${server.urls.http}/v1/artifacts`, {
        method: "PUT",
        body: new Uint8Array(body),
        headers: {
          authorization: `Basic ${Buffer.from(`${ctx.username}:${ctx.password}`).toString("base64")}`,
          "x-fleet-manifest": Buffer.from(signed).toString("base64"),
        },
      });
      return { status: res.status, error: ((await res.json()) as { error?: string }).error ?? "" };
    };
    // One chunk's hash changed in the signed list: refused, and nothing stored.
    const wrong = list.chunks.map((c, i) => (i === 3 ? { ...c, sha256: "00".repeat(32) } : c));
    expect(await push(wrong, bytes, "9.0.0")).toEqual({
      status: 400,
      error: "chunk 4 of the content does not match the signed manifest",
    });
    // A chunk list for something that is not a .tar.gz.
    const notGzip = await push(list.chunks, Buffer.from("plain bytes, not gzip"), "9.0.1");
    expect(notGzip.status).toBe(400);
    expect(notGzip.error).toMatch(/not a readable \.tar\.gz/);
    const listed = cliJson<Array<{ version: string }>>(await cli(["artifact", "ls", "--json"], env));
    expect(listed.map((a) => a.version)).not.toContain("9.0.0");
  }, 60_000);

  it("a device of another site, or without a fleet certificate, gets no chunk", async () => {
    const peerUrl = await waitUntil("p-2's peer URL", async () => {
      const log = agents.get("p-2")!.stderr();
      return /"url":"(https:\/\/127\.0\.0\.1:\d+)"/.exec(log)?.[1];
    });
    const chunk = readdirSync(join(roots.get("p-2")!, "var", "lib", "fleet-agent", "chunks")).find((f) =>
      /^[0-9a-f]{64}$/.test(f),
    )!;
    const etc = (id: string) => join(roots.get(id)!, "etc", "fleet-agent");
    const get = (tls: Record<string, Buffer>, path = `/chunks/${chunk}`) =>
      new Promise<number | string>((resolve) => {
        const req = request(
          `${peerUrl}${path}`,
          {
            ...tls,
            ca: readFileSync(join(etc("q-1"), "ca.pem")),
            checkServerIdentity: () => undefined,
            agent: false,
          },
          (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          },
        );
        req.on("error", (err) => resolve(err.message));
        req.end();
      });
    // Another site's device: a valid fleet certificate, but not of this site.
    const other = await get({
      cert: readFileSync(join(etc("q-1"), "client.pem")),
      key: readFileSync(join(etc("q-1"), "client.key")),
    });
    expect(other).toBe(403);
    // No certificate: not past the TLS handshake.
    const none = await get({});
    expect(typeof none).toBe("string");
    // The same site's device gets it (the control).
    const same = await get({
      cert: readFileSync(join(etc("p-9"), "client.pem")),
      key: readFileSync(join(etc("p-9"), "client.key")),
    });
    expect(same).toBe(200);
    // Only chunks by their sha256: no listing, nothing else.
    const mine = {
      cert: readFileSync(join(etc("p-9"), "client.pem")),
      key: readFileSync(join(etc("p-9"), "client.key")),
    };
    for (const path of ["/", "/chunks/", "/chunks", `/chunks/${chunk}/..`, "/releases.json"])
      expect(await get(mine, path)).toBe(404);
  }, 60_000);
});
