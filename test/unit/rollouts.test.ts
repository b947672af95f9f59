import { describe, expect, it } from "vitest";
import { parseGate, planWaves } from "../../broker/controller/rollouts.js";

describe("wave planning", () => {
  it.each([
    [200, { waves: "10%,50%,100%" }, [20, 100, 200]],
    [200, { waves: "1,10%,50%,100%" }, [1, 20, 100, 200]],
    [10, { waves: "1,10%,100%" }, [1, 10]], // 10% of 10 adds nobody after the first device
    [7, { waves: "50%" }, [4, 7]], // a last 100% is added
    [3, { waves: "5,100%" }, [3]],
    [100, { exponential: "1,2" }, [1, 2, 4, 8, 16, 32, 64, 100]],
    [10, { exponential: "2,3" }, [2, 6, 10]],
    // A factor near 1 still adds a device a wave (it used to loop for ever).
    [5, { exponential: "1,1.0000001" }, [1, 2, 3, 4, 5]],
    [0, { waves: "10%,100%" }, [0]],
  ])("%i devices, %o -> %o", (total, o, targets) => {
    expect(planWaves(total, o).targets).toEqual(targets);
  });

  it("refuses a plan of more than 1,000 waves", () => {
    expect(() => planWaves(100_000, { exponential: "1,1.0000001" })).toThrow(/more than 1000 waves/);
  });
  it.each([{ waves: "10%,abc" }, { waves: "150%" }, { exponential: "1,1" }, { exponential: "x" }])(
    "refuses %o",
    (o) => {
      expect(() => planWaves(10, o)).toThrow(/--waves|--exponential/);
    },
  );

  it("parses gates", () => {
    expect(parseGate(undefined)).toEqual({ online: false });
    expect(parseGate("online")).toEqual({ online: true });
    expect(parseGate("telemetry:cpu.load<0.9")).toEqual({
      online: true,
      metric: { name: "cpu.load", op: "<", value: 0.9 },
    });
    expect(() => parseGate("cpu<1")).toThrow(/--gate/);
  });
});
