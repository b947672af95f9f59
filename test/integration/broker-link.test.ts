// The controller's in-process link to the embedded aedes (broker/link.ts): many publishes in
// one go (a rollout wave to 10,000 devices) arrive, in order, without overflowing the stack —
// aedes' emitter releases its queue recursively when publishes complete synchronously.
import { type AddressInfo, createServer } from "node:net";
import { Aedes } from "aedes";
import mqtt from "mqtt";
import pino from "pino";
import { describe, expect, it } from "vitest";
import { brokerLink, topicMatches } from "../../broker/link.js";

/** An aedes on a loopback port with the controller's link to it. */
async function linkedBroker() {
  const aedes = await Aedes.createBroker();
  const server = createServer(aedes.handle);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const url = `mqtt://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const link = brokerLink(aedes, {
    prefix: "fleet/v1",
    log: pino({ level: "silent" }),
    fromDevice: () => false,
  });
  const close = async () => {
    server.close();
    await new Promise<void>((r) => aedes.close(() => r()));
  };
  return { aedes, url, link, close };
}

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

  it("QoS 0 and QoS 1 publishes to one client all arrive: a QoS 0 one never overtakes (and so drops) an earlier QoS 1", async () => {
    // aedes numbers publishes as they enter and a client drops one numbered below one it got;
    // a QoS 1 publish takes an extra asynchronous step, so an unordered QoS 0 one overtook it
    // (an operator's RPC reply lost behind events; a device's job behind a QoS 0 StatusAck).
    const { url, link, close } = await linkedBroker();
    const client = await mqtt.connectAsync(url, { clientId: "op-1" });
    try {
      await client.subscribeAsync(["reply", "events"], { qos: 1 });
      const got = { reply: [] as number[], events: [] as number[] };
      client.on("message", (topic, payload) =>
        got[topic as "reply" | "events"].push(Number(payload.toString())),
      );
      const N = 2000;
      for (let i = 0; i < N; i++)
        if (i % 3 === 0) link.publish("reply", Buffer.from(String(i)), 1, false);
        else link.publish("events", Buffer.from(String(i)), 0, false);
      const want = { reply: Math.ceil(N / 3), events: N - Math.ceil(N / 3) };
      for (let i = 0; i < 500 && got.reply.length + got.events.length < N; i++)
        await new Promise((r) => setTimeout(r, 10));
      expect(got.reply).toHaveLength(want.reply);
      expect(got.events).toHaveLength(want.events);
      expect(got.reply.every((v, i) => v === i * 3)).toBe(true);
    } finally {
      await client.endAsync(true);
      await close();
    }
  });

  it("a client that stops reading holds back the QoS 0 publishes after its QoS 1 ones only briefly, not until aedes cuts it off", async () => {
    const { url, link, close } = await linkedBroker(); // aedes drainTimeout: 60 s
    const frozen = await mqtt.connectAsync(url, { clientId: "frozen", keepalive: 0 });
    const other = await mqtt.connectAsync(url, { clientId: "other" });
    try {
      await frozen.subscribeAsync("big", { qos: 1 });
      await other.subscribeAsync("ack", { qos: 1 });
      (frozen.stream as unknown as { pause(): void }).pause(); // reads nothing more
      const big = Buffer.alloc(256 * 1024);
      for (let i = 0; i < 100; i++) link.publish("big", big, 1, false); // more than the socket takes
      let got = false;
      other.on("message", () => {
        got = true;
      });
      link.publish("ack", Buffer.from("a"), 0, false);
      // It arrives while the frozen client's publishes still wait for a drain (60 s at most).
      for (let i = 0; i < 1000 && !got; i++) await new Promise((r) => setTimeout(r, 10));
      expect(got).toBe(true);
    } finally {
      frozen.end(true);
      await other.endAsync(true);
      await close();
    }
  });

  it("knows whether anyone may be subscribed to a topic: at once on subscribe, again after unsubscribe and disconnect", async () => {
    const { aedes, url, link, close } = await linkedBroker();
    const topic = "fleet/v1/events";
    const until = async (want: boolean) => {
      for (let i = 0; i < 200 && link.subscribed(topic) !== want; i++)
        await new Promise((r) => setTimeout(r, 10));
      return link.subscribed(topic);
    };
    try {
      expect(await until(false)).toBe(false); // nobody yet
      const watcher = await mqtt.connectAsync(url, { clientId: "w1" });
      await watcher.subscribeAsync(topic);
      expect(link.subscribed(topic)).toBe(true); // at once
      await watcher.unsubscribeAsync(topic);
      expect(await until(false)).toBe(false);
      await watcher.subscribeAsync("fleet/v1/#"); // a wildcard counts too
      expect(link.subscribed(topic)).toBe(true);
      await watcher.endAsync();
      expect(await until(false)).toBe(false);
      const other = await mqtt.connectAsync(url, { clientId: "w2" });
      await other.subscribeAsync("fleet/v1/d/+/state"); // not the events topic
      await new Promise((r) => setTimeout(r, 50));
      expect(link.subscribed(topic)).toBe(false);
      // Devices subscribing all the time (a connect storm) do not keep a stale yes alive.
      const devices = await Promise.all(
        Array.from({ length: 20 }, (_, i) => mqtt.connectAsync(url, { clientId: `d${i}` })),
      );
      await Promise.all(devices.map((d, i) => d.subscribeAsync(`fleet/v1/d/d${i}/job`)));
      const w3 = await mqtt.connectAsync(url, { clientId: "w3" });
      await w3.subscribeAsync(topic);
      expect(link.subscribed(topic)).toBe(true);
      await w3.endAsync();
      await Promise.all(devices.map((d, i) => d.subscribeAsync(`fleet/v1/d/d${i}/ctl`)));
      expect(link.subscribed(topic)).toBe(false); // at once: no lookup needed
      // A persistent session restored on reconnect (no SUBSCRIBE sent) counts again.
      const p1 = await mqtt.connectAsync(url, { clientId: "p1", clean: false });
      await p1.subscribeAsync(topic, { qos: 1 });
      await p1.endAsync();
      expect(link.subscribed(topic)).toBe(false);
      const p2 = await mqtt.connectAsync(url, { clientId: "p1", clean: false });
      expect(await until(true)).toBe(true);
      await p2.endAsync();
      expect(link.subscribed(topic)).toBe(false);
      await Promise.all(devices.map((d) => d.endAsync()));
      await other.endAsync();
      // A subscription the ACL refuses (aedes still lists it in its "subscribe" event, granted
      // 128) does not count: a device cannot make the controller build events for nobody.
      aedes.authorizeSubscribe = (client, sub, done) =>
        done(null, client?.id === "refused" && sub.topic === topic ? (null as never) : sub);
      const refused = await mqtt.connectAsync(url, { clientId: "refused" });
      await refused.subscribeAsync(topic).catch(() => {});
      await new Promise((r) => setTimeout(r, 50));
      expect(link.subscribed(topic)).toBe(false);
      await refused.endAsync();
      // Subscribed (QoS 0, which aedes' persistence does not keep) before the topic is first
      // asked about: found at once.
      const early = await mqtt.connectAsync(url, { clientId: "w4" });
      await early.subscribeAsync(topic, { qos: 0 });
      const later = brokerLink(aedes, {
        prefix: "fleet/v1",
        log: pino({ level: "silent" }),
        fromDevice: () => false,
      });
      expect(later.subscribed(topic)).toBe(true);
      await new Promise((r) => setTimeout(r, 50));
      expect(later.subscribed(topic)).toBe(true); // and still, once any lookup has answered
      await early.endAsync();
      await new Promise((r) => setTimeout(r, 50));
      expect(later.subscribed(topic)).toBe(false);
    } finally {
      await close();
    }
  });

  it("matches MQTT patterns", () => {
    expect(topicMatches("a/+/c", "a/b/c")).toBe(true);
    expect(topicMatches("a/#", "a/b/c")).toBe(true);
    expect(topicMatches("#", "a")).toBe(true);
    expect(topicMatches("a/+", "a/b/c")).toBe(false);
    expect(topicMatches("a/b", "a/b/c")).toBe(false);
    expect(topicMatches("a/b/c/d", "a/b/c")).toBe(false);
  });
});
