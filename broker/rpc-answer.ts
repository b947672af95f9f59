// Answering one operator request (DESIGN.md §7): the same checks wherever requests are served —
// by the controller, and by a site gateway for its own devices while the center is unreachable
// (DESIGN.md §11): signature by a trusted operator key, time window, nonce never seen, known
// method, params against the typed API's schema, and a reply that fits the payload limit.
import type { KeyObject } from "node:crypto";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { ApiError, api, formatIssues, isMethod, RpcErrorCode } from "../proto/api.js";
import { decodeEnvelope, encodeEnvelope, PayloadError } from "../proto/envelope.js";
import { verifyRpcRequest } from "../proto/rpc.js";
import { rpcResponseTopic } from "../proto/topics.js";

/** How far a request's signed time may be from ours. */
export const RPC_WINDOW_MS = 5 * 60_000;

export interface RpcAnswerContext {
  prefix: string;
  maxPayloadBytes: number;
  /** Trusted operator keys by key id, and the operator each belongs to. */
  keys: ReadonlyMap<string, KeyObject>;
  operatorOf(keyId: string): string;
  /** True when the nonce was not seen before (and is now recorded until `expiresAt`). */
  claimNonce(nonce: string, expiresAt: number): Promise<boolean>;
  /** The handler of a method, or undefined when this server does not serve it. */
  handler(method: string): ((params: unknown, operator: string) => Promise<unknown>) | undefined;
  publish(topic: string, payload: Uint8Array): void;
  /** Called before each answer (the controller's audit log); a request is answered after it. */
  audited?(operator: string, method: string, paramsJson: string, result: string): Promise<void>;
  counters: Counters;
  log: Logger;
  /** Counter prefix for dropped payloads ("dropped_" at the controller). */
  drop(reason: string, detail: string): void;
}

export async function answerRpc(c: RpcAnswerContext, payload: Buffer): Promise<void> {
  let env: ReturnType<typeof decodeEnvelope>;
  try {
    env = decodeEnvelope(payload, c.maxPayloadBytes);
  } catch (err) {
    if (err instanceof PayloadError) return c.drop(err.reason, `rpc: ${err.message}`);
    throw err;
  }
  if (env.body !== "rpcRequest") return c.drop("unexpected_body", `${env.body} on rpc/req`);
  const req = env.rpcRequest!;
  const check = verifyRpcRequest(req, c.keys, Date.now(), RPC_WINDOW_MS);
  if (!check.ok) {
    // No verified reply address: answer nobody, count it, audit it under the claimed key.
    c.counters.inc("rpc_rejected");
    c.log.warn({ error: check.error }, "rejected an operator request");
    await c.audited?.(
      `(unverified key ${String(req.keyId ?? "").slice(0, 64)})`,
      "?",
      Buffer.from(req.call ?? []).toString("base64"),
      `refused: ${check.error}`,
    );
    return;
  }
  const { call, params } = check;
  const operator = c.operatorOf(req.keyId ?? "");
  const topic = rpcResponseTopic(c.prefix, operator, call.clientId);
  const paramsJson = JSON.stringify(params ?? {});
  const fail = async (code: RpcErrorCode, error: string): Promise<void> => {
    await c.audited?.(operator, call.method, paramsJson, `refused: ${RpcErrorCode[code] ?? code}: ${error}`);
    c.publish(
      topic,
      encodeEnvelope({ rpcResponse: { requestId: call.requestId, ok: false, error, errorCode: code } }),
    );
  };
  if (!(await c.claimNonce(call.nonce, call.issuedAtMs + RPC_WINDOW_MS))) {
    c.counters.inc("rpc_replayed");
    c.log.warn({ method: call.method }, "rejected a replayed operator request");
    return fail(RpcErrorCode.RPC_REPLAYED, "replayed request");
  }
  const method = call.method;
  const handler = isMethod(method) ? c.handler(method) : undefined;
  if (!isMethod(method) || !handler) return fail(RpcErrorCode.RPC_UNKNOWN_METHOD, `unknown method ${method}`);
  let resultJson: string;
  try {
    const parsed = api[method].params.safeParse(params);
    if (!parsed.success) return fail(RpcErrorCode.RPC_INVALID, formatIssues(parsed.error));
    resultJson = JSON.stringify((await handler(parsed.data, operator)) ?? null);
  } catch (err) {
    if (err instanceof ApiError) return fail(err.code, err.message);
    c.counters.inc("rpc_failed");
    c.log.error({ err, method }, "rpc handler failed");
    return fail(RpcErrorCode.RPC_INTERNAL, `internal error: ${(err as Error).message}`);
  }
  const reply = encodeEnvelope({ rpcResponse: { requestId: call.requestId, ok: true, resultJson } });
  if (reply.length > c.maxPayloadBytes) {
    c.counters.inc("rpc_reply_too_large");
    c.log.warn({ method, bytes: reply.length }, "reply over the payload limit; answering with an error");
    return fail(
      RpcErrorCode.RPC_TOO_LARGE,
      `the reply to ${method} would be ${reply.length} bytes, over the payload limit of ${c.maxPayloadBytes} bytes (limits.maxPayloadBytes)`,
    );
  }
  await c.audited?.(operator, method, paramsJson, "ok");
  c.publish(topic, reply);
}
