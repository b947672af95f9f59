import { describe, expect, it } from "vitest";
import { parseLatency } from "../../cli/simulate.js";

describe("fleet simulate --latency", () => {
  it.each([
    ["0", { min: 0, max: 0 }],
    ["250", { min: 250, max: 250 }],
    ["0-3000", { min: 0, max: 3000 }],
    [" 10-10 ", { min: 10, max: 10 }],
    ["1.5-2", { min: 1.5, max: 2 }],
  ])("%j -> %o", (s, l) => {
    expect(parseLatency(s)).toEqual(l);
  });

  it.each(["", "-5", "3000-0", "a", "1-", "1-2-3", "1e3", "0-2147483648"])("refuses %j", (s) => {
    expect(parseLatency(s)).toBeUndefined();
  });
});
