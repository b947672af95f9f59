// The operator's side of the RPC (DESIGN.md §3, §7): signed requests, correlation by id,
// timeouts, and exit code 3 with a one-line reason when the server cannot be reached.
import { randomBytes } from "node:crypto";
import mqtt, { type MqttClient } from "mqtt";
import { decodeEnvelope, encodeEnvelope } from "../proto/envelope.js";
import { signRpcCall } from "../proto/rpc.js";
import { rpcRequestTopic, rpcResponseTopic } from "../proto/topics.js";
import type { LoadedContext } from "./context.js";
import { CliError, EXIT } from "./exit.js";

const CONNECT_TIMEOUT_MS = 5000;

export async function connectOperator(ctx: LoadedContext): Promise<MqttClient> {
  const clientId = `op-${ctx.username}-${randomBytes(4).toString("hex")}`;
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
    { resolve: (v: unknown) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }
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
    await client.subscribeAsync(rpcResponseTopic(ctx.prefix, client.options.clientId!), { qos: 1 });
    return new RpcClient(client, ctx);
  }

  call<T = unknown>(method: string, params: unknown, timeoutMs = 15_000): Promise<T> {
    const requestId = randomBytes(8).toString("hex");
    const req = signRpcCall(
      { requestId, clientId: this.client.options.clientId!, method, params },
      this.ctx.signingKeyPem,
      this.ctx.keyId,
    );
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(requestId);
        reject(
          new CliError(
            `no answer from ${this.ctx.server} to ${method} within ${timeoutMs / 1000}s (is the controller running, is the key trusted?)`,
            EXIT.CONNECT,
          ),
        );
      }, timeoutMs);
      this.pending.set(requestId, { resolve: resolve as (v: unknown) => void, reject, timer });
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
    if (res.ok) p.resolve(res.resultJson ? JSON.parse(res.resultJson) : null);
    else
      p.reject(
        new CliError(
          res.error || "request failed",
          res.errorCode === 3 ? EXIT.CONNECT : res.errorCode === 1 ? EXIT.FAILED : EXIT.USAGE,
        ),
      );
  }

  async close(): Promise<void> {
    await this.client.endAsync().catch(() => {});
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
