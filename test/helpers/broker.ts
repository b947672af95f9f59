// A real aedes broker on an ephemeral loopback port (no auth: that is the server's job).
import { createServer, type Server } from "node:net";
import { Aedes, type AedesOptions } from "aedes";

export interface TestBroker {
  port: number;
  url: string;
  aedes: Aedes;
  /** CONNECT attempts seen (counted in preConnect), with their times. */
  connectAttempts: number[];
  close(): Promise<void>;
  /** Stops listening and drops every client; `start()` brings it back on the same port. */
  restart(downMs?: number): Promise<void>;
  stop(): Promise<void>;
  start(): Promise<void>;
}

/** `hooks`: aedes options over the defaults (e.g. an authorizeSubscribe that misbehaves). */
export async function startBroker(port = 0, hooks: Partial<AedesOptions> = {}): Promise<TestBroker> {
  const attempts: number[] = [];
  let aedes!: Aedes;
  let server!: Server;
  const sockets = new Set<import("node:net").Socket>();
  const boot = async (p: number) => {
    aedes = await Aedes.createBroker({
      preConnect: (_client, _packet, done) => {
        attempts.push(Date.now());
        done(null, true);
      },
      ...hooks,
    });
    server = createServer((sock) => {
      sockets.add(sock);
      sock.on("close", () => sockets.delete(sock));
      aedes.handle(sock);
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(p, "127.0.0.1", () => resolve());
    });
    const addr = server.address();
    return typeof addr === "object" && addr ? addr.port : p;
  };
  // Stop accepting first, then drop every socket: a client reconnecting during the shutdown
  // must not keep the server (and the test) waiting.
  const stop = async () => {
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    await new Promise<void>((resolve) => aedes.close(() => resolve()));
    for (const sock of sockets) sock.destroy();
    await closed;
  };
  const actualPort = await boot(port);
  const b: TestBroker = {
    port: actualPort,
    url: `mqtt://127.0.0.1:${actualPort}`,
    get aedes() {
      return aedes;
    },
    connectAttempts: attempts,
    close: stop,
    stop,
    start: async () => {
      await boot(actualPort);
    },
    restart: async (downMs = 0) => {
      await stop();
      if (downMs) await new Promise((r) => setTimeout(r, downMs));
      await boot(actualPort);
    },
  };
  return b;
}
