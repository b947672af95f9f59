// Dashboard sessions (DESIGN.md §12): a random id in an HttpOnly, SameSite=Strict cookie (Secure
// over TLS), a CSRF token per session that every state-changing request must carry, an idle
// and an absolute expiry, and a bound on how many exist. Kept in memory: a restarted server
// asks operators to log in again.
import { randomBytes, timingSafeEqual } from "node:crypto";
import type { IncomingMessage } from "node:http";

export interface Session {
  id: string;
  operator: string;
  csrf: string;
  createdAt: number;
  usedAt: number;
}

export const COOKIE = "fleet_session";
const IDLE_MS = 60 * 60_000;
const ABSOLUTE_MS = 12 * 60 * 60_000;
const MAX_SESSIONS = 1000;

export class Sessions {
  private readonly byId = new Map<string, Session>();

  constructor(private readonly now: () => number = Date.now) {}

  create(operator: string): Session {
    this.prune();
    if (this.byId.size >= MAX_SESSIONS) {
      const oldest = [...this.byId.values()].sort((a, b) => a.usedAt - b.usedAt)[0]!;
      this.byId.delete(oldest.id);
    }
    const t = this.now();
    const s = {
      id: randomBytes(32).toString("base64url"),
      operator,
      csrf: randomBytes(32).toString("base64url"),
      createdAt: t,
      usedAt: t,
    };
    this.byId.set(s.id, s);
    return s;
  }

  /** The request's live session, if any (and it counts as use). */
  of(req: IncomingMessage): Session | undefined {
    const id = cookie(req, COOKIE);
    const s = id ? this.byId.get(id) : undefined;
    if (!s) return undefined;
    const t = this.now();
    if (t - s.usedAt > IDLE_MS || t - s.createdAt > ABSOLUTE_MS) {
      this.byId.delete(s.id);
      return undefined;
    }
    s.usedAt = t;
    return s;
  }

  end(s: Session): void {
    this.byId.delete(s.id);
  }

  /** The cookie that carries a session (or clears it). */
  cookie(s: Session | undefined, secure: boolean): string {
    const attrs = `Path=/; HttpOnly; SameSite=Strict${secure ? "; Secure" : ""}`;
    return s
      ? `${COOKIE}=${s.id}; ${attrs}; Max-Age=${ABSOLUTE_MS / 1000}`
      : `${COOKIE}=; ${attrs}; Max-Age=0`;
  }

  private prune(): void {
    const t = this.now();
    for (const s of this.byId.values())
      if (t - s.usedAt > IDLE_MS || t - s.createdAt > ABSOLUTE_MS) this.byId.delete(s.id);
  }
}

/** Constant-time comparison of a submitted CSRF token with the session's. */
export function csrfMatches(s: Session, submitted: string | undefined): boolean {
  if (!submitted) return false;
  const a = Buffer.from(s.csrf);
  const b = Buffer.from(submitted);
  return a.length === b.length && timingSafeEqual(a, b);
}

export function cookie(req: IncomingMessage, name: string): string | undefined {
  for (const part of (req.headers.cookie ?? "").split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return v.join("=");
  }
  return undefined;
}
