import { randomBytes } from "node:crypto";
import protobuf from "protobufjs/minimal.js";
import { type Envelope, pb } from "./index.js";

export const PROTOCOL_VERSION = 1;
export const DEFAULT_MAX_PAYLOAD = 256 * 1024;

export type BodyKind = NonNullable<InstanceType<typeof pb.Envelope>["body"]>;

/** Why a payload was dropped; each has a counter on the receiving side. */
export type DropReason = "oversized" | "undecodable" | "wrong_version" | "empty_body" | "unexpected_body";

export class PayloadError extends Error {
  constructor(
    readonly reason: DropReason,
    detail: string,
  ) {
    super(`${reason}: ${detail}`);
    this.name = "PayloadError";
  }
}

/**
 * Unique per sender: a random prefix drawn once per process and a counter (16 hex digits, as
 * before), instead of 8 random bytes per message — a syscall-free id on the hot path.
 */
const MSG_PREFIX = randomBytes(4).toString("hex");
let msgCounter = 0;
export function newMsgId(): string {
  msgCounter = (msgCounter + 1) >>> 0;
  return MSG_PREFIX + msgCounter.toString(16).padStart(8, "0");
}

export function encodeEnvelope(
  body: Omit<Envelope, "protocolVersion" | "msgId" | "sentAtMs">,
  nowMs = Date.now(),
) {
  return pb.Envelope.encode({
    protocolVersion: PROTOCOL_VERSION,
    msgId: newMsgId(),
    sentAtMs: nowMs,
    ...body,
  }).finish();
}

/** Field keys (number << 3 | wire type) of fleet.proto, for `encodeStatusBatch`. */
const STATUS_BATCH_STATUSES = (1 << 3) | 2;
const STATUS_BATCH_EPOCH = (2 << 3) | 2;
const STATUS_BATCH_ACKED_SEQ = (3 << 3) | 0;
const ENVELOPE_STATUS_BATCH = (15 << 3) | 2;

/**
 * A StatusBatch envelope from statuses already encoded — the outbox keeps each status as the
 * bytes it wrote to disk — so that none is encoded again to be sent (issue 17). The same bytes
 * as `encodeEnvelope({ statusBatch })` (test/unit/proto.test.ts).
 */
export function encodeStatusBatch(
  statuses: readonly Uint8Array[],
  epoch: string,
  ackedSeq: number,
  nowMs = Date.now(),
): Uint8Array {
  const batch = protobuf.Writer.create();
  for (const s of statuses) batch.uint32(STATUS_BATCH_STATUSES).bytes(s);
  if (epoch) batch.uint32(STATUS_BATCH_EPOCH).string(epoch);
  if (ackedSeq) batch.uint32(STATUS_BATCH_ACKED_SEQ).uint64(ackedSeq);
  return pb.Envelope.encode({ protocolVersion: PROTOCOL_VERSION, msgId: newMsgId(), sentAtMs: nowMs })
    .uint32(ENVELOPE_STATUS_BATCH)
    .bytes(batch.finish())
    .finish();
}

/** The bytes a message of `n` bytes takes inside another (its length prefix and itself). */
export function delimitedSize(n: number): number {
  return n + (n < 0x80 ? 1 : n < 0x4000 ? 2 : n < 0x200000 ? 3 : n < 0x10000000 ? 4 : 5);
}

/**
 * Decodes and checks an Envelope. Throws PayloadError (never anything else) so that
 * callers can count the reason and drop the message.
 */
export function decodeEnvelope(
  payload: Uint8Array,
  maxBytes = DEFAULT_MAX_PAYLOAD,
): InstanceType<typeof pb.Envelope> & { body: BodyKind } {
  if (payload.length > maxBytes) {
    throw new PayloadError("oversized", `${payload.length} bytes > limit ${maxBytes}`);
  }
  let env: InstanceType<typeof pb.Envelope>;
  try {
    env = pb.Envelope.decode(payload);
  } catch (err) {
    throw new PayloadError("undecodable", (err as Error).message);
  }
  if (env.protocolVersion !== PROTOCOL_VERSION) {
    throw new PayloadError(
      "wrong_version",
      `protocol_version ${env.protocolVersion}, expected ${PROTOCOL_VERSION}`,
    );
  }
  if (!env.body) throw new PayloadError("empty_body", "envelope carries no body");
  return env as InstanceType<typeof pb.Envelope> & { body: BodyKind };
}
