// The embedded broker's retained-message index: exact subscriptions are answered from it,
// wildcard ones from aedes-persistence, and an empty retained message clears both.
import { createServer } from "node:net";
import { Aedes } from "aedes";
import mqtt from "mqtt";
import { afterAll, beforeAll, expect, it } from "vitest";
import { indexedMemoryPersistence } from "../../broker/retained.js";

let aedes: Aedes;
let url: string;
const server = createServer((s) => aedes.handle(s));

beforeAll(async () => {
  aedes = await Aedes.createBroker({ persistence: indexedMemoryPersistence() as never });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  url = `mqtt://127.0.0.1:${(server.address() as { port: number }).port}`;
});
afterAll(async () => {
  server.close();
  await new Promise<void>((r) => aedes.close(() => r()));
});

async function retainedFor(topic: string): Promise<string[]> {
  const c = await mqtt.connectAsync(url, { clientId: `r-${Math.random()}` });
  const got: string[] = [];
  c.on("message", (t, p, packet) => packet.retain && got.push(`${t}=${p}`));
  await c.subscribeAsync(topic, { qos: 1 });
  await new Promise((r) => setTimeout(r, 200));
  await c.endAsync();
  return got.sort();
}

it("serves retained messages to exact and wildcard subscriptions, and forgets cleared ones", async () => {
  const pub = await mqtt.connectAsync(url, { clientId: "r-pub" });
  await pub.publishAsync("d/a/state", "A1", { qos: 1, retain: true });
  await pub.publishAsync("d/a/state", "A2", { qos: 1, retain: true });
  await pub.publishAsync("d/b/state", "B", { qos: 1, retain: true });
  expect(await retainedFor("d/a/state")).toEqual(["d/a/state=A2"]);
  expect(await retainedFor("d/+/state")).toEqual(["d/a/state=A2", "d/b/state=B"]);
  expect(await retainedFor("d/c/state")).toEqual([]);
  await pub.publishAsync("d/a/state", "", { qos: 1, retain: true });
  expect(await retainedFor("d/a/state")).toEqual([]);
  expect(await retainedFor("d/#")).toEqual(["d/b/state=B"]);
  await pub.endAsync();
});
