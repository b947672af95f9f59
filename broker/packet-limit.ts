// aedes parses MQTT with mqtt-packet, which buffers a whole packet before looking at it: a
// client, authenticated or not, could announce a 256 MiB PUBLISH and make the server hold it
// all. This checks each packet's declared length as soon as its header is read, and caps what
// a connection may send before its CONNECT is accepted. The parser is reached through
// common/internals.ts.
import type { Client } from "aedes";
import { packetParser } from "../common/internals.js";

export interface PacketLimits {
  /** Largest packet once connected: payload limit plus topic and header. */
  maxPacketBytes: number;
  /** Bytes a connection may send before its CONNECT is accepted (the CONNECT included). */
  maxPreAuthBytes: number;
  /** Called once per refused connection, with the reason. */
  onRefuse(reason: string): void;
}

export function limitPackets(client: Client, o: PacketLimits): Client {
  const parser = packetParser(client);
  let preAuth = 0;
  let refused = false;
  const refuse = (reason: string) => {
    if (!refused) o.onRefuse(reason);
    refused = true;
    parser._emitError(new Error(reason));
  };
  const parseLength = parser._parseLength.bind(parser);
  parser._parseLength = () => {
    const ok = parseLength();
    if (!ok) return false;
    const max = client.connected ? o.maxPacketBytes : Math.min(o.maxPacketBytes, o.maxPreAuthBytes);
    if (parser.packet.length > max) {
      refuse(`${parser.packet.cmd ?? "packet"} of ${parser.packet.length} bytes over the limit of ${max}`);
      return false;
    }
    return true;
  };
  const parse = parser.parse.bind(parser);
  parser.parse = (buf: Buffer) => {
    if (!client.connected) {
      preAuth += buf.length;
      if (preAuth > o.maxPreAuthBytes) {
        refuse(`${preAuth} bytes before the connection was accepted, over the limit of ${o.maxPreAuthBytes}`);
        return 0;
      }
    }
    return parse(buf);
  };
  return client;
}
