// The agent's chunk cache (agent/chunks.ts) on a real directory: a chunk from the center is
// verified before it is cached; a cached chunk that rots on disk is fetched again; the bound
// evicts least recently used chunks but never those of an artifact's current and previous
// release; a peer's bad chunk is never used.
import { createHash, randomBytes } from "node:crypto";
import { readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import { afterEach, describe, expect, it } from "vitest";
import { ChunkStore } from "../../agent/chunks.js";
import { Counters } from "../../common/counters.js";
import { quietLog } from "../helpers/harness.js";
import { tempDir } from "../helpers/keys.js";

const dirs: Array<{ cleanup(): void }> = [];
afterEach(() => {
  for (const d of dirs.splice(0)) d.cleanup();
});

function chunks(n: number, size = 1000) {
  return Array.from({ length: n }, () => {
    const data = randomBytes(size);
    return { data, sha256: createHash("sha256").update(data).digest("hex"), size };
  });
}

describe("chunk cache", () => {
  it("verifies, refetches what rots, and keeps the current and previous release within its bound", async () => {
    const d = tempDir("fleet-cc-");
    dirs.push(d);
    const all = chunks(12);
    const served = new Map(all.map((c) => [c.sha256, c.data]));
    let centerCalls = 0;
    let lie = false;
    const counters = new Counters();
    let clock = 1_000_000;
    const store = new ChunkStore({
      now: () => clock,
      dir: join(d.dir, "chunks"),
      maxBytes: 6000,
      log: quietLog,
      counters,
      center: async (sha) => {
        centerCalls++;
        return gzipSync(lie ? randomBytes(1000) : served.get(sha)!);
      },
    });
    await store.open();
    const signal = new AbortController().signal;
    const req = (i: number) => ({ sha256: all[i]!.sha256, size: 1000 });
    // Release 1 = chunks 0-2, release 2 = chunks 3-5: both pinned once installed.
    for (const i of [0, 1, 2, 3, 4, 5]) expect((await store.get(req(i), signal)).source).toBe("center");
    await store.installed(
      "app",
      "1",
      [0, 1, 2].map((i) => all[i]!.sha256),
    );
    await store.installed(
      "app",
      "2",
      [3, 4, 5].map((i) => all[i]!.sha256),
    );
    expect(store.held().sort()).toEqual(["app@1", "app@2"]);
    // Over the bound with chunks in use (a download assembling): kept for now.
    await store.get(req(6), signal);
    await store.get(req(7), signal);
    expect(store.has(all[6]!.sha256) && store.has(all[7]!.sha256)).toBe(true);
    // Later: unpinned chunks go, least recently used first; pinned ones and the newest stay.
    clock += 11 * 60_000;
    await store.get(req(8), signal);
    for (const i of [0, 1, 2, 3, 4, 5, 8]) expect(store.has(all[i]!.sha256)).toBe(true);
    expect(store.has(all[6]!.sha256) || store.has(all[7]!.sha256)).toBe(false);
    expect(counters.get("chunk_cache_evicted")).toBe(2);
    // A third release: the first is no longer kept, and its chunks may go.
    clock += 11 * 60_000;
    await store.installed("app", "3", [all[8]!.sha256]);
    expect(store.held()).not.toContain("app@1");
    expect(store.held()).toEqual(expect.arrayContaining(["app@2", "app@3"]));
    // A cached chunk that rotted on disk is fetched again, not used.
    writeFileSync(join(d.dir, "chunks", all[4]!.sha256), randomBytes(1000));
    const calls = centerCalls;
    expect((await store.get(req(4), signal)).source).toBe("center");
    expect(centerCalls).toBe(calls + 1);
    expect(counters.get("chunk_cache_corrupt")).toBe(1);
    // A center (or anyone) sending other bytes: refused, nothing cached.
    lie = true;
    await expect(store.get(req(10), signal)).rejects.toThrow(/does not match the manifest/);
    expect(readdirSync(join(d.dir, "chunks")).filter((f) => f === all[10]!.sha256)).toEqual([]);
  });
});
