// The controller's in-process link to the embedded aedes (broker/link.ts): many publishes in
// one go (a rollout wave to 10,000 devices) arrive, in order, without overflowing the stack —
// aedes' emitter releases its queue recursively when publishes complete synchronously.
import { Aedes } from "aedes";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { brokerLink } from "../../broker/link.js";

describe("broker link", () => {
  it("20,000 publishes in one go all arrive, in order", async () => {
    const aedes = await Aedes.createBroker();
    try {
      const got: number[] = [];
      await new Promise<void>((r) =>
        aedes.subscribe(
          "t/+",
          (packet, cb) => {
            got.push(Number(packet.payload.toString()));
            cb();
          },
          r,
        ),
      );
      const link = brokerLink(aedes, {
        prefix: "fleet/v1",
        log: pino({ level: "silent" }),
        fromDevice: () => false,
      });
      const N = 20_000;
      for (let i = 0; i < N; i++) link.publish(`t/${i % 100}`, Buffer.from(String(i)), 1, false);
      for (let i = 0; i < 500 && got.length < N; i++) await new Promise((r) => setTimeout(r, 10));
      expect(got).toHaveLength(N);
      expect(got.every((v, i) => v === i)).toBe(true);
    } finally {
      await new Promise<void>((r) => aedes.close(() => r()));
    }
  });
});
