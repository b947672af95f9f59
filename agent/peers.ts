// Peer sharing of update chunks inside a site (DESIGN.md §11). Every agent serves the chunks in
// its cache over HTTPS with its fleet-CA certificate, only to devices whose certificate (also
// fleet-CA, TLS-verified) names the same site (OU `site=<label>`), only chunks by their sha256
// (never a listing), with a cap on concurrent uploads and bytes a second. A downloading agent
// asks the center's tracker which peers of its site hold the artifact, takes each chunk from a
// random one of them (several chunks in flight, so several peers at once), verifies it against
// the signed manifest, and drops — for the rest of that download — a peer that served a bad or
// short chunk (counted, logged, named in the task's message). Serving does not hash: whoever
// receives a chunk verifies it, so a tampered cache cannot make anyone install a wrong byte.
import { readFileSync } from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import { createServer, request, type Server } from "node:https";
import { networkInterfaces } from "node:os";
import type { PeerCertificate, TLSSocket } from "node:tls";
import type { Logger } from "pino";
import type { Counters } from "../common/counters.js";
import { Throttle } from "../common/throttle.js";
import type { ByteSource } from "../firmware-tasks/types.js";
import { type ChunkPeers, type ChunkRequest, type ChunkStore, matches } from "./chunks.js";

export interface PeerTls {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

export interface PeerServerOptions {
  deviceId: string;
  site: string | undefined;
  port: number;
  bind: string;
  host?: string;
  tls: PeerTls;
  chunks: ChunkStore;
  maxUploads: number;
  bytesPerSecond: number;
  log: Logger;
  counters: Counters;
}

const siteOf = (cert: PeerCertificate | undefined) => {
  const ou = cert?.subject?.OU;
  const v = Array.isArray(ou) ? ou[0] : ou;
  return v?.startsWith("site=") ? v.slice("site=".length) : undefined;
};

export class PeerServer {
  private server: Server | undefined;
  private uploads = 0;
  private readonly throttle: Throttle;
  url = "";

  constructor(private readonly opts: PeerServerOptions) {
    this.throttle = new Throttle(opts.bytesPerSecond);
  }

  async start(): Promise<void> {
    const o = this.opts;
    this.server = createServer(
      { ...o.tls, requestCert: true, rejectUnauthorized: true, handshakeTimeout: 10_000 },
      (req, res) => {
        this.serve(req, res).catch((err) => {
          o.log.warn({ err: (err as Error).message }, "peer request failed");
          if (!res.headersSent) res.writeHead(500).end();
          else res.destroy();
        });
      },
    );
    // A client without a fleet certificate never gets past the handshake.
    this.server.on("tlsClientError", () => o.counters.inc("peer_tls_refused"));
    await new Promise<void>((resolve, reject) => {
      this.server!.once("error", reject);
      this.server!.listen(o.port, o.bind, () => resolve());
    });
    const port = (this.server.address() as { port: number }).port;
    this.url = `https://${o.host ?? firstAddress()}:${port}`;
    o.log.info({ url: this.url, site: o.site }, "serving update chunks to the site's peers");
  }

  stop(): void {
    this.server?.close();
    this.server?.closeAllConnections();
  }

  private async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const o = this.opts;
    const peer = (req.socket as TLSSocket).getPeerCertificate();
    const m = /^\/chunks\/([0-9a-f]{64})$/.exec(req.url ?? "");
    if (!o.site || siteOf(peer) !== o.site || req.method !== "GET") {
      o.counters.inc("peer_refused");
      o.log.warn({ peer: peer?.subject?.CN, site: siteOf(peer) }, "refused a peer of another site");
      res.writeHead(403).end();
      return;
    }
    if (!m) {
      res.writeHead(404).end();
      return;
    }
    if (this.uploads >= o.maxUploads) {
      o.counters.inc("peer_busy");
      res.writeHead(503, { "retry-after": "1" }).end();
      return;
    }
    const data = await o.chunks.read(m[1]!);
    if (!data) {
      res.writeHead(404).end();
      return;
    }
    this.uploads++;
    try {
      res.writeHead(200, {
        "content-type": "application/octet-stream",
        "content-length": String(data.length),
      });
      await this.throttle.send(data, res);
      res.end();
      o.counters.inc("peer_bytes_served", data.length);
    } finally {
      this.uploads--;
    }
  }
}

function firstAddress(): string {
  for (const list of Object.values(networkInterfaces()))
    for (const a of list ?? []) if (a.family === "IPv4" && !a.internal) return a.address;
  return "127.0.0.1";
}

export interface TrackerPeer {
  id: string;
  url: string;
  holds: boolean;
  gateway: boolean;
}

export interface PeerFetcherOptions {
  tls: PeerTls;
  /** The center's tracker: the site's peers that hold an artifact. */
  tracker(artifact: string, signal: AbortSignal): Promise<TrackerPeer[]>;
  log: Logger;
  counters: Counters;
}

const TRACKER_TTL_MS = 10_000;
const PEER_TIMEOUT_MS = 10_000;
const TRIES = 3;
const BUSY_RETRIES = 20;

export class PeerFetcher implements ChunkPeers {
  private readonly lists = new Map<string, { at: number; peers: TrackerPeer[] }>();
  /** Peers that served a bad chunk, per artifact (dropped for that download). */
  private readonly bad = new Map<string, Set<string>>();

  constructor(private readonly opts: PeerFetcherOptions) {}

  /** The peers dropped while fetching `artifact`, and forgets them (a new download trusts again). */
  dropped(artifact: string): string[] {
    const list = [...(this.bad.get(artifact) ?? [])];
    this.bad.delete(artifact);
    return list;
  }

  async fetch(
    c: ChunkRequest,
    signal: AbortSignal,
    artifact?: string,
  ): Promise<{ data: Buffer; source: ByteSource } | undefined> {
    if (!artifact) return undefined;
    const bad = this.bad.get(artifact) ?? new Set<string>();
    this.bad.set(artifact, bad);
    const peers = (await this.peers(artifact, signal)).filter((p) => !bad.has(p.id));
    // Random among the holders (the tracker shuffled them), then those of other versions.
    const holders = peers.filter((p) => p.holds);
    const others = peers.filter((p) => !p.holds);
    const pick = [...shuffled(holders), ...shuffled(others)].slice(0, TRIES);
    for (const p of pick) {
      let data: Buffer | "busy" | undefined;
      try {
        // A busy peer (at its upload cap) is asked again after a short, random pause.
        for (let i = 0; i < BUSY_RETRIES; i++) {
          data = await this.get(p, c, signal);
          if (data !== "busy") break;
          await new Promise((r) => setTimeout(r, 50 + Math.random() * 200));
        }
      } catch (err) {
        if (signal.aborted) throw signal.reason;
        this.opts.counters.inc("peer_fetch_failed");
        this.opts.log.debug({ peer: p.id, err: (err as Error).message }, "peer did not answer");
        continue;
      }
      if (!data || data === "busy") continue; // it does not hold this one, or stayed busy
      if (!matches(data, c)) {
        bad.add(p.id);
        this.opts.counters.inc("peer_bad_chunk");
        this.opts.log.warn(
          { peer: p.id, chunk: c.sha256.slice(0, 12), bytes: data.length },
          "a peer served a chunk that does not match the signed manifest; dropped for this download",
        );
        continue;
      }
      return { data, source: p.gateway ? "gateway" : "peers" };
    }
    return undefined;
  }

  private async peers(artifact: string, signal: AbortSignal): Promise<TrackerPeer[]> {
    const cached = this.lists.get(artifact);
    if (cached && Date.now() - cached.at < TRACKER_TTL_MS) return cached.peers;
    let peers: TrackerPeer[] = [];
    try {
      peers = await this.opts.tracker(artifact, signal);
    } catch (err) {
      if (signal.aborted) throw signal.reason;
      this.opts.log.debug({ err: (err as Error).message }, "no answer from the tracker; no peers this time");
    }
    this.lists.set(artifact, { at: Date.now(), peers });
    return peers;
  }

  /** One chunk from one peer: undefined when it does not hold it; at most the chunk's size + 1. */
  private get(p: TrackerPeer, c: ChunkRequest, signal: AbortSignal): Promise<Buffer | "busy" | undefined> {
    const url = new URL(`/chunks/${c.sha256}`, p.url);
    return new Promise((resolve, reject) => {
      const req = request(
        url,
        {
          ...this.opts.tls,
          // The peer proves it is the device the tracker named (CN = its id), whatever its address.
          checkServerIdentity: (_host, cert) =>
            cert.subject?.CN === p.id ? undefined : new Error(`peer certificate is not ${p.id}'s`),
          signal: AbortSignal.any([signal, AbortSignal.timeout(PEER_TIMEOUT_MS)]),
          agent: false,
        },
        (res) => {
          if (res.statusCode === 404 || res.statusCode === 503) {
            res.resume();
            return resolve(res.statusCode === 503 ? "busy" : undefined);
          }
          if (res.statusCode !== 200) {
            res.resume();
            return reject(new Error(`HTTP ${res.statusCode}`));
          }
          const parts: Buffer[] = [];
          let size = 0;
          res.on("data", (d: Buffer) => {
            size += d.length;
            if (size > c.size + 1) {
              res.destroy();
              return resolve(Buffer.concat(parts)); // too much: it will not verify
            }
            parts.push(d);
          });
          res.on("end", () => resolve(Buffer.concat(parts)));
          res.on("error", reject);
        },
      );
      req.on("error", reject);
      req.end();
    });
  }
}

function shuffled<T>(xs: T[]): T[] {
  const out = [...xs];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}

export function loadPeerTls(caFile: string, certFile: string, keyFile: string): PeerTls {
  return { ca: readFileSync(caFile), cert: readFileSync(certFile), key: readFileSync(keyFile) };
}
