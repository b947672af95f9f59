// The agent's view of the server's artifact store (HTTP Basic with the device's token).

import { TaskFailedError } from "../firmware-tasks/errors.js";
import type { ArtifactSource } from "../firmware-tasks/types.js";

export function httpArtifactSource(
  baseUrl: string | undefined,
  deviceId: string,
  password: string | undefined,
): ArtifactSource {
  const auth = `Basic ${Buffer.from(`${deviceId}:${password ?? ""}`).toString("base64")}`;
  const url = (p: string) => {
    if (!baseUrl)
      throw new TaskFailedError("this agent has no artifactsUrl in its config", {
        reason: "no_artifact_source",
      });
    return new URL(p, baseUrl.endsWith("/") ? baseUrl : `${baseUrl}/`).toString();
  };
  return {
    async manifest(name, version, signal) {
      const res = await fetch(
        url(`v1/artifacts/${encodeURIComponent(name)}/${encodeURIComponent(version)}/manifest`),
        { headers: { authorization: auth }, signal },
      );
      if (!res.ok)
        throw new TaskFailedError(
          `manifest of ${name} ${version}: HTTP ${res.status} ${await res.text().catch(() => "")}`.trim(),
          { reason: "artifact_unavailable" },
        );
      return new Uint8Array(await res.arrayBuffer());
    },
    async blob(sha256, start, signal) {
      const res = await fetch(url(`v1/blobs/${sha256}`), {
        headers: { authorization: auth, ...(start ? { range: `bytes=${start}-` } : {}) },
        signal,
      });
      if (!res.ok || !res.body)
        throw new TaskFailedError(`download ${sha256.slice(0, 12)}…: HTTP ${res.status}`, {
          reason: "artifact_unavailable",
        });
      return { status: res.status, body: res.body as unknown as AsyncIterable<Uint8Array> };
    },
  };
}
