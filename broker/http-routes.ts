// The server's HTTP port: artifacts and uploads (artifacts.ts), the Mosquitto ACL export,
// `/healthz` and `/metrics`. Every request ends in a reply; no route's error reaches the process.
import type { IncomingMessage, ServerResponse } from "node:http";
import type { Logger } from "pino";
import type { Registry as Metrics } from "prom-client";
import type { Counters } from "../common/counters.js";
import type { ArtifactStore } from "./artifacts.js";
import type { ServerConfig } from "./config.js";
import type { Registry } from "./controller/registry.js";
import type { Dashboard } from "./dashboard.js";
import { mosquittoExport } from "./mosquitto.js";

export interface HttpContext {
  config(): ServerConfig;
  /** Undefined on a cluster node that does not run the controller. */
  artifacts(): ArtifactStore | undefined;
  registry(): Registry | undefined;
  /** The controller's broker connection: undefined where no controller runs. */
  controllerConnected(): boolean | undefined;
  health(): Record<string, unknown>;
  metrics: Metrics;
  counters: Counters;
  log(): Logger;
  /** The web dashboard (`/`, DESIGN.md §12). */
  dashboard?: Dashboard;
}

export function httpHandler(c: HttpContext) {
  return (req: IncomingMessage, res: ServerResponse): void => {
    route(c, req, res).catch((err: Error) => {
      const bad = err instanceof URIError || (err as { code?: string }).code === "ERR_INVALID_URL";
      c.counters.inc(bad ? "http_400" : "http_500");
      if (!bad) c.log().error({ err, url: req.url }, "HTTP request failed");
      if (res.headersSent) return void res.destroy();
      res.writeHead(bad ? 400 : 500, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: bad ? `malformed URL: ${err.message}` : "internal error" }));
    });
  };
}

async function route(c: HttpContext, req: IncomingMessage, res: ServerResponse): Promise<void> {
  const url = req.url ?? "/";
  const artifacts = c.artifacts();
  const registry = c.registry();
  if (!artifacts || !registry) {
    if (url.startsWith("/v1/")) {
      res.writeHead(503, { "content-type": "application/json", "retry-after": "5" });
      res.end(
        JSON.stringify({ error: "this cluster node does not run the controller; ask the active node" }),
      );
      return;
    }
  } else if (await artifacts.handle(req, res)) return;
  if (url === "/healthz") {
    // Unhealthy while the controller that should run here has lost its broker connection.
    const connected = c.controllerConnected();
    const down = connected === false;
    res.writeHead(down ? 503 : 200, { "content-type": "application/json" });
    const controller = connected === undefined ? "standby" : connected ? "active" : "disconnected";
    res.end(JSON.stringify({ ok: !down, ...c.health(), controller }));
    return;
  }
  if (c.dashboard && (await c.dashboard.handle(req, res))) return;
  if (url === "/v1/acl/mosquitto" && req.method === "GET" && artifacts && registry)
    return artifacts.operatorJson(req, res, () => mosquittoExport(c.config(), registry.all()));
  if (url === "/metrics") {
    // Open by default (the HTTP port is on loopback unless --plain-host); operators only with
    // server.json "metricsAuth": true.
    if (c.config().metricsAuth && !(await artifacts?.operatorGate(req, res))) {
      if (!res.headersSent) res.writeHead(503).end("not the active node\n");
      return;
    }
    res.writeHead(200, { "content-type": c.metrics.contentType });
    res.end(await c.metrics.metrics());
    return;
  }
  res.writeHead(404).end("not found\n");
}
