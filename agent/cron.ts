// Cron evaluation for maintenance windows and recurring jobs.
//
// node-cron parses and matches the expressions (with time zones), but its runner is not used:
// it reads only the wall clock, and on a forward clock jump it walks every missed slot one by
// one (years of per-second slots freeze the process). Our driver asks "did a slot pass since
// the last check?" against the agent's trusted clock, at most once per tick, so a jump in
// either direction neither bursts nor stops a schedule. See docs/time.md.
import { CronExpressionParser } from "cron-parser";
import cron from "node-cron";

export function cronProblem(expr: string, timezone?: string | null): string | undefined {
  const d = cron.validateDetailed(expr);
  if (!d.valid) return `invalid cron "${expr}": ${d.errors.map((e) => `${e.field} ${e.message}`).join("; ")}`;
  try {
    CronExpressionParser.parse(expr); // windows are computed with it: it must read the same expression
  } catch (err) {
    return `invalid cron "${expr}": ${(err as Error).message}`;
  }
  if (timezone) {
    try {
      new Intl.DateTimeFormat("en", { timeZone: timezone });
    } catch {
      return `unknown time zone "${timezone}"`;
    }
  }
  return undefined;
}

export class CronMatcher {
  private readonly task: ReturnType<typeof cron.createTask>;
  readonly hasSeconds: boolean;

  constructor(
    private readonly expr: string,
    private readonly timezone?: string | null,
  ) {
    this.task = cron.createTask(expr, () => {}, timezone ? { timezone } : {});
    this.hasSeconds = expr.trim().split(/\s+/).length === 6;
  }

  matches(ms: number): boolean {
    return this.task.match(new Date(ms));
  }

  /** The latest slot in (after, now], looking back at most `lookbackMs`; undefined if none. */
  latestSlot(after: number, now: number, lookbackMs: number): number | undefined {
    const step = this.hasSeconds ? 1000 : 60_000;
    const from = Math.max(after, now - lookbackMs);
    for (let t = Math.floor(now / step) * step; t > from; t -= step) if (this.matches(t)) return t;
    return undefined;
  }

  /**
   * A window opened by this cron is open at `now` if its latest slot at or before `now` fell
   * within the last `durationMs`. Computed (M5), not walked slot by slot: a window of 400 days
   * costs what a window of a minute does.
   */
  windowOpen(now: number, durationMs: number): { open: boolean; until?: number } {
    let slot: number;
    try {
      const it = CronExpressionParser.parse(this.expr, {
        currentDate: new Date(now + 1),
        ...(this.timezone ? { tz: this.timezone } : {}),
      });
      slot = it.prev().getTime();
    } catch {
      return { open: false }; // no slot before now (or none at all)
    }
    return now - slot < durationMs ? { open: true, until: slot + durationMs } : { open: false };
  }

  dispose(): void {
    void this.task.destroy();
  }
}
