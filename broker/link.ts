// The embedded single-node broker as the controller sees it in-process (issue 17): what
// devices publish on their status, sync, state and telemetry topics is handed over from aedes'
// publish pipeline, and the controller's publishes enter aedes directly — not one more MQTT hop
// over loopback (socket writes, parsing and a PUBACK each way per message).
import type { Aedes, Client } from "aedes";
import type { Logger } from "pino";
import type { BrokerLink } from "./controller/controller.js";

/** What the controller takes from a device's topics (the rest is for the devices). */
const DEVICE_UPLINK = new Set(["status", "sync", "state", "telemetry"]);
/**
 * The controller's publishes into the broker: at most this many in flight (aedes' emitter runs
 * 100 at once and queues the rest; its queue is released recursively, so it must stay short),
 * and per tick. A publish completes when every subscriber's socket took it: a slow client
 * holds its slot until its socket drains (aedes' drainTimeout), so the bound is generous.
 */
const IN_FLIGHT = 256;
const PER_TICK = 512;
/** How long a QoS 0 publish waits, at most, for the QoS 1 ones before it (see brokerLink). */
const ORDER_GRACE_MS = 200;

interface Packet {
  cmd: "publish";
  topic: string;
  payload: Buffer;
  qos: 0 | 1;
  retain: boolean;
  dup: false;
}

/** Whether an MQTT subscription pattern matches a topic (`+`, `#`; no `$share`). */
export function topicMatches(pattern: string, topic: string): boolean {
  const p = pattern.split("/");
  const t = topic.split("/");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === "#") return true;
    if (i >= t.length || (p[i] !== "+" && p[i] !== t[i])) return false;
  }
  return p.length === t.length;
}

export function brokerLink(
  aedes: Aedes,
  o: { prefix: string; log: Logger; fromDevice: (client: Client | null) => boolean },
): BrokerLink {
  const { log } = o;
  // A FIFO, a bounded number in flight and per tick: aedes' emitter queues what is over its
  // concurrency and releases that queue recursively when publishes complete synchronously —
  // 10,000 assignments published in one go overflowed the stack (found by B1 at 10,000 devices).
  //
  // A QoS 0 publish waits until the QoS 1 ones before it have completed. aedes numbers every
  // publish as it enters and a client drops a packet numbered below one it already got (its
  // `dedupe`), but a QoS 1 publish takes one more asynchronous step (the offline queue) before
  // it reaches the clients than a QoS 0 one: a QoS 0 event published just after a QoS 1 RPC
  // reply overtook it and the operator's CLI lost the reply ("no answer ... within 15s"), and a
  // QoS 0 StatusAck could make a device lose the job published just before it. That extra
  // step is an in-memory lookup: a QoS 1 publish still not complete ORDER_GRACE_MS after it
  // entered waits for a socket to drain, past the numbering check — so a QoS 0 one waits no
  // longer than that (one frozen client must not hold every device's ack until aedes'
  // drainTimeout cuts it off).
  const queue: Array<Packet | undefined> = [];
  let head = 0;
  let inFlight = 0;
  let inFlightQos1 = 0;
  let lastQos1At = 0;
  let graceTimer: NodeJS.Timeout | undefined;
  let pumping = false;
  const schedule = () => {
    if (pumping) return;
    pumping = true;
    setImmediate(pump);
  };
  const pump = () => {
    pumping = false;
    let n = 0;
    while (head < queue.length && inFlight < IN_FLIGHT && n++ < PER_TICK) {
      const packet = queue[head]!;
      if (packet.qos === 0 && inFlightQos1 > 0) {
        const left = ORDER_GRACE_MS - (performance.now() - lastQos1At);
        if (left > 0) {
          // resumed when they complete, or when the grace is over
          graceTimer ??= setTimeout(() => {
            graceTimer = undefined;
            schedule();
          }, left + 1).unref();
          return;
        }
      }
      queue[head++] = undefined;
      inFlight++;
      if (packet.qos) {
        inFlightQos1++;
        lastQos1At = performance.now();
      }
      aedes.publish(packet as never, (err) => {
        inFlight--;
        if (packet.qos) inFlightQos1--;
        if (err) log.debug({ err: err.message, topic: packet.topic }, "publish not completed");
        if (head < queue.length) schedule();
      });
    }
    if (head === queue.length) {
      queue.length = 0;
      head = 0;
    } else if (inFlight < IN_FLIGHT) schedule();
  };
  // Who may be listening on the topics the controller asks about (its events topic): the
  // connected clients' subscriptions that match, kept from aedes' subscribe, unsubscribe and
  // disconnect events. A topic asked about for the first time is looked up in every connected
  // client's subscriptions (QoS 0 ones too: aedes' persistence keeps only QoS 1 and 2), and so
  // is a client whose session was restored on reconnect (clean: false: it sends no SUBSCRIBE).
  const { persistence } = aedes as unknown as {
    persistence: {
      createRetainedStreamCombi(p: string[]): AsyncIterable<{ topic: string; payload: Buffer }>;
    };
  };
  type Subscriber = { id: string; subscriptions?: Record<string, unknown> };
  /** Per watched topic: "clientId\nfilter" of each matching subscription of a connected client. */
  const watched = new Map<string, Set<string>>();
  const lookUp = (topic: string, clients: Iterable<Subscriber>) => {
    const set = watched.get(topic)!;
    for (const c of clients)
      for (const filter of Object.keys(c.subscriptions ?? {}))
        if (topicMatches(filter, topic)) set.add(`${c.id}\n${filter}`);
  };
  const connected = () =>
    Object.values((aedes as unknown as { clients: Record<string, Subscriber> }).clients);
  aedes.on("subscribe", (subs, client) => {
    // Refused ones are in the list too (granted 128): they do not count.
    for (const [topic, set] of watched)
      for (const s of subs)
        if (s.qos <= 2 && topicMatches(s.topic, topic)) set.add(`${client.id}\n${s.topic}`);
  });
  aedes.on("unsubscribe", (filters, client) => {
    for (const set of watched.values()) for (const f of filters) set.delete(`${client.id}\n${f}`);
  });
  aedes.on("clientDisconnect", (client) => {
    const mine = `${client.id}\n`;
    for (const set of watched.values()) for (const k of set) if (k.startsWith(mine)) set.delete(k);
    // A session taken over: the new connection of that id is still there.
    const now = (aedes as unknown as { clients: Record<string, Subscriber> }).clients[client.id];
    if (now && now !== (client as unknown)) for (const topic of watched.keys()) lookUp(topic, [now]);
  });
  aedes.on("clientReady", (client) => {
    for (const topic of watched.keys()) lookUp(topic, [client as unknown as Subscriber]);
  });
  return {
    subscribed: (topic) => {
      if (!watched.has(topic)) {
        watched.set(topic, new Set());
        lookUp(topic, connected());
      }
      return watched.get(topic)!.size > 0;
    },
    tap: (deliver) => {
      // First the retained DeviceStates (devices that connected before the controller started,
      // as an MQTT subscription would get them), then what arrived meanwhile, then live.
      let held: Array<[string, Buffer]> | undefined = [];
      aedes.on("publish", (packet, client) => {
        if (!o.fromDevice(client)) return;
        const channel = packet.topic.slice(packet.topic.lastIndexOf("/") + 1);
        if (!DEVICE_UPLINK.has(channel)) return;
        if (held) held.push([packet.topic, packet.payload as Buffer]);
        else deliver(packet.topic, packet.payload as Buffer);
      });
      const retained = persistence.createRetainedStreamCombi([`${o.prefix}/d/+/state`]);
      void (async () => {
        try {
          for await (const p of retained) deliver(p.topic, p.payload);
        } catch (err) {
          log.error({ err }, "cannot read the retained device states");
        }
        for (const [topic, payload] of held ?? []) deliver(topic, payload);
        held = undefined;
      })();
    },
    publish: (topic, payload, qos, retain) => {
      queue.push({ cmd: "publish", topic, payload, qos, retain, dup: false });
      schedule();
    },
  };
}
