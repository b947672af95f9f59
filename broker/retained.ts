// The embedded broker's persistence: aedes' in-memory one, with retained messages also indexed
// by topic. aedes looks retained messages up on every SUBSCRIBE by matching each subscribed
// pattern against every retained message; with a retained DeviceState per device, N devices
// each subscribing to their own job/ctl topics made connecting O(N²) — past ~5,000 devices the
// server spent its time matching and new connections timed out. Subscriptions without
// wildcards (every device's) are now answered from the index; wildcard ones (operators, the
// controller) still go through aedes-persistence.
import { Readable } from "node:stream";
import memoryPersistence from "aedes-persistence";

interface RetainedPacket {
  topic: string;
  payload: Buffer;
}

interface Persistence {
  storeRetained(packet: RetainedPacket, cb?: (err?: Error) => void): Promise<void> | undefined;
  createRetainedStreamCombi(patterns: string[]): Readable;
}

const wild = (pattern: string) => pattern.includes("+") || pattern.includes("#");

export function indexedMemoryPersistence(): Persistence {
  const p = (memoryPersistence as unknown as () => Persistence)();
  const index = new Map<string, RetainedPacket>();
  const store = p.storeRetained.bind(p);
  p.storeRetained = (packet, cb) => {
    if (packet.payload.length === 0) index.delete(packet.topic);
    else index.set(packet.topic, { ...packet });
    return store(packet, cb);
  };
  const combi = p.createRetainedStreamCombi.bind(p);
  p.createRetainedStreamCombi = (patterns) =>
    patterns.some(wild)
      ? combi(patterns)
      : Readable.from(
          patterns.flatMap((t) => {
            const hit = index.get(t);
            return hit ? [hit] : [];
          }),
          { objectMode: true },
        );
  return p;
}
