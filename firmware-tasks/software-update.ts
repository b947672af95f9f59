// `software-update {artifact, version, target, healthCheck?, allowDowngrade?, rebootRequired?,
// rebootDeadlineS?, stallTimeoutS?}` (DESIGN.md §8), as an explicit state machine in the Mender
// client's manner: every state is saved to the agent's store *before* its side effect, so a
// power cut anywhere leaves a runnable old or new release and the next start resumes or rolls
// back. Transitions:
//
//   FETCHING ─> DOWNLOADING ─> UNPACKING ─> SWITCHING ─┬─> CHECKING ─> COMMITTED
//                                                      └─> REBOOTING ─> CHECKING
//   CHECKING (failed, or the reboot did not confirm before its deadline) ─> ROLLING_BACK ─> ROLLED_BACK
//
// Layout: <target>/releases/<version>/ (unpacked), <target>/current -> releases/<version>
// (a relative symlink, switched by writing a new link and renaming it over the old one).
//
// About 400 lines: the state machine below is one unit; splitting its states over files would
// hide the order of "save, then act".
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, open, readdir, readlink, rename, rm, stat, symlink } from "node:fs/promises";
import { isAbsolute, join } from "node:path";
import { extract as extractTar } from "tar";
import { z } from "zod";
import { fsyncPath, fsyncTree } from "../common/files.js";
import { pb } from "../proto/index.js";
import { compareValues } from "../proto/jobspec.js";
import { type Manifest, verifyManifest } from "../proto/signing.js";
import { TaskFailedError, UnrecoverableError } from "./errors.js";
import { pathAllowed, taskEnv, underRoot } from "./paths.js";
import { describeExit, runCommand } from "./process.js";
import { defineHandler, type TaskContext } from "./types.js";

const params = z
  .object({
    artifact: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/),
    version: z.string().regex(/^[A-Za-z0-9._+-]{1,64}$/),
    target: z.string().min(1),
    healthCheck: z
      .object({
        command: z.array(z.string()).min(1).optional(),
        url: z.string().url().optional(),
        timeoutS: z.number().min(1).default(30),
      })
      .strict()
      .refine((h) => Boolean(h.command) !== Boolean(h.url), "give exactly one of command or url")
      .optional(),
    allowDowngrade: z.boolean().default(false),
    rebootRequired: z.boolean().default(false),
    rebootDeadlineS: z.number().min(1).default(600),
    stallTimeoutS: z.number().min(0.1).default(30),
  })
  .strict();
type Params = z.output<typeof params>;

export type UpdateState =
  | "FETCHING"
  | "DOWNLOADING"
  | "UNPACKING"
  | "SWITCHING"
  | "REBOOTING"
  | "CHECKING"
  | "ROLLING_BACK"
  | "ROLLED_BACK"
  | "COMMITTED";

interface Saved {
  state: UpdateState;
  manifest?: string; // base64 SignedManifest
  previous?: string | null; // what `current` pointed at before (relative), null if nothing
  bootId?: string;
  deadline?: number;
  why?: string;
  /** Where the download's bytes came from (chunked artifacts). */
  bytes?: Record<string, number>;
}

const KEEP_RELEASES = 2;

export default defineHandler({
  type: "software-update",
  paramsSchema: params,
  /**
   * The health check runs on the device like a `shell` task: its command must be in allowShell,
   * or be a file of the release itself (`./health.sh`: signed and installed with it).
   */
  check(p, policy) {
    const outside = pathAllowed(p.target, policy.allowPaths);
    if (outside) return outside;
    const c = p.healthCheck?.command?.[0];
    if (c === undefined) return undefined;
    if (isAbsolute(c))
      return policy.allowShell.includes(c)
        ? undefined
        : `health check command ${c} is not in this agent's allowShell list`;
    if (c.startsWith("./") && !c.split("/").includes("..")) return undefined;
    return `health check command ${c}: want an absolute path in allowShell, or ./FILE inside the release`;
  },
  idempotent: false,
  resumable: true,
  async run(ctx, p, signal) {
    const key = `update/${ctx.jobId}/${ctx.executionId}/${ctx.taskId}`;
    const target = underRoot(ctx.root, p.target);
    const rel = `releases/${p.version}`;
    let saved = (await ctx.kv.get<Saved>(key)) ?? { state: "FETCHING" };
    const save = async (next: Saved) => {
      saved = next;
      await ctx.kv.put(key, next);
      ctx.log.info({ state: next.state }, "software-update state");
      crashPoint(next.state);
    };
    const manifest = (): Manifest =>
      pb.ArtifactManifest.decode(pb.SignedManifest.decode(Buffer.from(saved.manifest!, "base64")).manifest);
    for (;;) {
      switch (saved.state) {
        case "FETCHING": {
          const bytes = await ctx.artifacts.manifest(p.artifact, p.version, signal);
          const v = verifyManifest(pb.SignedManifest.decode(bytes), ctx.trustedKeys);
          if (!v.ok)
            throw new UnrecoverableError(`artifact ${p.artifact} ${p.version}: ${v.message}`, {
              reason: "bad_manifest",
            });
          const m = v.manifest;
          if (m.name !== p.artifact || m.version !== p.version)
            throw new UnrecoverableError(`manifest is for ${m.name} ${m.version}`, {
              reason: "bad_manifest",
            });
          const hw = String(ctx.facts["labels.hardware"] ?? ctx.facts["os.arch"] ?? "");
          if (m.hardware.length && !m.hardware.includes(hw)) {
            throw new UnrecoverableError(`artifact is for ${m.hardware.join(", ")}, this device is ${hw}`, {
              reason: "incompatible_hardware",
            });
          }
          const installed = await installedVersion(target);
          if (installed === p.version) return { message: `${p.artifact} ${p.version} is already installed` };
          if (installed && compareValues(installed, p.version) > 0 && !p.allowDowngrade) {
            throw new UnrecoverableError(
              `refusing to downgrade ${p.artifact} from ${installed} to ${p.version} (allowDowngrade not set)`,
              { reason: "downgrade_refused" },
            );
          }
          const free = Number(ctx.facts["disk.free"] ?? Number.POSITIVE_INFINITY);
          // The download (or the chunks and their assembled content) and the unpacked release.
          const need = Math.max(Number(m.size), Number(m.contentSize ?? 0)) * 3;
          if (free < need) {
            throw new TaskFailedError(`not enough disk: ${free} bytes free, the update needs about ${need}`, {
              reason: "insufficient_disk",
            });
          }
          await save({ state: "DOWNLOADING", manifest: Buffer.from(bytes).toString("base64") });
          break;
        }
        case "DOWNLOADING": {
          const m = manifest();
          if (m.chunks.length) {
            const bytes = await assemble(ctx, m, signal);
            await save({ ...saved, state: "UNPACKING", bytes });
            break;
          }
          await download(ctx, m, p.stallTimeoutS, signal);
          await save({ ...saved, state: "UNPACKING" });
          break;
        }
        case "UNPACKING": {
          const m = manifest();
          const file = downloadedPath(ctx, m);
          // The whole content is verified again before anything is unpacked.
          await verifySha(file, m, signal);
          const staging = join(target, "releases", `.${p.version}.unpacking`);
          await rm(staging, { recursive: true, force: true });
          await mkdir(staging, { recursive: true });
          try {
            // As the agent's own user (not the archive's owners) and without setuid, setgid or
            // sticky bits (M6); every file fsynced before the switch (M12).
            await extractTar({
              file,
              cwd: staging,
              strict: true,
              preserveOwner: false,
              filter: (_path, entry) => {
                if ("mode" in entry && typeof entry.mode === "number") entry.mode &= 0o777;
                return true;
              },
            });
          } catch (err) {
            await rm(staging, { recursive: true, force: true });
            throw new UnrecoverableError(`cannot unpack the artifact: ${(err as Error).message}`, {
              reason: "bad_archive",
            });
          }
          await fsyncTree(staging);
          await rm(join(target, rel), { recursive: true, force: true });
          await rename(staging, join(target, rel));
          await fsyncPath(join(target, "releases"));
          ctx.progress(75, "unpacked");
          await save({ ...saved, state: "SWITCHING", previous: await readCurrent(target) });
          break;
        }
        case "SWITCHING": {
          await switchCurrent(target, rel);
          ctx.progress(85, `current -> ${rel}`);
          if (p.rebootRequired) {
            await save({
              ...saved,
              state: "REBOOTING",
              bootId: await ctx.system.bootId(),
              deadline: ctx.now() + p.rebootDeadlineS * 1000,
            });
            await ctx.system.reboot(); // the machine goes down; the next start resumes in REBOOTING
          } else await save({ ...saved, state: "CHECKING" });
          break;
        }
        case "REBOOTING": {
          const boot = await ctx.system.bootId();
          if (boot !== saved.bootId) {
            await save({ ...saved, state: "CHECKING" });
            break;
          }
          if (ctx.now() > (saved.deadline ?? 0)) {
            await save({
              ...saved,
              state: "ROLLING_BACK",
              why: "the new version did not confirm after a reboot before its deadline",
            });
            break;
          }
          await waitAbort(signal, (saved.deadline ?? 0) - ctx.now());
          break;
        }
        case "CHECKING": {
          const problem = await healthCheck(ctx, p, join(target, rel), signal);
          if (problem) {
            await save({ ...saved, state: "ROLLING_BACK", why: `health check failed: ${problem}` });
            break;
          }
          await save({ ...saved, state: "COMMITTED" });
          break;
        }
        case "ROLLING_BACK": {
          if (saved.previous) await switchCurrent(target, saved.previous);
          else await rm(join(target, "current"), { force: true });
          await save({ ...saved, state: "ROLLED_BACK" });
          break;
        }
        case "ROLLED_BACK": {
          await ctx.kv.del(key);
          throw new UnrecoverableError(
            `${saved.why ?? "update failed"}; rolled back to ${saved.previous ?? "nothing"}`,
            { reason: "rolled_back" },
          );
        }
        case "COMMITTED": {
          const m = manifest();
          await prune(target, p.version, saved.previous);
          await rm(downloadedPath(ctx, m), { force: true });
          if (m.chunks.length)
            await ctx.artifacts.installed?.(
              p.artifact,
              p.version,
              m.chunks.map((c) => hexOf(c.sha256)),
            );
          await ctx.kv.del(key);
          // Dropped peers travel in the saved record as "dropped:<id>" keys (with 0 bytes).
          const all = Object.entries(saved.bytes ?? {});
          const bytes = Object.fromEntries(all.filter(([k]) => !k.startsWith("dropped:")));
          const dropped = all.filter(([k]) => k.startsWith("dropped:")).map(([k]) => k.slice(8));
          const from = saved.bytes
            ? ` (bytes: ${Object.entries(bytes)
                .filter(([, n]) => n)
                .map(([k, n]) => `${n} ${k}`)
                .join(
                  ", ",
                )})${dropped.length ? `; dropped peer(s) that served bad chunks: ${dropped.join(", ")}` : ""}`
            : "";
          return {
            message: `${p.artifact} ${p.version} installed${saved.previous ? ` (was ${saved.previous})` : ""}${from}`,
            ...(saved.bytes ? { bytesBySource: bytes } : {}),
            ...(dropped.length ? { droppedPeers: dropped } : {}),
          };
        }
      }
    }
  },
});

/** For power-cut tests: FLEET_TEST_CRASH_AT=<state> kills the agent right after saving that state. */
function crashPoint(state: UpdateState): void {
  if (process.env.FLEET_TEST_CRASH_AT === state) process.kill(process.pid, "SIGKILL");
}

function blobPath(ctx: TaskContext, sha: string): string {
  return join(ctx.dataDir, "downloads", sha);
}

const hexOf = (b: Uint8Array | null | undefined) => Buffer.from(b ?? []).toString("hex");

/** The downloaded file: the blob, or for a chunked artifact its assembled (uncompressed) content. */
function downloadedPath(ctx: TaskContext, m: Manifest): string {
  return m.chunks.length
    ? join(ctx.dataDir, "downloads", `${hexOf(m.contentSha256)}.tar`)
    : blobPath(ctx, m.sha256);
}

/**
 * A chunked artifact's content, chunk by chunk in order, each from the nearest source that has
 * it (ctx.artifacts.chunk: cache, peers, center — verified there against the manifest before it
 * is used); a few fetched ahead. Resume is per chunk: after an interruption the chunks already
 * fetched come from the cache. Returns the bytes by source.
 */
async function assemble(ctx: TaskContext, m: Manifest, signal: AbortSignal): Promise<Record<string, number>> {
  const chunk = ctx.artifacts.chunk;
  if (!chunk)
    throw new UnrecoverableError("this agent cannot fetch chunked artifacts", {
      reason: "no_artifact_source",
    });
  const file = downloadedPath(ctx, m);
  await mkdir(join(ctx.dataDir, "downloads"), { recursive: true });
  const size = Number(m.contentSize);
  const bytes: Record<string, number> = { local: 0, peers: 0, gateway: 0, center: 0 };
  const list = m.chunks.map((c) => ({ sha256: hexOf(c.sha256), size: Number(c.size ?? 0) }));
  const artifact = `${m.name}@${m.version}`;
  const partial = `${file}.partial`;
  const fh = await open(partial, "w");
  const AHEAD = 4;
  const pending: Array<ReturnType<typeof chunk>> = [];
  let written = 0;
  try {
    for (let i = 0; i < list.length; i++) {
      while (pending.length < AHEAD && i + pending.length < list.length) {
        const p = chunk(list[i + pending.length]!, signal, artifact);
        p.catch(() => {}); // awaited in order below
        pending.push(p);
      }
      const { data, source } = await pending.shift()!;
      await fh.write(data);
      written += data.length;
      bytes[source] = (bytes[source] ?? 0) + data.length;
      ctx.progress(Math.floor((written / Math.max(1, size)) * 60), `assembled ${written}/${size} bytes`);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  if (written !== size)
    throw new TaskFailedError(`the chunks add up to ${written} bytes, the manifest says ${size}`, {
      reason: "corrupt_artifact",
    });
  await rename(partial, file);
  const dropped = ctx.artifacts.droppedPeers?.(artifact) ?? [];
  if (dropped.length)
    ctx.log.warn({ peers: dropped }, "peers served chunks that did not match the signed manifest");
  return { ...bytes, ...Object.fromEntries(dropped.map((id) => [`dropped:${id}`, 0])) };
}

async function readCurrent(target: string): Promise<string | null> {
  return readlink(join(target, "current")).catch(() => null);
}

async function installedVersion(target: string): Promise<string | undefined> {
  const cur = await readCurrent(target);
  return cur?.startsWith("releases/") ? cur.slice("releases/".length) : undefined;
}

/** Atomic: a new relative link, renamed over `current`. */
async function switchCurrent(target: string, rel: string): Promise<void> {
  const tmp = join(target, ".current.new");
  await rm(tmp, { force: true });
  await symlink(rel, tmp);
  await rename(tmp, join(target, "current"));
  await fsyncPath(target);
}

function waitAbort(signal: AbortSignal, ms?: number): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason);
    const timer = ms !== undefined ? setTimeout(resolve, Math.max(0, ms)) : undefined;
    signal.addEventListener(
      "abort",
      () => {
        if (timer) clearTimeout(timer);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}

/** Resumes a partial download with Range; never reads past the manifest's size; aborts a stalled transfer. */
async function download(ctx: TaskContext, m: Manifest, stallS: number, signal: AbortSignal): Promise<string> {
  const size = Number(m.size);
  const dir = join(ctx.dataDir, "downloads");
  await mkdir(dir, { recursive: true });
  const file = blobPath(ctx, m.sha256);
  const partial = `${file}.partial`;
  if ((await stat(file).catch(() => undefined))?.size === size) return file;
  let have = (await stat(partial).catch(() => undefined))?.size ?? 0;
  if (have > size) {
    await rm(partial, { force: true });
    have = 0;
  }
  const stall = new AbortController();
  const both = AbortSignal.any([signal, stall.signal]);
  let timer = setTimeout(() => stall.abort(), stallS * 1000);
  const fh = await open(partial, have ? "a" : "w");
  try {
    if (have < size) {
      const res = await ctx.artifacts.blob(m.sha256, have, both);
      if (have && res.status !== 206) {
        // The server ignored the range: start over.
        await fh.truncate(0);
        have = 0;
      }
      for await (const chunk of res.body) {
        clearTimeout(timer);
        timer = setTimeout(() => stall.abort(), stallS * 1000);
        if (have + chunk.length > size) {
          throw new TaskFailedError(`the server sent more than the manifest's ${size} bytes`, {
            reason: "oversized_download",
          });
        }
        await fh.write(chunk);
        have += chunk.length;
        ctx.progress(Math.floor((have / size) * 60), `downloaded ${have}/${size} bytes`);
      }
    }
    await fh.sync();
  } catch (err) {
    if (stall.signal.aborted && !signal.aborted) {
      throw new TaskFailedError(`download stalled: no data for ${stallS}s at ${have}/${size} bytes`, {
        reason: "download_stalled",
      });
    }
    throw err;
  } finally {
    clearTimeout(timer);
    await fh.close();
  }
  if (have !== size)
    throw new TaskFailedError(`download ended at ${have}/${size} bytes`, { reason: "download_incomplete" });
  await rename(partial, file);
  return file;
}

async function verifySha(file: string, m: Manifest, signal: AbortSignal): Promise<void> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(file, { signal })) h.update(chunk as Buffer);
  const got = h.digest("hex");
  const want = m.chunks.length ? hexOf(m.contentSha256) : m.sha256;
  if (got !== want) {
    await rm(file, { force: true });
    throw new UnrecoverableError(
      `artifact sha256 ${got.slice(0, 16)}… does not match the manifest's ${want.slice(0, 16)}…`,
      { reason: "corrupt_artifact" },
    );
  }
}

async function healthCheck(
  ctx: TaskContext,
  p: Params,
  releaseDir: string,
  signal: AbortSignal,
): Promise<string | undefined> {
  const hc = p.healthCheck;
  if (!hc) return undefined;
  const limit = AbortSignal.any([signal, AbortSignal.timeout(hc.timeoutS * 1000)]);
  if (hc.url) {
    try {
      const res = await fetch(hc.url, { signal: limit });
      return res.ok ? undefined : `${hc.url} answered ${res.status}`;
    } catch (err) {
      if (signal.aborted) throw signal.reason;
      return `${hc.url}: ${(err as Error).message}`;
    }
  }
  const [command, ...args] = hc.command!;
  try {
    const r = await runCommand(command!, args, {
      cwd: releaseDir,
      env: taskEnv(ctx.root, ctx.scratchDir, { FLEET_RELEASE: releaseDir }),
      signal: limit,
      outputLimit: ctx.policy.outputLimitBytes,
    });
    return r.code === 0
      ? undefined
      : `${describeExit(command!, r)}${r.output ? `: ${r.output.trim().slice(-200)}` : ""}`;
  } catch (err) {
    if (signal.aborted) throw signal.reason;
    return limit.aborted ? `${command} did not finish within ${hc.timeoutS}s` : (err as Error).message;
  }
}

/** Keeps the new release and the one it replaced (KEEP_RELEASES = 2); removes the others. */
async function prune(target: string, version: string, previous: string | null | undefined): Promise<void> {
  const dir = join(target, "releases");
  const keep = new Set([version]);
  if (previous?.startsWith("releases/") && KEEP_RELEASES > 1) keep.add(previous.slice("releases/".length));
  for (const e of await readdir(dir).catch(() => [] as string[])) {
    if (!keep.has(e)) await rm(join(dir, e), { recursive: true, force: true });
  }
}
