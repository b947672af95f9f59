// The agent's view of the server's artifact store: HTTP Basic with the device's token, or
// HTTPS with its fleet-CA client certificate (mTLS devices have no token).
import { createReadStream, readFileSync } from "node:fs";
import { stat } from "node:fs/promises";
import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import { TaskFailedError } from "../firmware-tasks/errors.js";
import type { ArtifactSource } from "../firmware-tasks/types.js";
import type { TrackerPeer } from "./peers.js";

export interface ArtifactAuth {
  deviceId: string;
  password?: string;
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

export function httpArtifactSource(
  baseUrl: string | undefined,
  auth: ArtifactAuth,
): ArtifactSource & {
  centerChunk(sha256: string, signal: AbortSignal): Promise<Buffer>;
  peers(artifact: string, signal: AbortSignal): Promise<TrackerPeer[]>;
} {
  const tls = {
    ...(auth.caFile ? { ca: readFileSync(auth.caFile) } : {}),
    ...(auth.certFile && auth.keyFile
      ? { cert: readFileSync(auth.certFile), key: readFileSync(auth.keyFile) }
      : {}),
  };
  const basic: Record<string, string> = auth.password
    ? { authorization: `Basic ${Buffer.from(`${auth.deviceId}:${auth.password}`).toString("base64")}` }
    : {};

  /** One request; `body` (a file) is streamed up. Resolves with the response, whatever its status. */
  const send = (
    method: string,
    path: string,
    headers: Record<string, string>,
    signal: AbortSignal,
    body?: string,
  ) => {
    if (!baseUrl)
      throw new TaskFailedError("this agent has no artifactsUrl in its config", {
        reason: "no_artifact_source",
      });
    const url = new URL(path, baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`);
    const request = url.protocol === "https:" ? httpsRequest : httpRequest;
    return new Promise<IncomingMessage>((resolve, reject) => {
      const opts = {
        method,
        headers: { ...basic, ...headers },
        signal,
        ...(url.protocol === "https:" ? tls : {}),
      };
      const r = request(url, opts, resolve);
      r.on("error", (err) =>
        reject(
          signal.aborted
            ? signal.reason
            : new TaskFailedError(`${url.host}: ${err.message}`, { reason: "artifact_unavailable" }),
        ),
      );
      if (body) createReadStream(body).pipe(r);
      else r.end();
    });
  };

  /** Fails unless the status is one of `ok`, with the server's message. */
  const expect = async (res: IncomingMessage, ok: number[], what: string, reason: string) => {
    if (ok.includes(res.statusCode ?? 0)) return res;
    let text = "";
    for await (const c of res) text += c;
    throw new TaskFailedError(`${what}: HTTP ${res.statusCode} ${text.slice(0, 200)}`.trim(), { reason });
  };

  return {
    async manifest(name, version, signal) {
      const path = `v1/artifacts/${encodeURIComponent(name)}/${encodeURIComponent(version)}/manifest`;
      const res = await expect(
        await send("GET", path, {}, signal),
        [200],
        `manifest of ${name} ${version}`,
        "artifact_unavailable",
      );
      const chunks: Buffer[] = [];
      for await (const c of res) chunks.push(c as Buffer);
      return Buffer.concat(chunks);
    },
    async blob(sha256, start, signal) {
      const res = await send("GET", `v1/blobs/${sha256}`, start ? { range: `bytes=${start}-` } : {}, signal);
      await expect(res, [200, 206], `download ${sha256.slice(0, 12)}…`, "artifact_unavailable");
      return { status: res.statusCode!, body: res };
    },
    async peers(artifact: string, signal: AbortSignal) {
      const res = await send("GET", `v1/peers?artifact=${encodeURIComponent(artifact)}`, {}, signal);
      await expect(res, [200], "tracker", "artifact_unavailable");
      let text = "";
      for await (const c of res) text += c;
      return (JSON.parse(text) as { peers: TrackerPeer[] }).peers;
    },
    async centerChunk(sha256: string, signal: AbortSignal) {
      const res = await send("GET", `v1/chunks/${sha256}`, {}, signal);
      await expect(res, [200], `chunk ${sha256.slice(0, 12)}…`, "artifact_unavailable");
      const parts: Buffer[] = [];
      let size = 0;
      for await (const c of res) {
        size += (c as Buffer).length;
        // A chunk is at most 256 KiB uncompressed; its gzip a little more at worst.
        if (size > 512 * 1024)
          throw new TaskFailedError(`chunk ${sha256.slice(0, 12)}…: the server sent too much`, {
            reason: "oversized_download",
          });
        parts.push(c as Buffer);
      }
      return Buffer.concat(parts);
    },
    async upload(file, name, sha256, signal) {
      const size = (await stat(file)).size;
      const headers = { "x-fleet-sha256": sha256, "content-length": String(size) };
      const res = await send("PUT", `v1/uploads/${encodeURIComponent(name)}`, headers, signal, file);
      (await expect(res, [201], `upload of ${name}`, "upload_failed")).resume();
    },
  };
}
