// Every reach past a library's public API (common/internals.ts), exercised against the real
// aedes, mqtt-packet and MQTT.js installed: an upgrade that moves one fails here, not in the
// field.
import { once } from "node:events";
import { type AddressInfo, createServer } from "node:net";
import { Aedes, type Client } from "aedes";
import mqtt from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  aedesClient,
  aedesClients,
  clientWill,
  destroyConnection,
  disableDedupe,
  packetParser,
  remoteAddress,
  wrapSendPacket,
} from "../../common/internals.js";

let aedes: Aedes;
let server: ReturnType<typeof createServer>;
let port = 0;
const seen: Array<{ will: ReturnType<typeof clientWill>; hadDuplicates: boolean; address: string }> = [];
const on = (c: mqtt.MqttClient, event: string) => new Promise((r) => c.once(event as "connect", r));

beforeAll(async () => {
  aedes = await Aedes.createBroker({
    preConnect: (client: Client, _packet, done) => {
      const hadDuplicates = "duplicates" in client;
      disableDedupe(client);
      seen.push({ will: undefined, hadDuplicates, address: remoteAddress(client) });
      done(null, true);
    },
    // The will is known once the CONNECT is read: where the server checks it (M11).
    authenticate: (client, _user, _password, done) => {
      seen.at(-1)!.will = clientWill(client);
      done(null, true);
    },
  });
  server = createServer((s) => aedes.handle(s));
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  port = (server.address() as AddressInfo).port;
});
afterAll(async () => {
  await new Promise<void>((r) => aedes.close(() => r()));
  server.close();
});

describe("library internals we depend on", () => {
  it("aedes: clients by id, the will, the duplicate filter, the peer address, the packet parser", async () => {
    const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
      clientId: "dev-1",
      will: { topic: "fleet/v1/d/dev-1/state", payload: Buffer.from("x"), qos: 1, retain: true },
      reconnectPeriod: 0,
    });
    await on(c, "connect");
    expect(seen.at(-1)).toEqual({
      will: expect.objectContaining({ topic: "fleet/v1/d/dev-1/state", retain: true }),
      hadDuplicates: true,
      address: "127.0.0.1",
    });
    const client = aedesClient(aedes, "dev-1")!;
    expect(client.id).toBe("dev-1");
    expect(aedesClients(aedes).map((x) => x.id)).toEqual(["dev-1"]);
    const parser = packetParser(client);
    expect(typeof parser.parse).toBe("function");
    expect(parser.packet).toBeDefined();
    const closed = on(c, "close");
    destroyConnection(client);
    await closed;
    c.end(true);
  });

  it("MQTT.js: every outgoing packet, the PUBACK included, passes _sendPacket", async () => {
    const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, { clientId: "dev-2", reconnectPeriod: 0 });
    const sent: string[] = [];
    wrapSendPacket(c, (send) => (packet, cb, ...rest) => {
      sent.push(packet.cmd);
      send(packet, cb, ...rest);
    });
    await on(c, "connect");
    await c.subscribeAsync("t/2", { qos: 1 });
    const got = on(c, "message");
    aedes.publish(
      { cmd: "publish", topic: "t/2", payload: Buffer.from("hi"), qos: 1, retain: false, dup: false },
      () => {},
    );
    await got;
    await new Promise((r) => setTimeout(r, 50));
    expect(sent).toEqual(expect.arrayContaining(["subscribe", "puback"]));
    await c.endAsync();
  });
});
