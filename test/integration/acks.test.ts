// pipelineAcks: messages are handled concurrently, and each PUBACK waits until its message is
// stored, leaving in the order the messages arrived; a message that could not be stored is
// not acknowledged (the broker keeps it for re-delivery). Against a real aedes.
import mqtt from "mqtt";
import { afterAll, beforeAll, expect, it } from "vitest";
import { pipelineAcks } from "../../agent/connection.js";
import { startBroker, type TestBroker } from "../helpers/broker.js";

let broker: TestBroker;
beforeAll(async () => {
  broker = await startBroker();
});
afterAll(() => broker.close());

it("holds each PUBACK until the message is stored, in arrival order, and none for a failure", async () => {
  const acks: string[] = [];
  broker.aedes.on("ack", (packet, client) => {
    if (client?.id === "acker" && packet && "topic" in packet) acks.push(String(packet.payload));
  });
  const started: string[] = [];
  const gates = new Map<string, (ok: boolean) => void>();
  const sub = mqtt.connect(broker.url, { clientId: "acker", clean: false, reconnectPeriod: 0 });
  pipelineAcks(sub, (packet) => {
    const body = String(packet.payload);
    started.push(body);
    return new Promise<boolean>((resolve) => gates.set(body, resolve));
  });
  await new Promise<void>((r) => sub.once("connect", () => r()));
  await sub.subscribeAsync("t/acks", { qos: 1 });
  const pub = await mqtt.connectAsync(broker.url, { clientId: "ack-pub" });
  for (const m of ["m1", "m2", "m3"]) await pub.publishAsync("t/acks", m, { qos: 1 });
  // All three are being handled at once: none waited for the one before it.
  await expect.poll(() => started, { timeout: 5000 }).toEqual(["m1", "m2", "m3"]);
  gates.get("m3")!(true);
  gates.get("m2")!(false);
  await new Promise((r) => setTimeout(r, 300));
  expect(acks).toEqual([]); // m3 is stored, but m1 before it is not yet
  gates.get("m1")!(true);
  await expect.poll(() => acks, { timeout: 5000 }).toEqual(["m1", "m3"]);
  await new Promise((r) => setTimeout(r, 300));
  expect(acks).toEqual(["m1", "m3"]);
  await pub.endAsync();
  await sub.endAsync(true);
});

it("a PUBACK that may go leaves with the client's next packet, in one socket write, or alone soon after", async () => {
  const acks: string[] = [];
  broker.aedes.on("ack", (packet, client) => {
    if (client?.id === "sharer" && packet && "topic" in packet) acks.push(String(packet.payload));
  });
  const stats = { acksShared: 0 };
  const sub = mqtt.connect(broker.url, { clientId: "sharer", clean: false, reconnectPeriod: 0 });
  let followUp = true;
  pipelineAcks(
    sub,
    async () => {
      // Stored at once; a status follows 5 ms later (as a short job's does) — or nothing does.
      if (followUp) setTimeout(() => sub.publish("t/status", "s", { qos: 0 }), 5);
      return true;
    },
    200,
    stats,
  );
  await new Promise<void>((r) => sub.once("connect", () => r()));
  await sub.subscribeAsync("t/share", { qos: 1 });
  const socket = sub.stream as unknown as {
    _writev: (...a: unknown[]) => unknown;
    _write: (...a: unknown[]) => unknown;
  };
  let writes = 0;
  for (const m of ["_writev", "_write"] as const) {
    const inner = socket[m].bind(socket);
    socket[m] = (...a: unknown[]) => {
      writes++;
      return inner(...a);
    };
  }
  const statuses: string[] = [];
  broker.aedes.on("publish", (packet, client) => {
    if (client?.id === "sharer" && packet.topic === "t/status") statuses.push(String(packet.payload));
  });
  const pub = await mqtt.connectAsync(broker.url, { clientId: "share-pub" });
  await pub.publishAsync("t/share", "m1", { qos: 1 });
  await expect.poll(() => acks.length + statuses.length, { timeout: 5000 }).toBe(2);
  expect(acks).toEqual(["m1"]);
  expect(stats.acksShared).toBe(1);
  expect(writes).toBe(1); // the PUBACK and the status: one write

  // Nothing follows: the PUBACK goes alone once the hold (200 ms here) is over.
  followUp = false;
  await pub.publishAsync("t/share", "m2", { qos: 1 });
  await expect.poll(() => acks, { timeout: 5000 }).toEqual(["m1", "m2"]);
  expect(stats.acksShared).toBe(1);
  expect(writes).toBe(2);
  await pub.endAsync();
  await sub.endAsync(true);
});
