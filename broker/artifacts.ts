// The artifact store on the server's HTTP port. Blobs are content-addressed (sha256) under
// D/artifacts/blobs; each (name, version) has a manifest signed by an operator. Operators push,
// list and remove (HTTP Basic with their scrypt password); a device (HTTP Basic with its token)
// may read only the manifests and blobs that a job currently assigned to it names.
//
// About 440 lines: artifact push/list/remove, device downloads with their job check, and device
// uploads (backups) with quotas share the same authentication, path checks and streaming.
import { createHash, type KeyObject } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { join } from "node:path";
import type { TLSSocket } from "node:tls";
import { createGunzip, gzipSync } from "node:zlib";
import type { AbstractSublevel } from "abstract-level";
import type { Logger } from "pino";
import { chunkStream } from "../common/chunking.js";
import type { Counters } from "../common/counters.js";
import { Throttle } from "../common/throttle.js";
import { ApiError, cursor, DEFAULT_PAGE, fillPage, MAX_PAGE } from "../proto/api.js";
import { pb, TERMINAL_STATES } from "../proto/index.js";
import { type Manifest, verifyManifest } from "../proto/signing.js";
import type { ServerConfig } from "./config.js";
import type { JobStore } from "./controller/job-store.js";
import type { Registry } from "./controller/registry.js";
import type { ControllerStore, JobNames } from "./controller/store.js";
import type { PasswordGate } from "./password-gate.js";

export interface ArtifactRecord {
  name: string;
  version: string;
  size: number;
  sha256: string;
  hardware: string[];
  createdAt: number;
  signed: string; // base64 SignedManifest
}

const MAX_UPLOAD = 2 * 1024 ** 3;

/** An artifact's key; jobs name artifacts the same way (job-store.ts jobNames). */
const recordKey = (name: string, version: string) => `${name}@${version}`;
const UPLOADS_PER_DEVICE = 50;
const UPLOAD_BYTES_PER_DEVICE = 4 * 1024 ** 3;

type Who = { kind: "operator"; name: string } | { kind: "device"; id: string };

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

export class ArtifactStore {
  private readonly records: AbstractSublevel<
    ControllerStore["db"],
    string | Buffer | Uint8Array,
    string,
    ArtifactRecord
  >;
  private readonly blobs: string;
  private readonly chunks: string;
  private chunkIndex: ChunkIndex | undefined;
  /** limits.artifactBytesPerSecond, for every artifact byte the center serves. */
  private readonly throttle: Throttle;
  /** An artifact was stored (notifications). */
  onPushed?: (a: { name: string; version: string; size: number; operator: string }) => Promise<void>;

  constructor(
    private readonly opts: {
      dir: string;
      store: ControllerStore;
      jobs: JobStore;
      registry: Registry;
      config: ServerConfig;
      operatorKeys: ReadonlyMap<string, KeyObject>;
      log: Logger;
      counters: Counters;
      passwords: PasswordGate;
    },
  ) {
    this.records = opts.store.db.sublevel<string, ArtifactRecord>("art", { valueEncoding: "json" }) as never;
    this.blobs = join(opts.dir, "artifacts", "blobs");
    this.chunks = join(opts.dir, "artifacts", "chunks");
    this.throttle = new Throttle(opts.config.limits.artifactBytesPerSecond);
  }

  /** Handles /v1/artifacts and /v1/blobs; false for any other URL. */
  async handle(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
    const url = new URL(req.url ?? "/", "http://x");
    const raw = url.pathname.split("/").filter(Boolean);
    if (raw[0] !== "v1" || !["artifacts", "blobs", "chunks", "peers", "uploads"].includes(raw[1] ?? ""))
      return false;
    try {
      const parts = raw.map((p) => {
        try {
          return decodeURIComponent(p);
        } catch {
          throw new HttpError(400, `malformed path segment "${p.slice(0, 64)}"`);
        }
      });
      const who = await this.authenticate(req);
      if (parts[1] === "uploads") return await this.uploads(req, res, who, parts.slice(2));
      if (parts[1] === "blobs" && parts.length === 3 && req.method === "GET")
        return await this.sendBlob(req, res, who, parts[2]!);
      if (parts[1] === "chunks" && parts.length === 3 && req.method === "GET")
        return await this.sendChunk(res, who, parts[2]!);
      if (parts[1] === "peers" && parts.length === 2 && req.method === "GET") {
        // The tracker: which of the device's site's peers hold an artifact it may fetch.
        if (who.kind !== "device") throw new HttpError(403, "devices only");
        const artifact = url.searchParams.get("artifact") ?? "";
        const [name, version] = artifact.split("@");
        await this.allowed(who, (r) => r.name === name && r.version === version);
        return this.json(res, 200, { peers: this.opts.registry.peersFor(who.id, artifact) });
      }
      if (parts.length === 2 && req.method === "GET") {
        this.operatorOnly(who);
        const after = cursor.decode(url.searchParams.get("cursor") ?? undefined);
        const records = this.records.values(after ? { gt: after } : {});
        return this.json(
          res,
          200,
          await fillPage(records, {
            ...this.pageOf(url),
            json: ({ signed: _s, ...r }) => r,
            key: (r) => recordKey(r.name, r.version),
          }),
        );
      }
      if (parts.length === 2 && req.method === "PUT")
        return this.json(res, 201, await this.push(req, this.operatorOnly(who)));
      if (parts.length === 4 && req.method === "DELETE")
        return this.json(res, 200, await this.remove(this.operatorOnly(who), parts[2]!, parts[3]!));
      if (parts.length === 5 && parts[4] === "manifest" && req.method === "GET") {
        const rec = await this.allowed(who, (r) => r.name === parts[2] && r.version === parts[3]);
        res.writeHead(200, { "content-type": "application/octet-stream" });
        res.end(Buffer.from(rec.signed, "base64"));
        return true;
      }
      throw new HttpError(404, "no such artifact route");
    } catch (err) {
      return this.fail(res, err);
    }
  }

  /**
   * An operator-only JSON route outside the store (the ACL export), with the same
   * authentication and error replies as the artifact routes.
   */
  async operatorJson(req: IncomingMessage, res: ServerResponse, produce: () => unknown): Promise<void> {
    if (await this.operatorGate(req, res)) this.json(res, 200, produce());
  }

  /** True for an authenticated operator; otherwise the error reply is sent and false returned. */
  async operatorGate(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
    try {
      this.operatorOnly(await this.authenticate(req));
      return true;
    } catch (err) {
      this.fail(res, err);
      return false;
    }
  }

  private fail(res: ServerResponse, err: unknown): true {
    const e =
      err instanceof HttpError
        ? err
        : err instanceof ApiError
          ? new HttpError(400, err.message)
          : new HttpError(500, (err as Error).message);
    if (e.status >= 500) this.opts.log.error({ err }, "HTTP request failed");
    else this.opts.counters.inc(`artifact_http_${e.status}`);
    if (!res.headersSent) this.json(res, e.status, { error: e.message });
    else res.destroy();
    return true;
  }

  /** `?limit=N` (default 500, at most 5,000); a page stays under the payload limit too. */
  private pageOf(url: URL): { limit: number; budget: number } {
    const raw = url.searchParams.get("limit");
    const limit = raw === null ? DEFAULT_PAGE : Number(raw);
    if (!Number.isInteger(limit) || limit < 1 || limit > MAX_PAGE)
      throw new HttpError(400, `limit must be a whole number from 1 to ${MAX_PAGE}`);
    return { limit, budget: this.opts.config.limits.maxPayloadBytes };
  }

  private json(res: ServerResponse, status: number, body: unknown): true {
    res.writeHead(status, { "content-type": "application/json" });
    res.end(JSON.stringify(body));
    return true;
  }

  private async authenticate(req: IncomingMessage): Promise<Who> {
    const m = /^Basic (.+)$/.exec(req.headers.authorization ?? "");
    if (!m) {
      // HTTPS with a fleet-CA client certificate: CN = device id.
      const sock = req.socket as TLSSocket;
      const peer = sock.authorized ? sock.getPeerCertificate?.() : undefined;
      const cn = peer?.subject?.CN;
      if (typeof cn === "string" && this.opts.registry.certAllowed(cn, peer?.serialNumber))
        return { kind: "device", id: cn };
      throw new HttpError(401, "authentication required");
    }
    const [user, ...rest] = Buffer.from(m[1]!, "base64").toString().split(":");
    const pass = rest.join(":");
    const op = this.opts.config.operators.find((x) => x.username === user);
    if (op) {
      const verdict = await this.opts.passwords.check(req.socket.remoteAddress ?? "?", pass, op.passwordHash);
      if (verdict === "ok") return { kind: "operator", name: op.username };
      this.opts.counters.inc(`operator_login_${verdict}`);
      if (verdict === "throttled")
        throw new HttpError(429, "too many failed logins from this address; try later");
      if (verdict === "busy") throw new HttpError(503, "too many logins in progress; try again");
      throw new HttpError(401, "bad credentials");
    }
    if (user && this.opts.registry.verifyToken(user, pass)) return { kind: "device", id: user };
    this.opts.counters.inc("artifact_auth_failed");
    throw new HttpError(401, "bad credentials");
  }

  private operatorOnly(who: Who): string {
    if (who.kind !== "operator") throw new HttpError(403, "operators only");
    return who.name;
  }

  async list(_who?: string): Promise<Array<Omit<ArtifactRecord, "signed">>> {
    const out = [];
    for await (const { signed: _s, ...r } of this.records.values()) out.push(r);
    return out;
  }

  /** PUT: the body is the file, X-Fleet-Manifest the signed manifest; stored only if they agree. */
  private async push(req: IncomingMessage, operator: string) {
    const header = req.headers["x-fleet-manifest"];
    if (typeof header !== "string") throw new HttpError(400, "X-Fleet-Manifest header missing");
    const signed = pb.SignedManifest.decode(Buffer.from(header, "base64"));
    const v = verifyManifest(signed, this.opts.operatorKeys);
    if (!v.ok) throw new HttpError(400, v.message);
    const m = v.manifest;
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(m.name) || !/^[A-Za-z0-9._+-]{1,64}$/.test(m.version))
      throw new HttpError(400, "bad name or version");
    const key = recordKey(m.name, m.version);
    if (await this.records.get(key)) throw new HttpError(409, `${m.name} ${m.version} already exists`);
    await mkdir(this.blobs, { recursive: true });
    const tmp = join(this.blobs, `.upload-${m.sha256}-${process.hrtime.bigint()}`);
    const { size, sha } = await receive(
      req,
      tmp,
      Number(m.size),
      `body is larger than the manifest's ${m.size} bytes`,
    );
    if (size !== m.size || sha !== m.sha256) {
      await rm(tmp, { force: true });
      throw new HttpError(
        400,
        `upload does not match its manifest (size ${size}/${m.size}, sha256 ${sha.slice(0, 12)}…/${m.sha256.slice(0, 12)}…)`,
      );
    }
    await rename(tmp, join(this.blobs, sha));
    if (m.chunks.length) {
      const problem = await this.storeChunks(join(this.blobs, sha), m);
      if (problem) {
        if (!(await this.list()).some((r) => r.sha256 === sha))
          await rm(join(this.blobs, sha), { force: true });
        throw new HttpError(400, problem);
      }
    }
    const rec: ArtifactRecord = {
      name: m.name,
      version: m.version,
      size,
      sha256: sha,
      hardware: m.hardware,
      createdAt: Date.now(),
      signed: Buffer.from(pb.SignedManifest.encode(signed).finish()).toString("base64"),
    };
    await this.records.put(key, rec, { sync: true } as never);
    (await this.index()).add(key, m);
    this.opts.log.info(
      { name: m.name, version: m.version, size, chunks: m.chunks.length, operator },
      "artifact stored",
    );
    // Queued before the operator hears it is stored.
    await this.onPushed?.({ name: m.name, version: m.version, size, operator });
    const { signed: _s, ...shown } = rec;
    return shown;
  }

  private async remove(_operator: string, name: string, version: string) {
    const key = recordKey(name, version);
    const rec = await this.records.get(key);
    if (!rec) throw new HttpError(404, `no artifact ${name} ${version}`);
    await this.records.del(key);
    const stillUsed = (await this.list()).some((r) => r.sha256 === rec.sha256);
    if (!stillUsed) await rm(join(this.blobs, rec.sha256), { force: true });
    for (const hex of (await this.index()).remove(key, manifestOf(rec)))
      await rm(join(this.chunks, hex), { force: true });
    return { name, version, removed: true };
  }

  /** The artifact, if the caller is an operator or a device with an open job naming it. */
  /**
   * The artifact a request is for, if the requester may have it: an operator any, a device one
   * that a job currently assigned to it names. Several versions may share one blob (the same
   * tarball pushed twice, M10): any of them named is enough.
   */
  private async allowed(who: Who, match: (r: ArtifactRecord) => boolean): Promise<ArtifactRecord> {
    const recs = (await this.records.values().all()).filter(match);
    if (!recs.length) throw new HttpError(404, "no such artifact");
    if (who.kind === "operator") return recs[0]!;
    const named = new Set<string>();
    await this.jobWants(who.id, (names) => {
      for (const key of names.artifacts) named.add(key);
      return false;
    });
    const rec = recs.find((r) => named.has(recordKey(r.name, r.version)));
    if (rec) return rec;
    this.opts.counters.inc("artifact_denied");
    throw new HttpError(403, `no job assigned to ${who.id} names ${recs[0]!.name} ${recs[0]!.version}`);
  }

  /**
   * Whether a job currently assigned to the device (not yet terminal) names what `wants` asks
   * for: a lookup in what each job's tasks named when it was submitted.
   */
  private async jobWants(deviceId: string, wants: (names: JobNames) => boolean): Promise<boolean> {
    for (const a of await this.opts.jobs.ofDevice(deviceId)) {
      if (TERMINAL_STATES.has(a.state)) continue;
      const job = await this.opts.jobs.get(a.jobId);
      if (job && wants(await this.opts.jobs.names(job))) return true;
    }
    return false;
  }

  /**
   * Device uploads (backups): PUT /v1/uploads/<file> by a device, with X-Fleet-Sha256; operators
   * list them (GET /v1/uploads) and fetch one (GET /v1/uploads/<device>/<file>).
   */
  private async uploads(req: IncomingMessage, res: ServerResponse, who: Who, rest: string[]): Promise<true> {
    const dir = join(this.opts.dir, "artifacts", "uploads");
    const safe = (s: string | undefined) =>
      s !== undefined && /^[A-Za-z0-9._-]{1,128}$/.test(s) && !s.startsWith(".");
    if (req.method === "PUT" && rest.length === 1 && who.kind === "device") {
      if (!safe(rest[0])) throw new HttpError(400, "bad file name");
      // Only while a job asks for it, and within the device's quota (M4).
      if (!(await this.jobWants(who.id, (names) => names.uploads)))
        throw new HttpError(403, `no job assigned to ${who.id} asks for an upload`);
      const mine = await readdir(join(dir, who.id)).catch(() => [] as string[]);
      const sizes = await Promise.all(
        mine.map((f) =>
          stat(join(dir, who.id, f)).then(
            (st) => st.size,
            () => 0,
          ),
        ),
      );
      const used = sizes.reduce((a, b) => a + b, 0);
      const declared = Number(req.headers["content-length"] ?? 0);
      if (mine.length >= UPLOADS_PER_DEVICE)
        throw new HttpError(
          507,
          `${who.id} has ${mine.length} uploads, the most a device may keep (${UPLOADS_PER_DEVICE})`,
        );
      if (used + declared > UPLOAD_BYTES_PER_DEVICE)
        throw new HttpError(
          507,
          `${who.id} would exceed its upload quota of ${UPLOAD_BYTES_PER_DEVICE} bytes`,
        );
      const want = String(req.headers["x-fleet-sha256"] ?? "");
      const target = join(dir, who.id, rest[0]!);
      await mkdir(join(dir, who.id), { recursive: true });
      const tmp = `${target}.partial`;
      const { size, sha } = await receive(req, tmp, MAX_UPLOAD, `uploads are limited to ${MAX_UPLOAD} bytes`);
      if (sha !== want) {
        await rm(tmp, { force: true });
        throw new HttpError(400, "upload does not match its X-Fleet-Sha256");
      }
      await rename(tmp, target);
      this.opts.log.info({ deviceId: who.id, file: rest[0], size }, "device upload stored");
      return this.json(res, 201, { deviceId: who.id, file: rest[0], size, sha256: sha });
    }
    if (req.method === "GET" && who.kind === "operator") {
      if (rest.length === 0) {
        const url = new URL(req.url ?? "/", "http://x");
        const after = cursor.decode(url.searchParams.get("cursor") ?? undefined) ?? "";
        async function* files() {
          for (const d of (await readdir(dir).catch(() => [] as string[])).sort()) {
            for (const f of (await readdir(join(dir, d))).sort()) {
              if (f.endsWith(".partial") || `${d}/${f}` <= after) continue;
              const st = await stat(join(dir, d, f));
              yield { deviceId: d, file: f, size: st.size, at: new Date(st.mtimeMs).toISOString() };
            }
          }
        }
        return this.json(
          res,
          200,
          await fillPage(files(), {
            ...this.pageOf(url),
            json: (x) => x,
            key: (x) => `${x.deviceId}/${x.file}`,
          }),
        );
      }
      if (rest.length === 2 && safe(rest[0]) && safe(rest[1])) {
        const file = join(dir, rest[0]!, rest[1]!);
        const st = await stat(file).catch(() => undefined);
        if (!st) throw new HttpError(404, "no such upload");
        res.writeHead(200, { "content-type": "application/octet-stream", "content-length": String(st.size) });
        createReadStream(file).pipe(res);
        return true;
      }
    }
    throw new HttpError(who.kind === "device" ? 403 : 404, "no such upload route");
  }

  /**
   * A chunked artifact's content (DESIGN.md §11): cut again here and checked against the signed
   * manifest (the same cuts, the same hashes), each chunk stored gzipped under its sha256 — once,
   * however many releases share it. Returns what is wrong, if anything.
   */
  private async storeChunks(file: string, m: Manifest): Promise<string | undefined> {
    await mkdir(this.chunks, { recursive: true });
    let i = 0;
    let wrong: string | undefined;
    let list: Awaited<ReturnType<typeof chunkStream>>;
    try {
      list = await chunkStream(createReadStream(file).pipe(createGunzip()), async (chunk, sha) => {
        const want = m.chunks[i++];
        if (wrong || !want || hexOf(want.sha256) !== sha || want.size !== chunk.length) {
          wrong ??= `chunk ${i} of the content does not match the signed manifest`;
          return;
        }
        const target = join(this.chunks, sha);
        if (await stat(target).catch(() => undefined)) return;
        const tmp = `${target}.${process.hrtime.bigint()}.tmp`;
        await writeFile(tmp, gzipSync(chunk));
        await rename(tmp, target);
      });
    } catch (err) {
      return `the artifact is not a readable .tar.gz: ${(err as Error).message}`;
    }
    if (wrong) return wrong;
    if (i !== m.chunks.length) return `the content has ${i} chunks, the signed manifest ${m.chunks.length}`;
    if (list.contentSha256 !== hexOf(m.contentSha256) || list.contentSize !== Number(m.contentSize))
      return "the uncompressed content does not match the signed manifest's sha256 and size";
    return undefined;
  }

  /** Which artifacts each chunk belongs to, built once from the records. */
  private async index(): Promise<ChunkIndex> {
    if (!this.chunkIndex) {
      const idx = new ChunkIndex();
      for await (const [key, rec] of this.records.iterator()) idx.add(key, manifestOf(rec));
      this.chunkIndex = idx;
    }
    return this.chunkIndex;
  }

  /** GET /v1/chunks/<sha256>: a gzipped chunk, if a job assigned to the device names an artifact holding it. */
  private async sendChunk(res: ServerResponse, who: Who, hex: string): Promise<true> {
    if (!/^[0-9a-f]{64}$/.test(hex)) throw new HttpError(400, "a chunk is named by its sha256 (hex)");
    const owners = (await this.index()).owners(hex);
    if (!owners.size) throw new HttpError(404, "no such chunk");
    if (who.kind === "device") {
      const ok = await this.jobWants(who.id, (names) => names.artifacts.some((a) => owners.has(a)));
      if (!ok) {
        this.opts.counters.inc("artifact_denied");
        throw new HttpError(
          403,
          `no job assigned to ${who.id} names an artifact with chunk ${hex.slice(0, 12)}…`,
        );
      }
    }
    const body = await readFile(join(this.chunks, hex));
    res.writeHead(200, { "content-type": "application/gzip", "content-length": String(body.length) });
    await this.throttle.send(body, res);
    res.end();
    this.opts.counters.inc("artifact_bytes_sent", body.length);
    this.opts.counters.inc("artifact_chunks_sent");
    return true;
  }

  /** GET with Range support (one range: `bytes=N-` or `bytes=N-M`). */
  private async sendBlob(req: IncomingMessage, res: ServerResponse, who: Who, sha: string): Promise<true> {
    await this.allowed(who, (r) => r.sha256 === sha);
    const file = join(this.blobs, sha);
    const size = (await stat(file)).size;
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? "");
    if (req.headers.range && !range) throw new HttpError(416, "only one simple byte range is supported");
    if (size === 0) {
      // Nothing to stream (a read stream cannot end before byte 0), whatever the range asked.
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": "0" });
      res.end();
      return true;
    }
    const start = range ? Number(range[1]) : 0;
    const end = range?.[2] ? Math.min(Number(range[2]), size - 1) : size - 1;
    if (start > end) {
      res.writeHead(416, { "content-range": `bytes */${size}` });
      res.end();
      return true;
    }
    res.writeHead(range ? 206 : 200, {
      "content-type": "application/octet-stream",
      "content-length": String(end - start + 1),
      "accept-ranges": "bytes",
      ...(range ? { "content-range": `bytes ${start}-${end}/${size}` } : {}),
    });
    for await (const piece of createReadStream(file, { start, end }))
      await this.throttle.send(piece as Buffer, res);
    res.end();
    this.opts.counters.inc("artifact_bytes_sent", end - start + 1);
    return true;
  }
}

const hexOf = (b: Uint8Array | null | undefined) => Buffer.from(b ?? []).toString("hex");

function manifestOf(rec: ArtifactRecord): Manifest {
  return pb.ArtifactManifest.decode(pb.SignedManifest.decode(Buffer.from(rec.signed, "base64")).manifest);
}

/** Chunk (hex sha256) → the artifacts (name@version) whose content holds it. */
class ChunkIndex {
  private readonly map = new Map<string, Set<string>>();

  add(key: string, m: Manifest): void {
    for (const c of m.chunks) {
      const hex = hexOf(c.sha256);
      const owners = this.map.get(hex) ?? new Set<string>();
      this.map.set(hex, owners);
      owners.add(key);
    }
  }

  /** Removes an artifact; returns the chunks no artifact holds any more. */
  remove(key: string, m: Manifest): string[] {
    const orphans: string[] = [];
    for (const c of m.chunks) {
      const hex = hexOf(c.sha256);
      const owners = this.map.get(hex);
      owners?.delete(key);
      if (owners && !owners.size) {
        this.map.delete(hex);
        orphans.push(hex);
      }
    }
    return orphans;
  }

  owners(hex: string): ReadonlySet<string> {
    return this.map.get(hex) ?? new Set();
  }
}

/** Streams a request body into `file`, hashing it, refusing more than `max` bytes (413). */
async function receive(
  req: IncomingMessage,
  file: string,
  max: number,
  tooBig: string,
): Promise<{ size: number; sha: string }> {
  const hash = createHash("sha256");
  let size = 0;
  try {
    await new Promise<void>((resolve, reject) => {
      const out = createWriteStream(file);
      req.on("data", (chunk: Buffer) => {
        size += chunk.length;
        if (size > max) {
          req.destroy();
          reject(new HttpError(413, tooBig));
          return;
        }
        hash.update(chunk);
        out.write(chunk);
      });
      req.on("end", () => out.end(() => resolve()));
      req.on("error", reject);
      out.on("error", reject);
    });
  } catch (err) {
    await rm(file, { force: true });
    throw err;
  }
  return { size, sha: hash.digest("hex") };
}
