// MQTT 3.1.1 has no way to refuse one PUBLISH: a broker that will not take it (too large, not
// allowed) closes the connection, and MQTT.js, keeping its QoS 1 messages across reconnects,
// sends the same message again on the next connection, forever — the controller deaf while
// it lasts. This notices a message that stays first in the outgoing store while connection
// after connection dies right after it was (re)sent, and drops that one message.
import type { MqttClient } from "mqtt";
import type { Logger } from "pino";
import type { Counters } from "../../common/counters.js";

interface StoredPacket {
  messageId?: number;
  topic?: string;
  payload?: Buffer | string;
}

export interface RefusedOptions {
  log: Logger;
  counters: Counters;
  /** Connections in a row that must die with the same message first in flight. */
  strikes?: number;
  /** Only a connection that dies this soon after it came up counts. */
  withinMs?: number;
}

function oldestOutgoing(client: MqttClient): Promise<StoredPacket | undefined> {
  return new Promise((resolve) => {
    const stream = client.outgoingStore.createStream();
    stream.once("data", (p: StoredPacket) => {
      stream.destroy();
      resolve(p);
    });
    stream.once("end", () => resolve(undefined));
    stream.once("error", () => resolve(undefined));
  });
}

export function dropRefusedPublishes(client: MqttClient, o: RefusedOptions): void {
  const strikes = o.strikes ?? 3;
  const withinMs = o.withinMs ?? 5000;
  let upAt = 0;
  let suspect: number | undefined;
  let count = 0;
  // Not "connect": MQTT.js emits it only after re-sending (and getting acknowledged) what it
  // kept from before, which a refused message prevents.
  client.on("packetreceive", (packet) => {
    if (packet.cmd === "connack") upAt = Date.now();
  });
  client.on("close", () => {
    if (!upAt || Date.now() - upAt > withinMs) {
      count = 0;
      return;
    }
    upAt = 0;
    void oldestOutgoing(client).then((p) => {
      if (p?.messageId === undefined) {
        count = 0;
        return;
      }
      count = p.messageId === suspect ? count + 1 : 1;
      suspect = p.messageId;
      if (count < strikes) return;
      count = 0;
      suspect = undefined;
      o.counters.inc("publish_refused_dropped");
      o.log.error(
        { topic: p.topic, bytes: p.payload?.length ?? 0, connections: strikes },
        "the broker closed the connection after this message every time it was sent; dropped it",
      );
      client.removeOutgoingMessage(p.messageId);
    });
  });
}
