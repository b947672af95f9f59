// Findings of the security audit (issue 16), each against a real server: what an attacker or a
// careless operator can send must end in a clear refusal, never in a dead or stalled server.
import { readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { request } from "node:http";
import { connect, type Socket } from "node:net";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import mqtt from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { decodeEnvelope, encodeEnvelope } from "../../proto/envelope.js";
import { signRpcCall } from "../../proto/rpc.js";
import {
  addOperator,
  cli,
  editServerConfig,
  flashMoved,
  type ServerProcess,
  setContextServer,
  startAgent,
  startFleet,
  startServer,
  stopAll,
  waitOnline,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-hard-");
let server: ServerProcess;
let env: Record<string, string>;

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir, {
    config: (cfg) => {
      cfg.limits.connectTimeoutMs = 1500;
    },
  }));
}, 60_000);

afterAll(() => stopAll(server, data.cleanup));

/** A raw HTTP request: the path goes on the wire exactly as given (no URL normalisation). */
function raw(
  path: string,
  method = "GET",
  o: { auth?: string; from?: string } = {},
): Promise<{ status: number; body: string }> {
  const { hostname, port } = new URL(server.urls.http);
  return new Promise((resolve, reject) => {
    const headers = o.auth ? { authorization: `Basic ${Buffer.from(o.auth).toString("base64")}` } : undefined;
    const req = request({ host: hostname, port, path, method, headers, localAddress: o.from }, (res) => {
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

function mqttSocket(): Promise<Socket> {
  const { hostname, port } = new URL(server.urls.mqtt);
  return new Promise((resolve, reject) => {
    const s = connect(Number(port), hostname, () => resolve(s));
    s.on("error", reject);
  });
}

/** Writes `total` bytes in 64 KiB chunks until the server closes; returns what was written. */
async function pushUntilClosed(s: Socket, total: number): Promise<number> {
  const closed = new Promise<void>((resolve) => s.on("close", () => resolve()));
  s.on("error", () => {});
  let written = 0;
  const chunk = Buffer.alloc(64 * 1024);
  let open = true;
  void closed.then(() => {
    open = false;
  });
  while (open && written < total) {
    if (!s.write(chunk)) await Promise.race([new Promise((r) => s.once("drain", r)), closed]);
    written += chunk.length;
    await new Promise((r) => setImmediate(r));
  }
  await closed;
  return written;
}

async function counter(name: string): Promise<number> {
  const text = await (await fetch(`${server.urls.http}/metrics`)).text();
  const m = new RegExp(`fleet_events_total\\{name="${name}"\\} (\\d+)`).exec(text);
  return m ? Number(m[1]) : 0;
}

/** MQTT remaining length as a variable byte integer. */
function varint(n: number): Buffer {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 128;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

describe("H1: packet size and idle sockets before authentication", () => {
  it("a 200 MiB packet announced before CONNECT closes the connection at its header", async () => {
    const before = await counter("packet_too_large");
    const s = await mqttSocket();
    s.write(Buffer.concat([Buffer.from([0x30]), varint(200 * 1024 * 1024)]));
    const written = await pushUntilClosed(s, 200 * 1024 * 1024);
    expect(written).toBeLessThan(32 * 1024 * 1024);
    expect(await counter("packet_too_large")).toBe(before + 1);
  });

  it("a socket that never sends CONNECT is closed after the connect timeout", async () => {
    const s = await mqttSocket();
    const t0 = Date.now();
    await new Promise<void>((resolve) => s.on("close", () => resolve()));
    const ms = Date.now() - t0;
    expect(ms).toBeGreaterThanOrEqual(1000);
    expect(ms).toBeLessThan(8000); // limits.connectTimeoutMs is 1.5 s here; aedes alone waits 30 s
  });

  it("a client that would never send a keepalive (0) is refused; idle sockets cannot live for ever", async () => {
    const dev = JSON.parse((await cli(["device", "add", "idle-1", "--json"], env)).stdout) as {
      password: string;
    };
    const opts = { clientId: "idle-1", username: "idle-1", password: dev.password, reconnectPeriod: 0 };
    await expect(mqtt.connectAsync(server.urls.mqtt, { ...opts, keepalive: 0 })).rejects.toThrow();
    const ok = await mqtt.connectAsync(server.urls.mqtt, { ...opts, keepalive: 30 });
    await ok.endAsync();
  });

  it("an authenticated device announcing a packet over the limit is cut off at its header", async () => {
    const dev = JSON.parse((await cli(["device", "add", "big-talker", "--json"], env)).stdout) as {
      password: string;
    };
    const client = await mqtt.connectAsync(server.urls.mqtt, {
      clientId: "big-talker",
      username: "big-talker",
      password: dev.password,
      reconnectPeriod: 0,
    });
    const before = await counter("packet_too_large");
    const s = (client as unknown as { stream: Socket }).stream;
    const topic = Buffer.from("fleet/v1/d/big-talker/status");
    s.write(
      Buffer.concat([Buffer.from([0x30]), varint(64 * 1024 * 1024), Buffer.from([0, topic.length]), topic]),
    );
    const written = await pushUntilClosed(s, 64 * 1024 * 1024);
    expect(written).toBeLessThan(32 * 1024 * 1024);
    expect(await counter("packet_too_large")).toBe(before + 1);
    client.end(true);
  });
});

describe("Low: two copies of one signed request arriving together", () => {
  it("run once: the second is answered as a replay", async () => {
    const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
    const clientId = `op-${ctx.username}-twice`;
    const op = await mqtt.connectAsync(server.urls.mqtt, {
      clientId,
      username: ctx.username,
      password: ctx.password,
      reconnectPeriod: 0,
    });
    try {
      await op.subscribeAsync(`fleet/v1/rpc/res/${ctx.username}/${clientId}`, { qos: 1 });
      const replies: Array<{ ok: boolean; error: string }> = [];
      const two = new Promise<void>((resolve) =>
        op.on("message", (_t, payload) => {
          const r = decodeEnvelope(payload).rpcResponse!;
          replies.push({ ok: Boolean(r.ok), error: r.error ?? "" });
          if (replies.length === 2) resolve();
        }),
      );
      const req = encodeEnvelope({
        rpcRequest: signRpcCall(
          {
            requestId: "twice",
            clientId,
            method: "device.addMany",
            params: { devices: [{ id: "twice-1" }] },
          },
          readFileSync(ctx.signingKey, "utf8"),
          ctx.keyId,
        ),
      });
      op.publish("fleet/v1/rpc/req", Buffer.from(req), { qos: 1 });
      op.publish("fleet/v1/rpc/req", Buffer.from(req), { qos: 1 });
      await two;
      expect(replies.map((r) => r.ok).sort()).toEqual([false, true]);
      expect(replies.find((r) => !r.ok)!.error).toBe("replayed request");
    } finally {
      await op.endAsync();
    }
  });
});

describe("M11: Last Will topics", () => {
  it("a device whose will names another device's topic is refused at connect", async () => {
    const dev = JSON.parse((await cli(["device", "add", "will-1", "--json"], env)).stdout) as {
      password: string;
    };
    const connect = (topic: string, retain = true) =>
      mqtt.connectAsync(server.urls.mqtt, {
        clientId: "will-1",
        username: "will-1",
        password: dev.password,
        reconnectPeriod: 0,
        will: { topic, payload: Buffer.from(""), qos: 1, retain },
      });
    await expect(connect("fleet/v1/d/other-device/state")).rejects.toThrow(/not authorized/i);
    await expect(connect("fleet/v1/d/will-1/telemetry", true)).rejects.toThrow(/not authorized/i);
    const ok = await connect("fleet/v1/d/will-1/state");
    await ok.endAsync();
    expect(await counter("acl_will_denied")).toBe(2);
  });
});

describe("M13: secrets do not cross a network in clear by default", () => {
  it("flash refuses a plain broker URL beyond loopback (unless --insecure)", async () => {
    const r = await cli(
      ["flash", "clear-1", "--root", join(data.dir, "..", "clear-root"), "--broker", "mqtt://10.1.2.3:1883"],
      env,
    );
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/in clear; use mqtts/);
  });

  it("the plain listeners bind loopback only; the TLS ones bind --host", async () => {
    const lan = Object.values(networkInterfaces())
      .flat()
      .find((i) => i && i.family === "IPv4" && !i.internal)?.address;
    if (!lan) return; // no network interface besides loopback here
    const other = tempDir("fleet-m13-");
    try {
      expect((await cli(["init", "--dir", other.dir])).code).toBe(0);
      const srv = await startServer(other.dir, [0, 0, 0, 0, 0], ["--host", "0.0.0.0"]);
      try {
        const reach = (port: number, host: string) =>
          new Promise<boolean>((resolve) => {
            const sock = connect(port, host, () => {
              sock.destroy();
              resolve(true);
            });
            sock.on("error", () => resolve(false));
          });
        const [mqttPort, mqttsPort, wsPort, httpPort, httpsPort] = srv.ports as [
          number,
          number,
          number,
          number,
          number,
        ];
        expect(await reach(mqttPort, "127.0.0.1")).toBe(true);
        expect(await reach(mqttPort, lan)).toBe(false);
        expect(await reach(wsPort, lan)).toBe(false);
        expect(await reach(httpPort, lan)).toBe(false);
        expect(await reach(mqttsPort, lan)).toBe(true);
        expect(await reach(httpsPort, lan)).toBe(true);
      } finally {
        srv.proc.kill("SIGKILL");
      }
    } finally {
      other.cleanup();
    }
  });
});

describe("H2: a flood of wrong operator passwords", () => {
  it("is refused without running scrypt for each, and the operator still gets in", async () => {
    // The attacker from 127.0.0.2, the operator from 127.0.0.1 (both loopback).
    const flood = Promise.all(
      Array.from({ length: 300 }, () =>
        raw("/v1/artifacts", "GET", { auth: "admin:wrong", from: "127.0.0.2" }),
      ),
    );
    const ls = await cli(["device", "ls", "--json"], env);
    expect(ls.code, ls.stderr).toBe(0);
    const statuses = (await flood).map((r) => r.status);
    const checked = statuses.filter((s) => s === 401).length;
    expect(checked).toBeLessThanOrEqual(12); // 10 failures per address, 2 in flight
    expect(statuses.filter((s) => s === 429 || s === 503).length).toBe(300 - checked);
    expect((await counter("operator_login_throttled")) + (await counter("operator_login_busy"))).toBe(
      300 - checked,
    );
    // The operator's own HTTP login still works from its address.
    const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8")) as { password: string };
    expect(
      (await raw("/v1/artifacts", "GET", { auth: `admin:${ctx.password}`, from: "127.0.0.1" })).status,
    ).toBe(200);
  });
});

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name));
}

describe("H4: trust comes from the operator, not from the server", () => {
  it("fleet init keeps the signing key out of the server's data directory", () => {
    const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8")) as { signingKey: string };
    expect(ctx.signingKey.startsWith(data.dir)).toBe(false);
    expect(statSync(ctx.signingKey).mode & 0o777).toBe(0o600);
    const key = readFileSync(ctx.signingKey, "utf8").trim();
    for (const f of filesUnder(data.dir)) expect(readFileSync(f, "utf8").includes(key), f).toBe(false);
  });

  it("a key added on the server is not trusted by a newly flashed device; a server with another CA is refused", async () => {
    await addOperator(data.dir, "mallory", "x");
    server.proc.kill("SIGTERM");
    await server.exited;
    server = await startServer(data.dir);
    env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
    const root = join(data.dir, "..", `${data.dir.split("/").pop()}-root`);
    const r = await cli(["flash", "trust-1", "--root", root], env);
    expect(r.code, r.stderr).toBe(0);
    const config = JSON.parse(readFileSync(join(root, "etc", "fleet-agent", "config.json"), "utf8"));
    const ctx = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8")) as { keyId: string };
    expect(config.trustedKeys.map((k: { keyId: string }) => k.keyId)).toEqual([ctx.keyId]);
    // Another fleet's server (its own CA) answering at the context's address: refused.
    const other = tempDir("fleet-hard-other-");
    expect((await cli(["init", "--dir", other.dir])).code).toBe(0);
    // A rogue server that knows our public key (public, after all) and so answers our requests.
    const mine0 = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
    const ours = JSON.parse(readFileSync(join(data.dir, "server.json"), "utf8")).operators[0];
    editServerConfig(other.dir, (c) => {
      c.operators[0].keyId = mine0.keyId;
      c.operators[0].publicKey = ours.publicKey;
    });
    const otherServer = await startServer(other.dir);
    try {
      const ctxOther = JSON.parse(readFileSync(join(other.dir, "operator.json"), "utf8"));
      const mine = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
      // Our context, but the other server's credentials (as if it had learnt them).
      const mixed = join(data.dir, "mixed.json");
      writeFileSync(
        mixed,
        JSON.stringify({
          ...ctxOther,
          keyId: mine.keyId,
          signingKey: mine.signingKey,
          caCert: join(data.dir, "tls", "ca.pem"),
        }),
        { mode: 0o600 },
      );
      const f = await cli([
        "flash",
        "trust-2",
        "--root",
        `${root}-2`,
        "--context",
        mixed,
        "--server",
        otherServer.urls.mqtt,
      ]);
      expect(f.code).toBe(3);
      expect(f.stderr).toMatch(/another fleet CA/);
    } finally {
      otherServer.proc.kill("SIGKILL");
      other.cleanup();
    }
  }, 60_000);
});

describe("H6: a re-flashed device", () => {
  it("starts a new epoch: its statuses are applied, not dropped as duplicates of the old database's", async () => {
    const runOnce = async () => {
      const { root, cleanup } = await flashMoved("reflash-1", env);
      const agent = startAgent(root);
      try {
        await waitOnline(env, "reflash-1");
        // Several statuses, so the old database's seq is well ahead of a new one's.
        const r = await cli(["run", "noop", "--device", "reflash-1", "--wait", "--json"], env);
        expect(r.code, r.stderr).toBe(0);
      } finally {
        agent.proc.kill("SIGTERM");
        await agent.exited;
        cleanup();
      }
    };
    await runOnce();
    await runOnce(); // a new root: a new database, seq from 1 again
    expect(await counter("device_epoch_changed")).toBe(1);
  }, 90_000);
});
