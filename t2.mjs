import { Aedes } from "aedes";
import { Redis } from "ioredis";
import persistence from "aedes-persistence-redis";
import MQEmitterRedis from "mqemitter-redis";
import { createServer } from "node:net";
import mqtt from "mqtt";
const url = "redis://127.0.0.1:16379";
await new Redis(url).flushall();
async function node(id, port) {
  const p = persistence({ conn: new Redis(url) });
  for (const m of ["addSubscriptions", "removeSubscriptions"]) {
    const orig = p[m].bind(p); const inflight = new WeakMap();
    p[m] = (client, subs) => { let pr = inflight.get(subs); if (!pr) { pr = orig(client, subs); inflight.set(subs, pr); } return pr; };
  }
  const mq = MQEmitterRedis({ subConn: new Redis(url, { enableReadyCheck: false }), pubConn: new Redis(url) });
  const aedes = await Aedes.createBroker({ id, mq, persistence: p,
    preConnect: (c, pk, done) => done(null, true),
    authenticate: (c, u, pw, done) => Promise.resolve().then(() => done(null, true)),
    authorizePublish: (c, pk, done) => done(null),
    authorizeSubscribe: (c, sub, done) => done(null, sub) });
  createServer((c) => aedes.handle(c)).listen(port);
  return aedes;
}
await node("A", 22001);
const sub = await mqtt.connectAsync("mqtt://127.0.0.1:22001", { clientId: "ctl", clean: false });
let got = 0;
sub.on("message", (t, m) => { got++; console.log("got", t, m.toString()); });
await sub.subscribeAsync(["d/+/status", "d/+/sync", "d/+/state", "rpc/req"], { qos: 1 });
await sub.subscribeAsync("d/+/telemetry", { qos: 0 });
if (process.argv[2] === "two") { await new Promise((r) => setTimeout(r, 500)); await node("B", 22002); await new Promise((r) => setTimeout(r, 500)); }
const pub = await mqtt.connectAsync("mqtt://127.0.0.1:22001", { clientId: "dev", clean: false, will: { topic: "d/x/state", payload: "dead", qos: 1, retain: true } });
await pub.subscribeAsync(["d/x/job", "d/x/ctl"], { qos: 1 });
await pub.publishAsync("d/x/state", "hello", { qos: 1, retain: true });
await pub.publishAsync("d/x/state", "hello2", { qos: 1 });
await new Promise((r) => setTimeout(r, 1000));
console.log("received", got);
process.exit(0);
