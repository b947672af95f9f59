// Bounding what tasks and devices produce: a task's output tail, and a status as a whole.
import type { TaskStatus } from "../proto/index.js";

/** Keeps the last `limit` bytes written, and counts what it dropped. */
export class OutputTail {
  private chunks: Buffer[] = [];
  private size = 0;
  private dropped = 0;

  constructor(private readonly limit: number) {}

  write(chunk: Buffer | string): void {
    const buf = typeof chunk === "string" ? Buffer.from(chunk) : chunk;
    this.chunks.push(buf);
    this.size += buf.length;
    while (this.size > this.limit && this.chunks.length > 0) {
      const first = this.chunks[0]!;
      const excess = this.size - this.limit;
      if (first.length <= excess) {
        this.chunks.shift();
        this.size -= first.length;
        this.dropped += first.length;
      } else {
        this.chunks[0] = first.subarray(excess);
        this.size -= excess;
        this.dropped += excess;
      }
    }
  }

  /** At most `limit` bytes, the truncation marker included. */
  toString(): string {
    const all = Buffer.concat(this.chunks);
    if (this.dropped === 0) return all.toString("utf8");
    const markerMax = `[... ${this.dropped + this.limit} bytes truncated]\n`.length;
    const cut = Math.min(all.length, Math.max(0, markerMax - (this.limit - all.length)));
    return `[... ${this.dropped + cut} bytes truncated]\n${all.subarray(cut).toString("utf8")}`;
  }
}

/** Truncates a string to its last `limit` bytes, marking the cut. */
export function truncateOutput(s: string, limit: number): string {
  if (Buffer.byteLength(s) <= limit) return s;
  const t = new OutputTail(limit);
  t.write(s);
  return t.toString();
}

const MAX_MESSAGE_BYTES = 4096;
const MAX_REASON_BYTES = 256;

/** Whether a string takes at most `limit` bytes as UTF-8 (at most 3 per UTF-16 unit). */
const fits = (v: string | null | undefined, limit: number) =>
  !v || v.length * 3 <= limit || Buffer.byteLength(v) <= limit;

/**
 * Every status the agent reports is bounded (M1): its message, reason and output are cut (the
 * tail of the output kept, the head of a message), so that whatever a task or a rejected job
 * produced, the status fits a batch and the batch the broker's payload limit.
 */
export function boundStatus(s: TaskStatus, maxBytes: number): TaskStatus {
  const outputLimit = Math.max(1024, maxBytes - MAX_MESSAGE_BYTES - 1024);
  // Nearly every status fits: then it is returned as it is, not copied (issue 17).
  if (fits(s.message, MAX_MESSAGE_BYTES) && fits(s.reason, MAX_REASON_BYTES) && fits(s.output, outputLimit))
    return s;
  const head = (v: string | null | undefined, limit: number) => {
    if (!v || Buffer.byteLength(v) <= limit) return v ?? "";
    const cut = Buffer.from(v).subarray(0, limit - 16).toString("utf8").replace(/\uFFFD$/, "");
    return `${cut} [… truncated]`;
  };
  const out = { ...s, message: head(s.message, MAX_MESSAGE_BYTES), reason: head(s.reason, MAX_REASON_BYTES) };
  if (s.output && Buffer.byteLength(s.output) > outputLimit) out.output = truncateOutput(s.output, outputLimit);
  return out;
}
