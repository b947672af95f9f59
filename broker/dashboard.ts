// The web dashboard (DESIGN.md §12) on the server's HTTP port: operator login (the operator's
// scrypt password, rate-limited like every operator login), a session cookie, CSRF tokens on
// every state-changing request, server-rendered pages from the same operator API the CLI uses
// (called in process), live updates over server-sent events from the controller's events, and
// static files from the package itself — nothing from another origin (a strict CSP says so).
// The only actions are pause / resume / abort of a rollout: creating jobs stays with the CLI,
// whose operator key signs them.
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import type { TLSSocket } from "node:tls";
import { fileURLToPath } from "node:url";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { ApiError, type Method, RpcErrorCode } from "../proto/api.js";
import { matchesSelector, parseSelector, SelectorError } from "../proto/selector.js";
import type { ArtifactStore } from "./artifacts.js";
import type { ServerConfig } from "./config.js";
import { deviceJson, type Registry } from "./controller/registry.js";
import type { DeviceRecord } from "./controller/store.js";
import type { Html } from "./dashboard/html.js";
import { csrfMatches, type Session, Sessions } from "./dashboard/sessions.js";
import * as views from "./dashboard/views.js";
import type { PasswordGate } from "./password-gate.js";

export interface DashboardContext {
  /** What the pages show: the fleet (the server) or a site (a gateway); undefined = not here. */
  source(): DashboardSource | undefined;
  passwords: PasswordGate;
  counters: Counters;
  log(): Logger;
}

/** A device as the devices page and the overview see it. */
export interface DashboardDevice {
  id: string;
  online: boolean;
  labels: Record<string, string>;
  agentVersion: string;
  lastSeen: number;
  via?: string;
  gateway?: DeviceRecord["gateway"];
  counters?: Record<string, number>;
}

export interface DashboardSource {
  /** Who may log in (scrypt password hashes). */
  operators(): ReadonlyArray<{ username: string; passwordHash: string }>;
  devices(): Iterable<DashboardDevice>;
  /** The operator API, called in process as the logged-in operator. */
  call(method: Method, params: unknown, operator: string): Promise<unknown>;
  onEvent(listener: (payload: Uint8Array) => void): () => void;
  telemetryOf(deviceId: string): ReadonlyArray<{ at: number; values: Record<string, number> }>;
  artifacts(): Promise<Parameters<typeof views.artifactsPage>[0]>;
}

/** The fleet server's source: its registry, controller and artifact store. */
export function fleetSource(o: {
  config(): ServerConfig;
  registry(): Registry | undefined;
  artifacts(): ArtifactStore | undefined;
  controller(): Pick<DashboardSource, "call" | "onEvent" | "telemetryOf"> | undefined;
}): () => DashboardSource | undefined {
  return () => {
    const registry = o.registry();
    const controller = o.controller();
    const artifacts = o.artifacts();
    if (!registry || !controller || !artifacts) return undefined;
    return {
      operators: () => o.config().operators,
      devices: () => registry.all(),
      call: (m, p, op) => controller.call(m, p, op),
      onEvent: (l) => controller.onEvent(l),
      telemetryOf: (id) => controller.telemetryOf(id),
      artifacts: () => artifacts.list(),
    };
  };
}

const CSP =
  "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; " +
  "frame-ancestors 'none'; form-action 'self'; base-uri 'none'";
const PAGE = 100;
const MAX_FORM = 16 * 1024;
const MAX_STREAMS = 200;

const here = dirname(fileURLToPath(import.meta.url));
/** From the sources (tests) or from dist/ (the built CLI). */
const STATIC_DIRS = [join(here, "dashboard", "static"), join(here, "..", "broker", "dashboard", "static")];
const requireHere = createRequire(import.meta.url);
const STATIC: Record<string, { file: () => string; type: string }> = {
  "app.js": { file: () => staticFile("app.js"), type: "text/javascript; charset=utf-8" },
  "app.css": { file: () => staticFile("app.css"), type: "text/css; charset=utf-8" },
  "uPlot.iife.min.js": {
    file: () => staticFile("uPlot.iife.min.js", "uplot/dist/"),
    type: "text/javascript; charset=utf-8",
  },
  "uPlot.min.css": {
    file: () => staticFile("uPlot.min.css", "uplot/dist/"),
    type: "text/css; charset=utf-8",
  },
};

/** Beside the code (the agent bundle carries copies), else from the package's node_modules. */
function staticFile(name: string, pkg?: string): string {
  const dir = STATIC_DIRS.find((d) => existsSync(join(d, name)));
  if (dir) return join(dir, name);
  return pkg ? requireHere.resolve(`${pkg}${name}`) : join(STATIC_DIRS[0]!, name);
}

export class Dashboard {
  readonly sessions = new Sessions();
  private readonly streams = new Set<ServerResponse>();
  private live: { off: () => void; timer: NodeJS.Timeout } | undefined;

  constructor(private readonly c: DashboardContext) {}

  /** True when the request was the dashboard's (answered); false for other routes. */
  async handle(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
    try {
      return await this.route(req, res);
    } catch (err) {
      if (!(err instanceof FormTooLarge)) throw err;
      this.c.counters.inc("dashboard_form_too_large");
      return this.send(res, 413, err.message);
    }
  }

  private async route(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
    const raw = req.url ?? "/";
    // A path of this server only ("//host/…" would parse as another host's root).
    if (!raw.startsWith("/") || raw.startsWith("//")) return false;
    const url = new URL(raw, "http://x");
    const path = url.pathname;
    const page =
      path === "/" ||
      path === "/login" ||
      path === "/logout" ||
      path === "/events" ||
      path === "/artifacts" ||
      /^\/(devices|jobs|rollouts)(\/|$)/.test(path) ||
      path.startsWith("/static/");
    if (!page) return false;
    if (path.startsWith("/static/")) return this.static(res, path.slice("/static/".length));
    const secure = Boolean((req.socket as TLSSocket).encrypted);
    if (path === "/login") return this.login(req, res, url, secure);
    const session = this.c.source() ? this.sessions.of(req) : undefined;
    if (!session) {
      if (path === "/events" || req.method !== "GET") return this.send(res, 401, "not logged in");
      return this.redirect(res, `/login?next=${encodeURIComponent(path + url.search)}`);
    }
    if (req.method === "POST") {
      const form = await readForm(req);
      if (!sameOrigin(req) || !csrfMatches(session, form.get("csrf") ?? undefined)) {
        this.c.counters.inc("dashboard_csrf_refused");
        return this.send(res, 403, "refused: missing or wrong CSRF token, or another origin");
      }
      if (path === "/logout") {
        this.sessions.end(session);
        res.setHeader("set-cookie", this.sessions.cookie(undefined, secure));
        return this.redirect(res, "/login");
      }
      const m = /^\/rollouts\/([^/]+)\/(pause|resume|abort)$/.exec(path);
      if (!m) return this.send(res, 404, "no such action");
      const id = decodeURIComponent(m[1]!);
      const verb = m[2] as "pause" | "resume" | "abort";
      await this.call(
        `rollout.${verb}`,
        verb === "abort" ? { id, reason: `aborted from the dashboard by ${session.operator}` } : { id },
        session,
      );
      return this.redirect(res, `/rollouts/${encodeURIComponent(id)}`);
    }
    if (req.method !== "GET") return this.send(res, 405, "method not allowed");
    if (path === "/events") return this.events(req, res);
    try {
      const [title, active, body] = await this.render(path, url, session);
      // A live page asks for its <main> again (X-Fleet-Fragment) and swaps it in.
      if (req.headers["x-fleet-fragment"] === "1") return this.html(res, 200, body);
      return this.html(
        res,
        200,
        views.layout({ title, active, body, operator: session.operator, csrf: session.csrf }),
      );
    } catch (err) {
      if (err instanceof ApiError) {
        const status = err.code === RpcErrorCode.RPC_NOT_FOUND ? 404 : 400;
        return this.html(
          res,
          status,
          views.layout({
            title: "Not found",
            body: views.messagePage(status === 404 ? "Not found" : "Bad request", err.message),
            operator: session.operator,
            csrf: session.csrf,
          }),
        );
      }
      throw err;
    }
  }

  private async render(path: string, url: URL, session: Session): Promise<[string, string, Html]> {
    const call = <T>(method: Method, params: unknown) => this.call(method, params, session) as Promise<T>;
    if (path === "/") return ["Overview", "/", views.overviewPage(await this.overview(session))];
    if (path === "/devices") {
      const selector = url.searchParams.get("selector") ?? "";
      const sort = ["id", "online", "lastSeen"].includes(url.searchParams.get("sort") ?? "")
        ? url.searchParams.get("sort")!
        : "id";
      const offset = Math.max(0, Number(url.searchParams.get("offset")) || 0);
      let error: string | undefined;
      let reqs: ReturnType<typeof parseSelector> | undefined;
      try {
        reqs = selector ? parseSelector(selector) : undefined;
      } catch (err) {
        if (!(err instanceof SelectorError)) throw err;
        error = err.message;
      }
      // Filtered and sorted on the server; one page in the DOM, however many devices match.
      const all = error
        ? []
        : [...this.c.source()!.devices()].filter((d) => !reqs || matchesSelector(reqs, d.labels));
      if (sort === "online")
        all.sort((a, b) => Number(a.online) - Number(b.online) || a.id.localeCompare(b.id));
      else if (sort === "lastSeen") all.sort((a, b) => b.lastSeen - a.lastSeen || a.id.localeCompare(b.id));
      else all.sort((a, b) => a.id.localeCompare(b.id));
      const rows = all.slice(offset, offset + PAGE).map(deviceJson);
      return [
        "Devices",
        "/devices",
        views.devicesPage({
          selector,
          sort,
          rows,
          total: all.length,
          offset,
          limit: PAGE,
          ...(error ? { error } : {}),
        }),
      ];
    }
    const device = /^\/devices\/([^/]+)$/.exec(path);
    if (device) {
      const id = decodeURIComponent(device[1]!);
      const d = await call<Parameters<typeof views.devicePage>[0]["device"]>("device.show", { id });
      return [
        `Device ${id}`,
        "/devices",
        views.devicePage({ device: d, telemetry: [...(this.c.source()?.telemetryOf(id) ?? [])] }),
      ];
    }
    if (path === "/jobs") {
      const cursor = url.searchParams.get("cursor") ?? undefined;
      const r = await call<{ items: Parameters<typeof views.jobsPage>[0]; next?: string }>("jobs.ls", {
        limit: PAGE,
        ...(cursor ? { cursor } : {}),
      });
      return ["Jobs", "/jobs", views.jobsPage(r.items, r.next)];
    }
    const job = /^\/jobs\/([^/]+)$/.exec(path);
    if (job) {
      const j = await call<views.JobView>("jobs.show", { id: decodeURIComponent(job[1]!), limit: 500 });
      return [`Job ${j.name}`, "/jobs", views.jobPage(j)];
    }
    if (path === "/rollouts") {
      const r = await call<{ items: views.RolloutView[] }>("rollout.ls", { limit: PAGE });
      return ["Rollouts", "/rollouts", views.rolloutsPage(r.items)];
    }
    const rollout = /^\/rollouts\/([^/]+)$/.exec(path);
    if (rollout) {
      const r = await call<views.RolloutView>("rollout.show", { id: decodeURIComponent(rollout[1]!) });
      return [`Rollout ${r.name}`, "/rollouts", views.rolloutPage(r, session.csrf)];
    }
    if (path === "/artifacts")
      return ["Artifacts", "/artifacts", views.artifactsPage(await this.c.source()!.artifacts())];
    throw new ApiError(`no page ${path}`, RpcErrorCode.RPC_NOT_FOUND);
  }

  private async overview(session: Session): Promise<views.Overview> {
    const source = this.c.source()!;
    let total = 0;
    let on = 0;
    const sites = new Map<string, views.Overview["sites"][number]>();
    for (const d of source.devices()) {
      total++;
      if (d.online) on++;
      const site = d.labels.site;
      if (!site) continue;
      const s = sites.get(site) ?? { site, devices: 0, online: 0 };
      s.devices++;
      if (d.online) s.online++;
      if (d.gateway)
        s.gateway = {
          id: d.id,
          online: d.online,
          uplink: d.counters?.gateway_uplink_ready === 1,
          queued: d.counters?.gateway_queue_messages ?? 0,
        };
      sites.set(site, s);
    }
    const rollouts = (await this.call("rollout.ls", { active: true, limit: 20 }, session)) as {
      items: views.Overview["rollouts"];
    };
    const jobs = (await this.call("jobs.ls", { limit: 200 }, session)) as {
      items: Array<{ id: string; name: string; state: string; createdAt: string }>;
    };
    return {
      total,
      online: on,
      sites: [...sites.values()].sort((a, b) => a.site.localeCompare(b.site)),
      rollouts: rollouts.items,
      failures: jobs.items.filter((j) => j.state === "FAILED").slice(0, 10),
    };
  }

  private call(method: Method, params: unknown, session: Session): Promise<unknown> {
    const source = this.c.source();
    if (!source) throw new ApiError("this node does not run the controller");
    return source.call(method, params, session.operator);
  }

  /**
   * Server-sent events: "something changed", at most every 250 ms, to every open page. One
   * listener on the source for all pages, and nothing decoded: a 10,000-device rollout's events
   * cost a flag each, not a message per page per event.
   */
  private events(req: IncomingMessage, res: ServerResponse): true {
    const source = this.c.source();
    if (!source || this.streams.size >= MAX_STREAMS) return this.send(res, 503, "no live events here");
    res.writeHead(200, {
      "content-type": "text/event-stream",
      "cache-control": "no-store",
      "x-accel-buffering": "no",
    });
    res.write(": live\n\n");
    this.streams.add(res);
    if (!this.live) {
      let changed = false;
      let ticks = 0;
      const off = source.onEvent(() => {
        changed = true;
      });
      const timer = setInterval(() => {
        const ping = ++ticks % 100 === 0; // a comment every 25 s keeps proxies from closing it
        if (!changed && !ping) return;
        for (const r of this.streams) r.write(changed ? "data: changed\n\n" : ": ping\n\n");
        changed = false;
      }, 250);
      this.live = { off, timer };
    }
    req.on("close", () => {
      this.streams.delete(res);
      if (this.streams.size || !this.live) return;
      this.live.off();
      clearInterval(this.live.timer);
      this.live = undefined;
    });
    return true;
  }

  private async login(req: IncomingMessage, res: ServerResponse, url: URL, secure: boolean): Promise<true> {
    const next = safeNext(url.searchParams.get("next"));
    if (req.method === "GET")
      return this.html(res, 200, views.layout({ title: "Log in", body: views.loginPage(undefined, next) }));
    if (req.method !== "POST") return this.send(res, 405, "method not allowed");
    const form = await readForm(req);
    const to = safeNext(form.get("next"));
    if (!sameOrigin(req)) return this.send(res, 403, "refused: another origin");
    const username = form.get("username") ?? "";
    const operators = this.c.source()?.operators() ?? [];
    if (!operators.length)
      return this.html(
        res,
        200,
        views.layout({
          title: "Log in",
          body: views.loginPage(
            "No operator can log in here yet (a gateway learns them from the center).",
            to,
          ),
        }),
      );
    const op = operators.find((o) => o.username === username);
    // An unknown name costs the same scrypt check as a wrong password.
    const stored = op?.passwordHash ?? operators[0]?.passwordHash ?? "";
    const verdict = await this.c.passwords.check(
      req.socket.remoteAddress ?? "?",
      form.get("password") ?? "",
      stored,
    );
    if (verdict !== "ok" || !op) {
      this.c.counters.inc(verdict === "ok" ? "dashboard_login_bad" : `dashboard_login_${verdict}`);
      const why =
        verdict === "throttled"
          ? "Too many failed logins from this address; try again later."
          : verdict === "busy"
            ? "Too many logins in progress; try again."
            : "Wrong operator name or password.";
      // The form again, saying why (a 200: the page itself is fine; the counters keep the refusal).
      return this.html(res, 200, views.layout({ title: "Log in", body: views.loginPage(why, to) }));
    }
    const s = this.sessions.create(op.username);
    res.setHeader("set-cookie", this.sessions.cookie(s, secure));
    this.c.log().info({ operator: op.username }, "dashboard login");
    return this.redirect(res, to);
  }

  private async static(res: ServerResponse, name: string): Promise<true> {
    const s = STATIC[name];
    if (!s) return this.send(res, 404, "not found");
    const body = await readFile(s.file());
    res.writeHead(200, {
      "content-type": s.type,
      "cache-control": "no-cache",
      "x-content-type-options": "nosniff",
    });
    res.end(body);
    return true;
  }

  private html(res: ServerResponse, status: number, body: Html): true {
    res.writeHead(status, {
      "content-type": "text/html; charset=utf-8",
      "content-security-policy": CSP,
      "x-content-type-options": "nosniff",
      "referrer-policy": "same-origin",
      "cache-control": "no-store",
    });
    res.end(body.text);
    return true;
  }

  private send(res: ServerResponse, status: number, text: string): true {
    res.writeHead(status, { "content-type": "text/plain; charset=utf-8", "content-security-policy": CSP });
    res.end(`${text}\n`);
    return true;
  }

  private redirect(res: ServerResponse, to: string): true {
    res.writeHead(303, { location: to, "cache-control": "no-store" });
    res.end();
    return true;
  }
}

/** Only a path on this server (no `//host`, no scheme). */
function safeNext(next: string | null | undefined): string {
  return next && /^\/(?!\/)[^\\]*$/.test(next) ? next : "/";
}

/** A browser's POST from another page names its origin; it must be ours. */
function sameOrigin(req: IncomingMessage): boolean {
  const origin = req.headers.origin;
  if (!origin) return true; // not a browser's cross-site form (browsers send Origin on POST)
  try {
    return new URL(origin).host === req.headers.host;
  } catch {
    return false;
  }
}

class FormTooLarge extends Error {}

async function readForm(req: IncomingMessage): Promise<URLSearchParams> {
  let body = "";
  for await (const chunk of req) {
    body += chunk;
    if (body.length > MAX_FORM) throw new FormTooLarge(`a form is at most ${MAX_FORM} bytes`);
  }
  return new URLSearchParams(body);
}
