import mqtt, { type MqttClient } from "mqtt";
import { it } from "vitest";
import { encodeEnvelope } from "../../proto/envelope.js";
import { type External, startMosquitto } from "../helpers/external.js";
import { cli, cliJson, setContextServer, startServer } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { bareAedes } from "./bare.js";
import { report } from "./report.js";

const CLIENTS = 10;
const PER_CLIENT = Number(process.env.BENCH_MESSAGES ?? 2000);

async function run(
  url: string,
  who: (i: number) => { clientId: string; username?: string; password?: string; topic: string },
): Promise<number> {
  const clients: MqttClient[] = [];
  for (let i = 0; i < CLIENTS; i++) {
    const w = who(i);
    clients.push(
      await mqtt.connectAsync(url, {
        clientId: w.clientId,
        username: w.username,
        password: w.password,
        reconnectPeriod: 0,
      }),
    );
  }
  const payload = Buffer.from(encodeEnvelope({ telemetry: { cpuLoad: 0.1, memTotal: 1, atMs: 1 } }));
  const t = performance.now();
  await Promise.all(
    clients.map(async (c, i) => {
      const topic = who(i).topic;
      for (let k = 0; k < PER_CLIENT; k += 100) {
        await Promise.all(Array.from({ length: 100 }, () => c.publishAsync(topic, payload, { qos: 1 })));
      }
    }),
  );
  const ms = performance.now() - t;
  await Promise.all(clients.map((c) => c.endAsync(true)));
  return ((CLIENTS * PER_CLIENT) / ms) * 1000;
}

it(`B4: ${CLIENTS} clients x ${PER_CLIENT} QoS 1 publishes`, async () => {
  // The bare aedes runs in its own process, like the fleet server and Mosquitto.
  const bare = await bareAedes();
  const bareRate = await run(bare.url, (i) => ({
    clientId: `b${i}`,
    topic: `bench/${i}/telemetry`,
  }));
  bare.stop();

  let mosqRate: number | undefined;
  let mosq: External | undefined;
  const mdir = tempDir("fleet-b4-mosq-");
  try {
    mosq = await startMosquitto(mdir.dir, ["allow_anonymous true"]);
    mosqRate = await run(mosq.url, (i) => ({ clientId: `m${i}`, topic: `bench/${i}/telemetry` }));
  } catch (err) {
    console.warn(`Mosquitto left out: ${(err as Error).message}`); // not installed: no row
  } finally {
    mosq?.stop();
    mdir.cleanup();
  }

  const data = tempDir("fleet-b4-");
  await cli(["init", "--dir", data.dir]);
  const server = await startServer(data.dir);
  try {
    const env = { FLEET_CONTEXT: setContextServer(data.dir, server.urls.mqtt) };
    const secrets: string[] = [];
    for (let i = 0; i < CLIENTS; i++)
      secrets.push(
        cliJson<{ password: string }>(await cli(["device", "add", `b4-${i}`, "--json"], env)).password,
      );
    const fleetRate = await run(server.urls.mqtt, (i) => ({
      clientId: `b4-${i}`,
      username: `b4-${i}`,
      password: secrets[i],
      topic: `fleet/v1/d/b4-${i}/telemetry`,
    }));
    report("B4-broker-overhead", [
      {
        name: "fleet server (auth, ACL, controller decoding)",
        value: fleetRate,
        unit: "msg/s",
        baseline: bareRate,
        ratio: fleetRate / bareRate,
        goal: ">= 0.85 of bare aedes",
      },
      ...(mosqRate
        ? [
            {
              name: "Mosquitto (Debian), no auth",
              value: mosqRate,
              unit: "msg/s",
              baseline: bareRate,
              ratio: mosqRate / bareRate,
              goal: "(reference)",
            },
          ]
        : []),
    ]);
  } finally {
    server.proc.kill("SIGTERM");
    await server.exited;
    data.cleanup();
  }
});
