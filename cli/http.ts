// The server's HTTP API for operators (artifacts, ACL export): its URL is asked from the server
// over RPC unless --http is given; requests use the operator's password (HTTP Basic).
import type { LoadedContext, OperatorOptions } from "./context.js";
import { CliError, EXIT } from "./exit.js";
import { withRpc } from "./rpc.js";

export interface HttpOptions extends OperatorOptions {
  http?: string;
}

export async function httpBase(ctx: LoadedContext, o: HttpOptions): Promise<string> {
  if (o.http) return o.http;
  const info = await withRpc(ctx, (rpc) => rpc.call("server.info", {}));
  if (!info.http)
    throw new CliError("the server did not say where its HTTP port is; pass --http URL", EXIT.CONNECT);
  return info.http;
}

export async function request(
  ctx: LoadedContext,
  base: string,
  path: string,
  init: RequestInit & { duplex?: "half" },
) {
  const auth = `Basic ${Buffer.from(`${ctx.username}:${ctx.password}`).toString("base64")}`;
  let res: Response;
  try {
    res = await fetch(new URL(path, base), {
      ...init,
      headers: { ...(init.headers as Record<string, string>), authorization: auth },
    });
  } catch (err) {
    throw new CliError(
      `cannot reach ${base}: ${(err as Error).cause ?? (err as Error).message}`,
      EXIT.CONNECT,
    );
  }
  const body = (await res.json().catch(() => ({}))) as Record<string, unknown>;
  if (!res.ok)
    throw new CliError(
      String(body.error ?? `HTTP ${res.status}`),
      res.status === 401 ? EXIT.CONNECT : EXIT.USAGE,
    );
  return body;
}
