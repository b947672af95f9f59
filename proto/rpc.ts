// Operator RPC over MQTT 3.1.1 (aedes has no response-topic): the correlation id and the
// reply address travel in the signed RpcCall; the controller answers on
// rpc/res/{operator}/{clientId}, the operator being the owner of the signing key.
import { createPrivateKey, type KeyObject, randomBytes, sign } from "node:crypto";
import { pb } from "./index.js";
import { verifies } from "./signing.js";

export type RpcCall = InstanceType<typeof pb.RpcCall>;

export function signRpcCall(
  call: { requestId: string; clientId: string; method: string; params: unknown; nowMs?: number },
  privateKey: KeyObject | string,
  keyId: string,
) {
  const bytes = pb.RpcCall.encode({
    requestId: call.requestId,
    clientId: call.clientId,
    method: call.method,
    paramsJson: JSON.stringify(call.params ?? {}),
    issuedAtMs: call.nowMs ?? Date.now(),
    nonce: randomBytes(16).toString("hex"),
  }).finish();
  const key = typeof privateKey === "string" ? createPrivateKey(privateKey) : privateKey;
  return { call: bytes, signature: sign(null, bytes, key), keyId };
}

export type RpcCheck = { ok: true; call: RpcCall; params: unknown } | { ok: false; error: string };

/** Signature, time window and decoding; the nonce check is the caller's (it needs storage). */
export function verifyRpcRequest(
  req: { call?: Uint8Array | null; signature?: Uint8Array | null; keyId?: string | null },
  keys: ReadonlyMap<string, KeyObject>,
  nowMs: number,
  windowMs: number,
): RpcCheck {
  if (!req.call?.length || !req.signature?.length || !req.keyId)
    return { ok: false, error: "unsigned request" };
  const key = keys.get(req.keyId);
  if (!key) return { ok: false, error: `unknown operator key ${req.keyId}` };
  if (!verifies(req.call, key, req.signature)) return { ok: false, error: "bad signature" };
  let call: RpcCall;
  let params: unknown;
  try {
    call = pb.RpcCall.decode(req.call);
    params = call.paramsJson ? JSON.parse(call.paramsJson) : {};
  } catch (err) {
    return { ok: false, error: `malformed request: ${(err as Error).message}` };
  }
  if (Math.abs(call.issuedAtMs - nowMs) > windowMs)
    return { ok: false, error: "request outside the time window (clock skew or replay)" };
  if (!call.nonce || !call.requestId || !call.clientId)
    return { ok: false, error: "request lacks nonce, id or client id" };
  // The reply goes to rpc/res/{operator}/{clientId}: one topic level, no wildcards.
  if (!/^[A-Za-z0-9._-]{1,128}$/.test(call.clientId))
    return { ok: false, error: "client id is not a plain topic level ([A-Za-z0-9._-]{1,128})" };
  return { ok: true, call, params };
}
