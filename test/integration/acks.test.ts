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
