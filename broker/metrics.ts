// Prometheus metrics of the fleet server (`/metrics`): process defaults, connected clients,
// registered devices, and every named server counter.
import { Counter, collectDefaultMetrics, Gauge, Registry as Metrics } from "prom-client";
import type { Counters } from "../common/counters.js";

export function serverMetrics(o: {
  counters: Counters;
  clients(): number;
  devices(): number;
  /** Each gateway's counters as it last reported them. */
  gateways(): Array<{ id: string; counters: Record<string, number> }>;
  /** The controller's LevelDB writes: callers' writes, batches, fsyncs, operations. */
  leveldb(): Record<string, number>;
}): Metrics {
  const metrics = new Metrics();
  collectDefaultMetrics({ register: metrics });
  new Gauge({
    name: "fleet_connected_clients",
    help: "MQTT clients connected to the embedded broker",
    registers: [metrics],
    collect() {
      this.set(o.clients());
    },
  });
  new Gauge({
    name: "fleet_registered_devices",
    help: "Devices in the registry",
    registers: [metrics],
    collect() {
      this.set(o.devices());
    },
  });
  new Counter({
    name: "fleet_events_total",
    help: "Server counters by name: auth failures, ACL denials, dropped payloads, ...",
    labelNames: ["name"],
    registers: [metrics],
    collect() {
      this.reset();
      for (const [name, v] of Object.entries(o.counters.toObject())) this.inc({ name }, v);
    },
  });
  new Counter({
    name: "fleet_leveldb_total",
    help: "The controller's LevelDB: writes asked for (and synced ones), batches written, fsyncs, operations",
    labelNames: ["what"],
    registers: [metrics],
    collect() {
      this.reset();
      for (const [what, v] of Object.entries(o.leveldb())) this.inc({ what }, v);
    },
  });
  new Counter({
    name: "fleet_artifact_bytes_sent_total",
    help: "Artifact bytes the center served to devices (whole blobs and chunks)",
    registers: [metrics],
    collect() {
      this.reset();
      this.inc(o.counters.get("artifact_bytes_sent"));
    },
  });
  new Counter({
    name: "fleet_artifact_bytes_by_source_total",
    help: "Update bytes devices reported, by where they came from (local cache, peers, gateway, center)",
    labelNames: ["source"],
    registers: [metrics],
    collect() {
      this.reset();
      for (const source of ["local", "peers", "gateway", "center"])
        this.inc({ source }, o.counters.get(`artifact_bytes_from_${source}`));
    },
  });
  new Gauge({
    name: "fleet_gateway_reported",
    help: "Site gateways' own counters as last reported (relayed messages, fan-outs, refusals, ...)",
    labelNames: ["gateway", "name"],
    registers: [metrics],
    collect() {
      this.reset();
      for (const g of o.gateways())
        for (const [name, v] of Object.entries(g.counters)) this.set({ gateway: g.id, name }, v);
    },
  });
  return metrics;
}
