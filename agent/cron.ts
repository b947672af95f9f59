// Cron evaluation for maintenance windows and recurring jobs.
//
// node-cron validates the expressions users write (the named stack; the CLI and the agent give
// its detailed messages), but its runner is not used: it reads only the wall clock, and on a
// forward clock jump it walks every missed slot one by one (years of per-second slots freeze
// the process). cron-parser computes the previous slot directly, with time zones; our driver
// asks "did a slot pass since the last check?" against the agent's trusted clock, at most once
// per tick, so a jump in either direction neither bursts nor stops a schedule. See docs/time.md.
import { CronExpressionParser } from "cron-parser";
import cron from "node-cron";

export function cronProblem(expr: string, timezone?: string | null): string | undefined {
  const d = cron.validateDetailed(expr);
  if (!d.valid) return `invalid cron "${expr}": ${d.errors.map((e) => `${e.field} ${e.message}`).join("; ")}`;
  try {
    CronExpressionParser.parse(expr); // slots are computed with it: it must read the same expression
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
  constructor(
    private readonly expr: string,
    private readonly timezone?: string | null,
  ) {}

  /** The latest slot at or before `at`; undefined when there is none. */
  previous(at: number): number | undefined {
    try {
      return CronExpressionParser.parse(this.expr, {
        currentDate: new Date(at + 1),
        ...(this.timezone ? { tz: this.timezone } : {}),
      })
        .prev()
        .getTime();
    } catch {
      return undefined; // no slot before `at` (or none at all)
    }
  }

  /** The latest slot in (after, now], looking back at most `lookbackMs`; undefined if none. */
  latestSlot(after: number, now: number, lookbackMs: number): number | undefined {
    const slot = this.previous(now);
    return slot !== undefined && slot > Math.max(after, now - lookbackMs) ? slot : undefined;
  }

  /**
   * A window opened by this cron is open at `now` if its latest slot at or before `now` fell
   * within the last `durationMs`. Computed (M5), not walked slot by slot: a window of 400 days
   * costs what a window of a minute does.
   */
  windowOpen(now: number, durationMs: number): { open: boolean; until?: number } {
    const slot = this.previous(now);
    if (slot === undefined) return { open: false };
    return now - slot < durationMs ? { open: true, until: slot + durationMs } : { open: false };
  }
}
