// Findings of the security audit (issue 16), each against a real server: what an attacker or a
// careless operator can send must end in a clear refusal, never in a dead or stalled server.
import { request } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { cli, type ServerProcess, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-hard-");
let server: ServerProcess;
let env: Record<string, string>;

beforeAll(async () => {
  expect((await cli(["init", "--dir", data.dir])).code).toBe(0);
  server = await startServer(data.dir);
  env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
}, 60_000);

afterAll(() => {
  server?.proc.kill("SIGKILL");
  data.cleanup();
});

/** A raw HTTP request: the path goes on the wire exactly as given (no URL normalisation). */
function raw(path: string, method = "GET"): Promise<{ status: number; body: string }> {
  const { hostname, port } = new URL(server.urls.http);
  return new Promise((resolve, reject) => {
    const req = request({ host: hostname, port, path, method }, (res) => {
      let body = "";
      res.on("data", (d: Buffer) => {
        body += d.toString();
      });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

describe("C1: malformed HTTP requests", () => {
  it.each([
    "/v1/%",
    "//",
    "/v1/artifacts/%E0%A4%A/1.0/manifest",
    "/v1/blobs/%zz",
    "/v1/uploads/%/x",
    "///v1",
  ])("GET %s is refused (400 or 404) and the server lives", async (path) => {
    const r = await raw(path);
    expect([400, 404]).toContain(r.status);
    if (r.status === 400) expect(JSON.parse(r.body).error).toMatch(/malformed/);
    expect((await raw("/healthz")).status).toBe(200);
  });

  it("the operator API still answers afterwards", async () => {
    expect((await cli(["device", "ls", "--json"], env)).code).toBe(0);
  });
});
