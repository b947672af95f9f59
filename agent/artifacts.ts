// The agent's view of the server's artifact store: HTTP Basic with the device's token, or
// HTTPS with its fleet-CA client certificate (mTLS devices have no token).
import { createReadStream, readFileSync } from "node:fs";
import { stat } from "node:fs/promises";
import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import { TaskFailedError } from "../firmware-tasks/errors.js";
import type { ArtifactSource } from "../firmware-tasks/types.js";

export interface ArtifactAuth {
  deviceId: string;
  password?: string;
  caFile?: string;
  certFile?: string;
  keyFile?: string;
}

export function httpArtifactSource(baseUrl: string | undefined, auth: ArtifactAuth): ArtifactSource {
  const tls = {
    ...(auth.caFile ? { ca: readFileSync(auth.caFile) } : {}),
    ...(auth.certFile && auth.keyFile
      ? { cert: readFileSync(auth.certFile), key: readFileSync(auth.keyFile) }
      : {}),
  };
  const headers: Record<string, string> = auth.password
    ? { authorization: `Basic ${Buffer.from(`${auth.deviceId}:${auth.password}`).toString("base64")}` }
    : {};
  const get = (
    path: string,
    extra: Record<string, string>,
    signal: AbortSignal,
  ): Promise<IncomingMessage> => {
    if (!baseUrl)
      throw new TaskFailedError("this agent has no artifactsUrl in its config", {
        reason: "no_artifact_source",
      });
    const url = new URL(path, baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`);
    const req = url.protocol === "https:" ? httpsRequest : httpRequest;
    return new Promise((resolve, reject) => {
      const r = req(
        url,
        {
          method: "GET",
          headers: { ...headers, ...extra },
          signal,
          ...(url.protocol === "https:" ? tls : {}),
        },
        resolve,
      );
      r.on("error", (err) =>
        reject(
          signal.aborted
            ? signal.reason
            : new TaskFailedError(`${url.host}: ${err.message}`, { reason: "artifact_unavailable" }),
        ),
      );
      r.end();
    });
  };
  const fail = async (res: IncomingMessage, what: string) => {
    let body = "";
    for await (const c of res) body += c;
    return new TaskFailedError(`${what}: HTTP ${res.statusCode} ${body.slice(0, 200)}`.trim(), {
      reason: "artifact_unavailable",
    });
  };
  return {
    async upload(file, name, sha256, signal) {
      if (!baseUrl)
        throw new TaskFailedError("this agent has no artifactsUrl in its config", {
          reason: "no_artifact_source",
        });
      const url = new URL(
        `v1/uploads/${encodeURIComponent(name)}`,
        baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`,
      );
      const req = url.protocol === "https:" ? httpsRequest : httpRequest;
      const size = (await stat(file)).size;
      const res = await new Promise<IncomingMessage>((resolve, reject) => {
        const r = req(
          url,
          {
            method: "PUT",
            headers: { ...headers, "x-fleet-sha256": sha256, "content-length": String(size) },
            signal,
            ...(url.protocol === "https:" ? tls : {}),
          },
          resolve,
        );
        r.on("error", (err) =>
          reject(
            signal.aborted
              ? signal.reason
              : new TaskFailedError(`upload to ${url.host}: ${err.message}`, { reason: "upload_failed" }),
          ),
        );
        createReadStream(file).pipe(r);
      });
      if (res.statusCode !== 201) {
        const e = await fail(res, `upload of ${name}`);
        throw new TaskFailedError(e.message, { reason: "upload_failed" });
      }
      res.resume();
    },
    async manifest(name, version, signal) {
      const res = await get(
        `v1/artifacts/${encodeURIComponent(name)}/${encodeURIComponent(version)}/manifest`,
        {},
        signal,
      );
      if (res.statusCode !== 200) throw await fail(res, `manifest of ${name} ${version}`);
      const chunks: Buffer[] = [];
      for await (const c of res) chunks.push(c as Buffer);
      return Buffer.concat(chunks);
    },
    async blob(sha256, start, signal) {
      const res = await get(`v1/blobs/${sha256}`, start ? { range: `bytes=${start}-` } : {}, signal);
      if (res.statusCode !== 200 && res.statusCode !== 206)
        throw await fail(res, `download ${sha256.slice(0, 12)}…`);
      return { status: res.statusCode, body: res };
    },
  };
}
