// The controller's second line of defence: a QoS 1 message the broker refuses (it closes the
// connection, as aedes does) would be re-sent on every reconnect, forever. It is dropped after
// a few connections, counted, and the messages behind it get through.
import mqtt from "mqtt";
import { afterAll, beforeAll, expect, it } from "vitest";
import { dropRefusedPublishes } from "../../broker/controller/refused.js";
import { Counters } from "../../common/counters.js";
import { startBroker, type TestBroker } from "../helpers/broker.js";
import { quietLog } from "../helpers/harness.js";

let broker: TestBroker;
let refusals = 0;
beforeAll(async () => {
  broker = await startBroker(0, {
    authorizePublish: (_client, packet, done) => {
      if (packet.topic === "poison") {
        refusals++;
        return done(new Error("not allowed"));
      }
      done(null);
    },
  });
});
afterAll(() => broker.close());

it("a publish the broker keeps refusing is dropped; the connection and later messages survive", async () => {
  const counters = new Counters();
  const sender = mqtt.connect(broker.url, { clientId: "sender", clean: false, reconnectPeriod: 100 });
  dropRefusedPublishes(sender, { log: quietLog, counters });
  const receiver = await mqtt.connectAsync(broker.url, { clientId: "receiver" });
  await receiver.subscribeAsync("after", { qos: 1 });
  const got = new Promise<string>((resolve) => receiver.on("message", (_t, p) => resolve(p.toString())));
  await new Promise<void>((resolve) =>
    sender.connected ? resolve() : sender.once("connect", () => resolve()),
  );
  const poison = new Promise<Error | undefined>((resolve) =>
    sender.publish("poison", "x", { qos: 1 }, (err) => resolve(err)),
  );
  sender.publish("after", "still delivered", { qos: 1 });
  expect(await got).toBe("still delivered");
  expect((await poison)?.message).toMatch(/removed/i);
  expect(refusals).toBe(3);
  expect(counters.get("publish_refused_dropped")).toBe(1);
  await new Promise<void>((resolve) =>
    sender.connected ? resolve() : sender.once("connect", () => resolve()),
  );
  await sender.endAsync();
  await receiver.endAsync();
});
