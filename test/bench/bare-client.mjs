// B3's baseline: a bare node process that only connects with MQTT.js (as a device would) and
// subscribes to its two topics, then stays idle. Prints "connected" at CONNACK.
import mqtt from "mqtt";

const [url, id, password, prefix] = process.argv.slice(2);
const c = mqtt.connect(url, { clientId: id, username: id, password, clean: false, protocolVersion: 4 });
c.on("connect", () => {
  process.stdout.write("connected\n"); // at CONNACK, as the agent logs "connected"
  c.subscribe([`${prefix}/d/${id}/job`, `${prefix}/d/${id}/ctl`], { qos: 1 });
});
process.on("SIGTERM", () => c.end(false, () => process.exit(0)));
