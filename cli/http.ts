// The server's HTTP API for operators (artifacts, ACL export): its URL is asked from the server
// over RPC unless --http is given; requests use the operator's password (HTTP Basic).

import { MAX_PAGE } from "../proto/api.js";
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

/** Every item of a paged HTTP list (`{items, next}`), page after page; `max` stops early. */
export async function* httpPages<T>(
  ctx: LoadedContext,
  base: string,
  path: string,
  max = Number.POSITIVE_INFINITY,
): AsyncGenerator<T> {
  let next: string | undefined;
  let given = 0;
  do {
    const q = new URLSearchParams({ limit: String(Math.min(MAX_PAGE, max - given)) });
    if (next) q.set("cursor", next);
    const page = (await request(ctx, base, `${path}?${q}`, { method: "GET" })) as {
      items?: T[];
      next?: string;
    };
    if (!Array.isArray(page.items))
      throw new CliError(`${path}: the server's reply has no items (another version?)`, EXIT.FAILED);
    for (const item of page.items) {
      yield item;
      if (++given >= max) return;
    }
    next = page.next;
  } while (next);
}
