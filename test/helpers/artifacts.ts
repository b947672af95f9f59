// A small artifact server for update tests: serves signed manifests and blobs the way the fleet
// server does, with switches for misbehaviour (cut connections, extra bytes, trickling).

import { execFileSync } from "node:child_process";
import { createHash, type KeyObject, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { pb } from "../../proto/index.js";
import { signManifest } from "../../proto/signing.js";
import { operator } from "./keys.js";

export interface Release {
  name: string;
  version: string;
  bytes: Buffer;
  sha256: string;
  signed: Uint8Array;
}

/** A .tar.gz with VERSION and health.sh (exit code `healthExit`), plus `padding` bytes of filler. */
export function makeRelease(
  dir: string,
  name: string,
  version: string,
  o: {
    healthExit?: number;
    padding?: number;
    hardware?: string[];
    key?: KeyObject | string;
    /** Archive entries owned by this uid/gid, and a setuid+setgid file `suid` in it. */
    foreignOwner?: number;
  } = {},
): Release {
  const src = join(dir, `src-${name}-${version}`);
  mkdirSync(src, { recursive: true });
  writeFileSync(join(src, "VERSION"), `${version}\n`);
  writeFileSync(
    join(src, "health.sh"),
    `#!/bin/sh\necho "health of ${version}"\nexit ${o.healthExit ?? 0}\n`,
    { mode: 0o755 },
  );
  if (o.padding) writeFileSync(join(src, "padding.bin"), randomBytes(o.padding)); // incompressible
  const file = join(dir, `${name}-${version}.tar.gz`);
  if (o.foreignOwner !== undefined) writeFileSync(join(src, "suid"), "#!/bin/sh\n", { mode: 0o6755 });
  const owner =
    o.foreignOwner === undefined ? [] : [`--owner=${o.foreignOwner}`, `--group=${o.foreignOwner}`];
  execFileSync("tar", ["czf", file, ...owner, "-C", src, "."]);
  const bytes = readFileSync(file);
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  const signed = pb.SignedManifest.encode(
    signManifest(
      { name, version, size: bytes.length, sha256, hardware: o.hardware ?? [], createdAtMs: Date.now() },
      o.key ?? operator.privateKeyPem,
      operator.keyId,
    ),
  ).finish();
  return { name, version, bytes, sha256, signed };
}

export interface ArtifactServer {
  url: string;
  releases: Map<string, Release>;
  /** Bytes of blobs sent, per request. */
  sent: number[];
  /** Misbehaviour switches. */
  mode: { cutAfter?: number; extra?: number; trickleMs?: number; corrupt?: boolean };
  close(): Promise<void>;
}

export async function startArtifactServer(): Promise<ArtifactServer> {
  const s: ArtifactServer = { url: "", releases: new Map(), sent: [], mode: {}, close: async () => {} };
  const server: Server = createServer((req, res) => {
    const parts = (req.url ?? "").split("/").filter(Boolean);
    if (parts[1] === "artifacts" && parts[4] === "manifest") {
      const r = s.releases.get(`${parts[2]}@${parts[3]}`);
      if (!r) return void res.writeHead(404).end("{}");
      return void res.writeHead(200).end(Buffer.from(r.signed));
    }
    if (parts[1] === "blobs") {
      const r = [...s.releases.values()].find((x) => x.sha256 === parts[2]);
      if (!r) return void res.writeHead(404).end();
      let body = s.mode.corrupt ? Buffer.from(r.bytes.map((b, i) => (i === 100 ? b ^ 0xff : b))) : r.bytes;
      if (s.mode.extra) body = Buffer.concat([body, Buffer.alloc(s.mode.extra, 0x41)]);
      const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? "");
      const start = m ? Number(m[1]) : 0;
      const chunk = body.subarray(start);
      res.writeHead(m ? 206 : 200, { "content-length": String(chunk.length) });
      if (s.mode.cutAfter !== undefined) {
        const n = s.mode.cutAfter;
        s.mode.cutAfter = undefined; // only once
        s.sent.push(n);
        res.write(chunk.subarray(0, n), () => setTimeout(() => res.destroy(), 50));
        return;
      }
      if (s.mode.trickleMs) {
        let i = 0;
        const t = setInterval(() => {
          if (i >= chunk.length || res.destroyed) return clearInterval(t);
          res.write(chunk.subarray(i, i + 1));
          i++;
        }, s.mode.trickleMs);
        res.on("close", () => clearInterval(t));
        return;
      }
      s.sent.push(chunk.length);
      return void res.end(chunk);
    }
    if (parts[0] === "health") return void res.writeHead(parts[1] === "ok" ? 200 : 500).end(parts[1]);
    res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  s.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  s.close = () => new Promise((r) => server.close(() => r()));
  server.on("connection", (sock) => sock.unref());
  return s;
}

export function serve(s: ArtifactServer, r: Release): Release {
  s.releases.set(`${r.name}@${r.version}`, r);
  return r;
}
