// The agent's chunk cache (DESIGN.md §11): chunks of chunked artifacts, uncompressed, named by
// their sha256, under <dataDir>/chunks. A chunk is taken from here, else from the site's peers
// (agent/peers.ts), else from the center — and verified against the signed manifest's sha256
// and size before it is written here or used. Bounded (`chunkCacheBytes`): the chunks of each
// artifact's current and previous release are kept, and those used in the last 10 minutes (a
// download in progress); the others go least recently used first.
import { createHash } from "node:crypto";
import { mkdir, readdir, readFile, rename, rm, stat, utimes, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { gunzipSync } from "node:zlib";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { TaskFailedError } from "../firmware-tasks/errors.js";
import type { ByteSource } from "../firmware-tasks/types.js";

export interface ChunkRequest {
  sha256: string;
  size: number;
}

/** Somewhere else to get a chunk (the site's peers); undefined when none could give it. */
export interface ChunkPeers {
  fetch(
    c: ChunkRequest,
    signal: AbortSignal,
    artifact?: string,
  ): Promise<{ data: Buffer; source: ByteSource } | undefined>;
}

export interface ChunkStoreOptions {
  dir: string;
  maxBytes: number;
  log: Logger;
  counters: Counters;
  /** A gzipped chunk from the center. */
  center(sha256: string, signal: AbortSignal): Promise<Buffer>;
  peers?: ChunkPeers;
  now?(): number;
}

/** A chunk used this recently is never evicted (a download in progress may still need it). */
const IN_USE_MS = 10 * 60_000;

interface Releases {
  /** artifact -> its installed releases, newest last (two kept): version and chunks. */
  [artifact: string]: Array<{ version: string; chunks: string[] }>;
}

export class ChunkStore {
  private readonly entries = new Map<string, { size: number; usedAt: number }>();
  private total = 0;
  private releases: Releases = {};
  private pinned = new Set<string>();

  constructor(private readonly opts: ChunkStoreOptions) {}

  private now(): number {
    return this.opts.now?.() ?? Date.now();
  }

  async open(): Promise<void> {
    await mkdir(this.opts.dir, { recursive: true });
    for (const name of await readdir(this.opts.dir)) {
      if (name.endsWith(".tmp")) {
        await rm(join(this.opts.dir, name), { force: true });
        continue;
      }
      if (!/^[0-9a-f]{64}$/.test(name)) continue;
      const st = await stat(join(this.opts.dir, name)).catch(() => undefined);
      if (!st) continue;
      this.entries.set(name, { size: st.size, usedAt: st.mtimeMs });
      this.total += st.size;
    }
    this.releases = JSON.parse(
      await readFile(join(this.opts.dir, "releases.json"), "utf8").catch(() => "{}"),
    ) as Releases;
    this.repin();
    this.opts.counters.set("chunk_cache_bytes", this.total);
  }

  has(sha256: string): boolean {
    return this.entries.has(sha256);
  }

  /** The artifacts (name@version) whose chunks are all here: announced to the site's peers. */
  held(): string[] {
    const out: string[] = [];
    for (const [artifact, list] of Object.entries(this.releases))
      for (const r of list)
        if (r.chunks.every((c) => this.entries.has(c))) out.push(`${artifact}@${r.version}`);
    return out;
  }

  /** A cached chunk, read and verified again (a cache on disk can rot or be tampered with). */
  async local(c: ChunkRequest): Promise<Buffer | undefined> {
    if (!this.entries.has(c.sha256)) return undefined;
    const data = await readFile(join(this.opts.dir, c.sha256)).catch(() => undefined);
    if (!data || !matches(data, c)) {
      this.opts.counters.inc("chunk_cache_corrupt");
      this.opts.log.warn(
        { chunk: c.sha256.slice(0, 12) },
        "a cached chunk did not verify; fetching it again",
      );
      await this.drop(c.sha256);
      return undefined;
    }
    const now = this.now();
    this.entries.get(c.sha256)!.usedAt = now;
    await utimes(join(this.opts.dir, c.sha256), now / 1000, now / 1000).catch(() => {});
    return data;
  }

  /** A cached chunk as it is on disk, for a peer (who verifies it); undefined if not here. */
  async read(sha256: string): Promise<Buffer | undefined> {
    if (!this.entries.has(sha256)) return undefined;
    return readFile(join(this.opts.dir, sha256)).catch(() => undefined);
  }

  /** The chunk from the nearest source that has it; cached once verified. */
  async get(
    c: ChunkRequest,
    signal: AbortSignal,
    artifact?: string,
  ): Promise<{ data: Buffer; source: ByteSource }> {
    const cached = await this.local(c);
    if (cached) return { data: cached, source: "local" };
    const fromPeers = await this.opts.peers?.fetch(c, signal, artifact);
    if (fromPeers) {
      await this.put(c.sha256, fromPeers.data);
      return fromPeers;
    }
    const gz = await this.opts.center(c.sha256, signal);
    let data: Buffer;
    try {
      data = gunzipSync(gz, { maxOutputLength: c.size + 1 });
    } catch (err) {
      throw new TaskFailedError(
        `chunk ${c.sha256.slice(0, 12)}… from the center: ${(err as Error).message}`,
        {
          reason: "corrupt_artifact",
        },
      );
    }
    if (!matches(data, c))
      throw new TaskFailedError(
        `chunk ${c.sha256.slice(0, 12)}… from the center does not match the manifest`,
        {
          reason: "corrupt_artifact",
        },
      );
    await this.put(c.sha256, data);
    return { data, source: "center" };
  }

  /** Remembers an installed release (its chunks stay, with the previous one's). */
  async installed(artifact: string, version: string, chunks: readonly string[]): Promise<void> {
    const list = (this.releases[artifact] ?? []).filter((r) => r.version !== version);
    list.push({ version, chunks: [...chunks] });
    this.releases[artifact] = list.slice(-2);
    const file = join(this.opts.dir, "releases.json");
    await writeFile(`${file}.tmp`, JSON.stringify(this.releases));
    await rename(`${file}.tmp`, file);
    this.repin();
    await this.evict();
  }

  private async put(sha256: string, data: Buffer): Promise<void> {
    if (this.entries.has(sha256)) return;
    const target = join(this.opts.dir, sha256);
    const tmp = `${target}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    await writeFile(tmp, data);
    await rename(tmp, target);
    this.entries.set(sha256, { size: data.length, usedAt: this.now() });
    this.total += data.length;
    await this.evict();
  }

  private async drop(sha256: string): Promise<void> {
    const e = this.entries.get(sha256);
    if (!e) return;
    this.entries.delete(sha256);
    this.total -= e.size;
    await rm(join(this.opts.dir, sha256), { force: true });
  }

  private repin(): void {
    this.pinned = new Set(Object.values(this.releases).flatMap((list) => list.flatMap((r) => r.chunks)));
  }

  /** Least recently used first, never a chunk of a current or previous release. */
  private async evict(): Promise<void> {
    if (this.total > this.opts.maxBytes) {
      // Over the bound for a while rather than evicting what a download is assembling.
      const recent = this.now() - IN_USE_MS;
      const victims = [...this.entries]
        .filter(([sha, e]) => !this.pinned.has(sha) && e.usedAt < recent)
        .sort((a, b) => a[1].usedAt - b[1].usedAt);
      for (const [sha] of victims) {
        if (this.total <= this.opts.maxBytes) break;
        await this.drop(sha);
        this.opts.counters.inc("chunk_cache_evicted");
      }
    }
    this.opts.counters.set("chunk_cache_bytes", this.total);
  }
}

/** A chunk is what the signed manifest says: its size and sha256. */
export function matches(data: Buffer, c: ChunkRequest): boolean {
  return data.length === c.size && createHash("sha256").update(data).digest("hex") === c.sha256;
}
