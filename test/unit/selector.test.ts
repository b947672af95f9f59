import { describe, expect, it } from "vitest";
import { matchesSelector, parseSelector, SelectorError } from "../../proto/selector.js";

const labels = { env: "prod", region: "eu", site: "berlin" };

describe("selector", () => {
  it.each([
    ["", true],
    ["env=prod", true],
    ["env==prod", true],
    ["env!=prod", false],
    ["region in (eu,us)", true],
    ["region in (us, asia)", false],
    ["region notin (us)", true],
    ["beta", false],
    ["!beta", true],
    ["site", true],
    ["env=prod,region in (eu,us),!beta", true],
    ["env=prod, region notin (eu)", false],
  ])("%j matches: %s", (sel, expected) => {
    expect(matchesSelector(parseSelector(sel), labels)).toBe(expected);
  });

  it.each([
    ["env=", 5],
    ["env=prod,", 10],
    ["region in (eu", 14],
    ["env=prod region=eu", 10],
    ["!", 2],
  ])("%j is a parse error at column %i", (sel, col) => {
    try {
      parseSelector(sel);
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(SelectorError);
      expect((err as SelectorError).column).toBe(col);
      expect((err as Error).message).toContain(`column ${col}`);
    }
  });
});
