// The operator's side of the RPC (DESIGN.md §3, §7): signed requests, correlation by id,
// timeouts, and exit code 3 with a one-line reason when the server cannot be reached.
import { randomBytes } from "node:crypto";
import mqtt, { type MqttClient } from "mqtt";
import { settlesWithin } from "../common/timeout.js";
import {
  api,
  formatIssues,
  MAX_PAGE,
  type Method,
  type Params,
  type Result,
  RpcErrorCode,
} from "../proto/api.js";
import { decodeEnvelope, encodeEnvelope } from "../proto/envelope.js";
import { signRpcCall } from "../proto/rpc.js";
import { rpcRequestTopic, rpcResponseTopic } from "../proto/topics.js";
import type { LoadedContext } from "./context.js";
import { CliError, EXIT } from "./exit.js";

const CONNECT_TIMEOUT_MS = 5000;

/** The exit code for each way a request can fail (DESIGN.md §7). */
const EXIT_FOR: Record<RpcErrorCode, number> = {
  [RpcErrorCode.RPC_ERROR_UNSPECIFIED]: EXIT.USAGE,
  [RpcErrorCode.RPC_NOT_FOUND]: EXIT.FAILED,
  [RpcErrorCode.RPC_INVALID]: EXIT.USAGE,
  [RpcErrorCode.RPC_REPLAYED]: EXIT.CONNECT,
  [RpcErrorCode.RPC_UNKNOWN_METHOD]: EXIT.USAGE,
  [RpcErrorCode.RPC_TOO_LARGE]: EXIT.FAILED,
  [RpcErrorCode.RPC_INTERNAL]: EXIT.FAILED,
};

type Paged<M extends Method> = Result<M> extends { items: Array<infer T> } ? T : never;

export async function connectOperator(ctx: LoadedContext): Promise<MqttClient> {
  // Unguessable: on a broker that does not tie client ids to users, nobody can take this session.
  const clientId = `op-${ctx.username}-${randomBytes(16).toString("hex")}`;
  const client = mqtt.connect(ctx.server, {
    clientId,
    username: ctx.username,
    password: ctx.password,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: CONNECT_TIMEOUT_MS,
    protocolVersion: 4,
    ...(ctx.caPem ? { ca: ctx.caPem } : {}),
  });
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("timed out")), CONNECT_TIMEOUT_MS + 500);
      client.once("connect", () => {
        clearTimeout(timer);
        resolve();
      });
      client.once("error", (err) => {
        clearTimeout(timer);
        reject(err);
      });
      client.once("close", () => {
        clearTimeout(timer);
        reject(new Error("connection closed"));
      });
    });
  } catch (err) {
    client.end(true);
    const msg = (err as Error).message;
    const why = /bad user ?name or password|not authorized|identifier rejected/i.test(msg)
      ? `authentication failed (${msg})`
      : msg;
    throw new CliError(`cannot connect to ${ctx.server}: ${why}`, EXIT.CONNECT);
  }
  return client;
}

export class RpcClient {
  private pending = new Map<
    string,
    { method: Method; resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }
  >();

  private constructor(
    readonly client: MqttClient,
    private readonly ctx: LoadedContext,
  ) {
    client.on("message", (_topic, payload) => this.onMessage(payload));
    client.on("close", () => {
      for (const [id, p] of this.pending) {
        clearTimeout(p.timer);
        p.reject(new CliError(`connection to ${ctx.server} lost`, EXIT.CONNECT));
        this.pending.delete(id);
      }
    });
  }

  static async open(ctx: LoadedContext): Promise<RpcClient> {
    const client = await connectOperator(ctx);
    await client.subscribeAsync(rpcResponseTopic(ctx.prefix, ctx.username, client.options.clientId!), {
      qos: 1,
    });
    return new RpcClient(client, ctx);
  }

  /** One request; the result is checked against the method's schema (proto/api.ts). */
  call<M extends Method>(method: M, params: Params<M>, timeoutMs = 15_000): Promise<Result<M>> {
    const requestId = randomBytes(8).toString("hex");
    const req = signRpcCall(
      { requestId, clientId: this.client.options.clientId!, method, params },
      this.ctx.signingKeyPem,
      this.ctx.keyId,
    );
    return new Promise<Result<M>>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(
          new CliError(
            `no answer from ${this.ctx.server} to ${method} within ${timeoutMs / 1000}s (is the controller running, is the key trusted?)`,
            EXIT.CONNECT,
          ),
        );
      }, timeoutMs);
      this.pending.set(requestId, { method, resolve: resolve as (v: unknown) => void, reject, timer });
      this.client.publish(
        rpcRequestTopic(this.ctx.prefix),
        Buffer.from(encodeEnvelope({ rpcRequest: req })),
        { qos: 1 },
      );
    });
  }

  private onMessage(payload: Buffer): void {
    let res: ReturnType<typeof decodeEnvelope>["rpcResponse"];
    try {
      res = decodeEnvelope(payload).rpcResponse;
    } catch {
      return;
    }
    const p = res && this.pending.get(res.requestId ?? "");
    if (!res || !p) return;
    clearTimeout(p.timer);
    this.pending.delete(res.requestId!);
    if (!res.ok) {
      const code = res.errorCode ?? RpcErrorCode.RPC_ERROR_UNSPECIFIED;
      p.reject(new CliError(res.error || "request failed", EXIT_FOR[code] ?? EXIT.FAILED));
      return;
    }
    let result: unknown;
    try {
      result = JSON.parse(res.resultJson || "null");
    } catch (err) {
      p.reject(
        new CliError(`${p.method}: the server's reply is not JSON: ${(err as Error).message}`, EXIT.FAILED),
      );
      return;
    }
    const checked = api[p.method].result.safeParse(result);
    if (checked.success) p.resolve(checked.data);
    else
      p.reject(
        new CliError(
          `${p.method}: unexpected reply from the server (another version?): ${formatIssues(checked.error, "result")}`,
          EXIT.FAILED,
        ),
      );
  }

  /**
   * Every item of a paged method, page after page (the server may stop a page early to stay
   * under its payload limit); `max` stops after that many.
   */
  async *pages<M extends Method>(
    method: M,
    params: Params<M>,
    max = Number.POSITIVE_INFINITY,
  ): AsyncGenerator<Paged<M>> {
    let cursor: string | undefined;
    let given = 0;
    for (;;) {
      // As many as the server will put in one reply: it stops a page at its payload limit.
      const limit = Math.min(MAX_PAGE, max - given);
      if (limit <= 0) return;
      const page = (await this.call(method, { ...params, limit, cursor } as Params<M>)) as {
        items: Paged<M>[];
        next?: string;
      };
      for (const item of page.items) {
        yield item;
        if (++given >= max) return;
      }
      if (!page.next) return;
      cursor = page.next;
    }
  }

  /**
   * Bounded: a graceful end waits for un-acknowledged QoS 1 publishes, which never settle once
   * the server is gone (found by the crash campaign: a CLI whose server died mid-request hung
   * here for ever).
   */
  async close(): Promise<void> {
    if (!(await settlesWithin(this.client.endAsync(), 2000))) this.client.end(true);
  }
}

/** Opens a client, runs `fn`, closes. */
export async function withRpc<T>(ctx: LoadedContext, fn: (rpc: RpcClient) => Promise<T>): Promise<T> {
  const rpc = await RpcClient.open(ctx);
  try {
    return await fn(rpc);
  } finally {
    await rpc.close();
  }
}
