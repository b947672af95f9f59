// Operator passwords are checked with scrypt (tens of ms of a thread-pool thread each): a flood
// of wrong passwords would starve the pool and keep the real operator out. Every check goes
// through this gate: a correct password seen recently is accepted without scrypt (kept as a
// hash of the stored hash and the password, never in clear), an address with too many recent
// failures or too many checks in flight is refused without one, and at most a few run at once.
import { createHash } from "node:crypto";

export type Verdict = "ok" | "bad" | "throttled" | "busy";

export interface PasswordGateOptions {
  verify(password: string, stored: string): Promise<boolean>;
  /** scrypt checks running at once, for everyone. */
  maxConcurrent?: number;
  /** Checks waiting for a slot; more are refused as busy. */
  maxQueued?: number;
  /** Checks in flight (running or waiting) per address. */
  perAddress?: number;
  /** Failures per address within `windowMs` after which it is refused without a check. */
  failures?: number;
  windowMs?: number;
  /** How long a correct password is remembered. */
  rememberMs?: number;
  now?: () => number;
}

export class PasswordGate {
  private readonly remembered = new Map<string, number>();
  private readonly failed = new Map<string, { n: number; since: number }>();
  private readonly inFlight = new Map<string, number>();
  private readonly waiting: Array<() => void> = [];
  private running = 0;
  /** How many scrypt checks ran (for tests and metrics). */
  checks = 0;

  constructor(private readonly opts: PasswordGateOptions) {}

  private now(): number {
    return (this.opts.now ?? Date.now)();
  }

  async check(address: string, password: string, stored: string): Promise<Verdict> {
    const key = createHash("sha256").update(stored).update("\0").update(password).digest("base64");
    const until = this.remembered.get(key);
    if (until !== undefined && until > this.now()) return "ok";
    const f = this.failed.get(address);
    const windowMs = this.opts.windowMs ?? 60_000;
    if (f && this.now() - f.since < windowMs && f.n >= (this.opts.failures ?? 10)) return "throttled";
    const mine = this.inFlight.get(address) ?? 0;
    if (mine >= (this.opts.perAddress ?? 2)) return "busy";
    if (this.running >= (this.opts.maxConcurrent ?? 2) && this.waiting.length >= (this.opts.maxQueued ?? 16))
      return "busy";
    this.inFlight.set(address, mine + 1);
    try {
      await this.slot();
      let ok: boolean;
      try {
        this.checks++;
        ok = await this.opts.verify(password, stored);
      } finally {
        this.release();
      }
      if (ok) {
        this.failed.delete(address);
        this.remember(key);
        return "ok";
      }
      const now = this.now();
      const g = this.failed.get(address);
      if (!g || now - g.since >= windowMs) this.failed.set(address, { n: 1, since: now });
      else g.n++;
      return "bad";
    } finally {
      const n = (this.inFlight.get(address) ?? 1) - 1;
      if (n > 0) this.inFlight.set(address, n);
      else this.inFlight.delete(address);
    }
  }

  private remember(key: string): void {
    if (this.remembered.size > 1000) this.remembered.clear(); // operators are few; bound it anyway
    this.remembered.set(key, this.now() + (this.opts.rememberMs ?? 5 * 60_000));
  }

  private slot(): Promise<void> {
    if (this.running < (this.opts.maxConcurrent ?? 2)) {
      this.running++;
      return Promise.resolve();
    }
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  private release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.running--;
  }

  /** Drops failure records older than the window (called from a periodic timer). */
  prune(): void {
    const now = this.now();
    for (const [a, f] of this.failed)
      if (now - f.since >= (this.opts.windowMs ?? 60_000)) this.failed.delete(a);
    for (const [k, until] of this.remembered) if (until <= now) this.remembered.delete(k);
  }
}
