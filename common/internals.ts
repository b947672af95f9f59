// Every place EdgeFleet reaches past a library's public API, in one module. Each accessor
// names what it relies on; test/integration/internals.test.ts drives the real libraries
// through all of them and fails when an upgrade moves one. Written against:
//   aedes 1.2 (`clients`, `client._will`, `client.duplicates`, `client._parser`, `client.req`),
//   mqtt-packet 9.0 (`Parser._parseLength`, `_emitError`, `packet.length`),
//   MQTT.js 5.16 (`MqttClient._sendPacket`, the one place PUBACKs leave),
//   aedes-persistence 11 (`storeRetained`, `createRetainedStreamCombi`: its documented
//   persistence interface, wrapped in broker/retained.ts, not an internal).
// Type-only imports: the agent's bundle does not carry aedes.
import type { Aedes, Client } from "aedes";
import type { MqttClient } from "mqtt";

/** The connected aedes client with this id (aedes keeps them in `clients`). */
export function aedesClient(aedes: Aedes, id: string): Client | undefined {
  return (aedes as unknown as { clients: Record<string, Client | undefined> }).clients[id];
}

/** Every client connected to this aedes. */
export function aedesClients(aedes: Aedes): Client[] {
  return Object.values((aedes as unknown as { clients: Record<string, Client> }).clients);
}

/** Drops a client's socket without the MQTT goodbye (a bounded shutdown). */
export function destroyConnection(client: Client): void {
  (client.conn as { destroy?: () => void }).destroy?.();
}

/** The Last Will a connecting client asked for (aedes keeps it in `_will` until it is sent). */
export function clientWill(client: Client): { topic: string; retain?: boolean } | undefined {
  return (client as unknown as { _will?: { topic: string; retain?: boolean } | null })._will ?? undefined;
}

/** Turns off aedes' per-node duplicate filter for this client (`duplicates`; see server.ts). */
export function disableDedupe(client: Client): void {
  (client as unknown as { duplicates: unknown }).duplicates = NO_DEDUPE;
}

const NO_DEDUPE = new Proxy({}, { get: () => Number.NEGATIVE_INFINITY, set: () => true });

/** The peer address of an MQTT client: its socket, or for WebSocket the HTTP request's (`req`). */
export function remoteAddress(client: Client): string {
  const conn = client.conn as { remoteAddress?: string };
  return (
    conn.remoteAddress ??
    (client as unknown as { req?: { socket?: { remoteAddress?: string } } }).req?.socket?.remoteAddress ??
    "?"
  );
}

/** mqtt-packet's parser as aedes holds it for one client. */
export interface PacketParser {
  packet: { cmd?: string; length: number };
  parse(buf: Buffer): number;
  _parseLength(): boolean;
  _emitError(err: Error): void;
}

export function packetParser(client: Client): PacketParser {
  const parser = (client as unknown as { _parser?: PacketParser })._parser;
  if (!parser || typeof parser._parseLength !== "function" || typeof parser._emitError !== "function")
    throw new Error("aedes/mqtt-packet internals changed: no client._parser._parseLength (common/internals.ts)");
  return parser;
}

export type SendPacket = (
  packet: { cmd: string; messageId?: number },
  cb?: (err?: Error) => void,
  ...rest: unknown[]
) => void;

/** Replaces MQTT.js's `_sendPacket` with `wrap(original)`. */
export function wrapSendPacket(client: MqttClient, wrap: (send: SendPacket) => SendPacket): void {
  const inner = client as unknown as { _sendPacket?: SendPacket };
  if (typeof inner._sendPacket !== "function")
    throw new Error("MQTT.js internals changed: no MqttClient._sendPacket (common/internals.ts)");
  inner._sendPacket = wrap(inner._sendPacket.bind(client));
}
