// Parsing and printing helpers for the CLI.
import type { Command } from "commander";
import type { OperatorOptions } from "./context.js";
import { CliError } from "./exit.js";

const UNITS: Record<string, number> = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86_400, w: 604_800 };

/** "90", "30s", "5m", "2h", "7d" -> seconds. */
export function parseDuration(v: string | number, what = "duration"): number {
  if (typeof v === "number") return v;
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?$/.exec(v.trim());
  if (!m) throw new CliError(`${what}: "${v}" is not a duration (e.g. 90, 30s, 5m, 2h, 7d)`);
  return Number(m[1]) * (UNITS[m[2] ?? "s"] ?? 1);
}

/** `k=v` pairs; a value that parses as JSON is taken as JSON (DESIGN.md §5). */
export function parseKv(pairs: string[], what: string, json = false): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const p of pairs) {
    const i = p.indexOf("=");
    if (i <= 0) throw new CliError(`${what}: "${p}" is not k=v`);
    const k = p.slice(0, i);
    const v = p.slice(i + 1);
    if (!json) out[k] = v;
    else {
      try {
        out[k] = JSON.parse(v);
      } catch {
        out[k] = v;
      }
    }
  }
  return out;
}

export const collect = (v: string, prev: string[] = []) => [...prev, v];

export function printJson(v: unknown): void {
  process.stdout.write(`${JSON.stringify(v, null, 2)}\n`);
}

/**
 * Text from devices (messages, output, facts) made safe for a terminal: control characters
 * (escape sequences could rewrite the screen or the title, or hide lines) shown as `\xNN`;
 * with `lines`, newlines and tabs are kept.
 */
export function printable(s: string, lines = false): string {
  // biome-ignore lint/suspicious/noControlCharactersInRegex: finding control characters is the point
  const re = lines ? /[\x00-\x08\x0b-\x1f\x7f-\x9f]/g : /[\x00-\x1f\x7f-\x9f]/g;
  return s.replace(re, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`);
}

export function table(rows: Array<Record<string, unknown>>, columns?: string[]): string {
  if (!rows.length) return "(none)\n";
  const cols = columns ?? Object.keys(rows[0]!);
  const cell = (v: unknown) =>
    printable(v === undefined || v === null ? "" : typeof v === "object" ? JSON.stringify(v) : String(v));
  const widths = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals: string[]) =>
    vals
      .map((v, i) => v.padEnd(widths[i]!))
      .join("  ")
      .trimEnd();
  return `${[line(cols.map((c) => c.toUpperCase())), ...rows.map((r) => line(cols.map((c) => cell(r[c]))))].join("\n")}\n`;
}

export interface ListOptions extends OperatorOptions {
  limit?: number;
  ndjson?: boolean;
}

/** Adds the options of every list command: --limit N, --ndjson. */
export function listOptions(cmd: Command): Command {
  return cmd
    .option("--limit <n>", "stop after N items", (v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1) throw new CliError(`--limit ${v}: a whole number >= 1`);
      return n;
    })
    .option("--ndjson", "one JSON object per line, printed as pages arrive");
}

/**
 * Prints the items of a list: NDJSON as they arrive, one JSON array with --json, else a table
 * of `row(item)`.
 */
export async function printList<T>(
  items: AsyncIterable<T>,
  o: ListOptions,
  row: (t: T) => Record<string, unknown>,
  columns?: string[],
): Promise<void> {
  if (o.ndjson) {
    for await (const t of items) process.stdout.write(`${JSON.stringify(t)}\n`);
    return;
  }
  const all: T[] = [];
  for await (const t of items) all.push(t);
  if (o.json) printJson(all);
  else process.stdout.write(table(all.map(row), columns));
}
