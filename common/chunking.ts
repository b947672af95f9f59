// Content-defined chunking (FastCDC, Xia et al., USENIX ATC 2016) of an artifact's uncompressed
// content (DESIGN.md §11): a cut depends only on the 32 bytes before it, so an edit moves the
// boundaries near it and nowhere else, and two releases share every chunk the edit did not
// touch. Normalized chunking (a stricter mask before the average size, a looser one after)
// keeps sizes close to the average. The gear table and masks are part of the manifest
// contract: the CLI that signs, the server that stores and the agents that verify must cut the
// same bytes the same way — never change them.
import { createHash } from "node:crypto";

export const CHUNK_MIN = 16 * 1024;
export const CHUNK_AVG = 64 * 1024;
export const CHUNK_MAX = 256 * 1024;

/** 256 fixed pseudo-random 32-bit values: sha256("edgefleet-gear-<i>"), first 4 bytes. */
const GEAR = new Uint32Array(256);
for (let i = 0; i < 256; i++) GEAR[i] = createHash("sha256").update(`edgefleet-gear-${i}`).digest().readUInt32BE(0);

// The fingerprint's top bits depend on the last 32 bytes (it shifts left once a byte). Average
// 2^16: 18 bits must be zero before the average size, 14 after (normalization level 2).
const MASK_S = 0xffffc000 >>> 0;
const MASK_L = 0xfffc0000 >>> 0;

/** Where the first chunk of `buf[start, end)` ends (an offset into `buf`). */
export function cutPoint(buf: Uint8Array, start: number, end: number): number {
  let n = end - start;
  if (n <= CHUNK_MIN) return end;
  if (n > CHUNK_MAX) n = CHUNK_MAX;
  const normal = Math.min(n, CHUNK_AVG);
  let fp = 0;
  let i = start + CHUNK_MIN;
  const mid = start + normal;
  const last = start + n;
  for (; i < mid; i++) {
    fp = ((fp << 1) + GEAR[buf[i]!]!) >>> 0;
    if ((fp & MASK_S) === 0) return i + 1;
  }
  for (; i < last; i++) {
    fp = ((fp << 1) + GEAR[buf[i]!]!) >>> 0;
    if ((fp & MASK_L) === 0) return i + 1;
  }
  return last;
}

/**
 * Cuts a stream into chunks as it comes: `push` returns the chunks that are complete, `end`
 * the rest. A chunk is final only once CHUNK_MAX bytes follow its start (or the stream ended).
 */
export class Chunker {
  private parts: Buffer[] = [];
  private size = 0;

  push(data: Buffer): Buffer[] {
    this.parts.push(data);
    this.size += data.length;
    if (this.size < CHUNK_MAX * 4) return [];
    return this.cut(false);
  }

  end(): Buffer[] {
    return this.cut(true);
  }

  private cut(final: boolean): Buffer[] {
    const buf = this.parts.length === 1 ? this.parts[0]! : Buffer.concat(this.parts);
    const out: Buffer[] = [];
    let at = 0;
    while (at < buf.length && (final || buf.length - at >= CHUNK_MAX)) {
      const cut = cutPoint(buf, at, buf.length);
      out.push(buf.subarray(at, cut));
      at = cut;
    }
    const rest = buf.subarray(at);
    this.parts = rest.length ? [rest] : [];
    this.size = rest.length;
    return out;
  }
}

export interface ChunkList {
  chunks: Array<{ sha256: string; size: number }>;
  contentSha256: string;
  contentSize: number;
}

/** Chunks and hashes a stream of content (each chunk by sha256, and the whole). */
export async function chunkStream(
  source: AsyncIterable<Buffer>,
  onChunk?: (chunk: Buffer, sha256: string) => void | Promise<void>,
): Promise<ChunkList> {
  const chunker = new Chunker();
  const whole = createHash("sha256");
  const chunks: ChunkList["chunks"] = [];
  let contentSize = 0;
  const take = async (list: Buffer[]) => {
    for (const c of list) {
      const sha256 = createHash("sha256").update(c).digest("hex");
      chunks.push({ sha256, size: c.length });
      await onChunk?.(c, sha256);
    }
  };
  for await (const data of source) {
    whole.update(data);
    contentSize += data.length;
    await take(chunker.push(data));
  }
  await take(chunker.end());
  return { chunks, contentSha256: whole.digest("hex"), contentSize };
}
