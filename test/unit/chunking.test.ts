// Content-defined chunking (common/chunking.ts): sizes within bounds, the same cuts however the
// stream is split, an edit changes the chunks near it only, and the gear table is the contract
// (a known input's cuts are pinned: changing the table or masks would break every signed
// manifest's chunk list).
import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import { CHUNK_MAX, CHUNK_MIN, chunkStream } from "../../common/chunking.js";

/** Deterministic pseudo-random bytes (sha256 in counter mode). */
function bytes(n: number, seed = "x"): Buffer {
  const out = Buffer.alloc(n);
  for (let i = 0, k = 0; i < n; i += 32, k++)
    createHash("sha256")
      .update(`${seed}-${k}`)
      .digest()
      .copy(out, i, 0, Math.min(32, n - i));
  return out;
}

async function cuts(data: Buffer, piece: number) {
  async function* parts() {
    for (let i = 0; i < data.length; i += piece) yield data.subarray(i, i + piece);
  }
  return chunkStream(parts());
}

describe("chunking", () => {
  const data = bytes(6 * 1024 * 1024);

  it("sizes stay within the bounds and add up; the split of the stream does not matter", async () => {
    const a = await cuts(data, 1 << 20);
    const b = await cuts(data, 4093);
    expect(b.chunks).toEqual(a.chunks);
    expect(a.contentSize).toBe(data.length);
    expect(a.chunks.reduce((n, c) => n + c.size, 0)).toBe(data.length);
    for (const c of a.chunks.slice(0, -1)) {
      expect(c.size).toBeGreaterThanOrEqual(CHUNK_MIN);
      expect(c.size).toBeLessThanOrEqual(CHUNK_MAX);
    }
    const avg = data.length / a.chunks.length;
    expect(avg).toBeGreaterThan(40 * 1024);
    expect(avg).toBeLessThan(110 * 1024);
  });

  it("an edit in the middle changes only the chunks around it", async () => {
    const a = await cuts(data, 65536);
    const edited = Buffer.from(data);
    bytes(64 * 1024, "edit").copy(edited, 3 * 1024 * 1024);
    const b = await cuts(edited, 65536);
    const before = new Set(a.chunks.map((c) => c.sha256));
    const fresh = b.chunks.filter((c) => !before.has(c.sha256)).reduce((n, c) => n + c.size, 0);
    expect(fresh).toBeGreaterThanOrEqual(64 * 1024);
    expect(fresh).toBeLessThan(64 * 1024 + 2 * CHUNK_MAX);
    // Inserting bytes shifts everything after it, yet the later chunks are the same.
    const inserted = Buffer.concat([data.subarray(0, 1000), Buffer.from("inserted"), data.subarray(1000)]);
    const c = await cuts(inserted, 65536);
    const shared = c.chunks.filter((x) => before.has(x.sha256)).length;
    expect(shared).toBeGreaterThan(a.chunks.length - 3);
  });

  it("the cuts of a known input are pinned (the gear table and masks are a contract)", async () => {
    const a = await cuts(bytes(1024 * 1024, "pinned"), 1 << 20);
    expect(a.chunks.map((c) => c.size)).toMatchSnapshot();
  });
});
