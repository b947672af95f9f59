// `fleet watch`: a live view of devices and task events (on a TTY), or NDJSON events (--json).
import type { Command } from "commander";
import type { RolloutJson } from "../proto/api.js";
import { decodeEnvelope } from "../proto/envelope.js";
import { stateName } from "../proto/index.js";
import { type LabelRequirement, matchesSelector, parseSelector, SelectorError } from "../proto/selector.js";
import { eventsTopic, parseDeviceTopic } from "../proto/topics.js";
import { loadContext, type OperatorOptions, operatorOptions } from "./context.js";
import { CliError } from "./exit.js";
import { printable, table } from "./format.js";
import { renderRollout } from "./rollout.js";
import { RpcClient } from "./rpc.js";

const REDRAW_MS = 250;
const RECENT = 12;

interface DeviceView {
  id: string;
  online: boolean;
  labels: Record<string, string>;
  agentVersion: string;
  queueDepth: number;
  running: number;
  /** A site gateway's figures, from the counters in its DeviceState (DESIGN.md §11). */
  gateway?: GatewayFigures;
}

interface GatewayFigures {
  devices: number;
  connected: number;
  queuedBytes: number;
  queuedMessages: number;
  uplink: boolean;
}

function gatewayFigures(counters: Record<string, number> | null | undefined): GatewayFigures | undefined {
  if (!counters || counters.gateway_devices === undefined) return undefined;
  return {
    devices: counters.gateway_devices ?? 0,
    connected: counters.gateway_connected_clients ?? 0,
    queuedBytes: counters.gateway_queue_bytes ?? 0,
    queuedMessages: counters.gateway_queue_messages ?? 0,
    uplink: counters.gateway_uplink_ready === 1,
  };
}

const describeGateway = (id: string, g: GatewayFigures, online: boolean) =>
  `gateway ${id}: ${g.devices} devices, ${g.connected} connected, queued ${g.queuedMessages} msgs / ${g.queuedBytes} B, uplink ${online && g.uplink ? "up" : "down"}`;

export function registerWatch(program: Command): void {
  operatorOptions(program.command("watch"))
    .description("watch devices and job events live (NDJSON with --json)")
    .option("--selector <s>", "only devices whose labels match")
    .option("--rollout <id>", "only this rollout and its devices' events")
    .action(async (o: OperatorOptions & { selector?: string; rollout?: string }) => {
      let sel: LabelRequirement[] | undefined;
      try {
        sel = o.selector ? parseSelector(o.selector) : undefined;
      } catch (err) {
        if (err instanceof SelectorError) throw new CliError(err.message);
        throw err;
      }
      const ctx = loadContext(o);
      const rpc = await RpcClient.open(ctx);
      const client = rpc.client;
      // Rollouts shown (and their job ids, to filter and to know what to refresh).
      const rollouts = new Map<string, RolloutJson>();
      const rolloutOfJob = new Map<string, string>();
      const stale = new Set<string>();
      const track = (r: RolloutJson) => {
        rollouts.set(r.id, r);
        rolloutOfJob.set(r.jobId, r.id);
      };
      if (o.rollout) track(await rpc.call("rollout.show", { id: o.rollout }));
      else for await (const r of rpc.pages("rollout.ls", { active: true })) track(r);
      const devices = new Map<string, DeviceView>();
      const recent: string[] = [];
      const tty = process.stdout.isTTY && !o.json;
      let dirty = true;
      const visible = (id?: string | null) =>
        !sel || (id ? Boolean(devices.get(id) && matchesSelector(sel, devices.get(id)!.labels)) : false);
      const emit = (e: Record<string, unknown>) => {
        if (o.json) process.stdout.write(`${JSON.stringify(e)}\n`);
        else {
          const line = printable(
            `${String(e.at).slice(11, 23)} ${e.kind} ${e.deviceId ?? ""} ${e.jobId ?? ""}${e.taskId ? `/${e.taskId}` : ""} ${e.state ?? ""} ${e.message ?? ""}`
              .replace(/\s+/g, " ")
              .trim(),
          );
          if (tty) {
            recent.push(line);
            if (recent.length > RECENT) recent.shift();
          } else process.stdout.write(`${line}\n`);
        }
        dirty = true;
      };
      client.on("message", (topic, payload) => {
        let env: ReturnType<typeof decodeEnvelope>;
        try {
          env = decodeEnvelope(payload);
        } catch {
          return;
        }
        if (env.deviceState) {
          const t = parseDeviceTopic(ctx.prefix, topic);
          if (!t) return;
          const s = env.deviceState;
          const before = devices.get(t.deviceId);
          const gateway = s.online ? gatewayFigures(s.counters) : before?.gateway;
          // A gateway's uplink going down or up, and its queue, are events of their own.
          if (
            gateway &&
            visible(t.deviceId) &&
            (before?.gateway?.uplink !== gateway.uplink ||
              before?.gateway?.queuedMessages !== gateway.queuedMessages)
          )
            emit({
              kind: "gateway.state",
              at: new Date().toISOString(),
              deviceId: t.deviceId,
              message: describeGateway(t.deviceId, gateway, Boolean(s.online)),
              gateway,
            });
          devices.set(t.deviceId, {
            gateway,
            id: t.deviceId,
            online: Boolean(s.online),
            labels: s.online ? ((s.labels as Record<string, string>) ?? {}) : (before?.labels ?? {}),
            agentVersion: s.agentVersion || before?.agentVersion || "",
            queueDepth: s.queueDepth ?? 0,
            running: s.running ?? 0,
          });
          if (visible(t.deviceId) && before?.online !== Boolean(s.online)) {
            emit({
              kind: s.online ? "device.online" : "device.offline",
              at: new Date().toISOString(),
              deviceId: t.deviceId,
            });
          }
          dirty = true;
        } else if (env.fleetEvent) {
          const e = env.fleetEvent;
          if (e.kind === "device.online" || e.kind === "device.offline") return; // seen via DeviceState
          const detail = e.detailJson
            ? (JSON.parse(e.detailJson) as { rolloutId?: string; peer?: string })
            : {};
          if (detail.rolloutId && !rollouts.has(detail.rolloutId) && !o.rollout) stale.add(detail.rolloutId);
          const rid = detail.rolloutId ?? (e.jobId ? rolloutOfJob.get(e.jobId) : undefined);
          if (rid && rollouts.has(rid)) stale.add(rid);
          if (o.rollout && rid !== o.rollout) return;
          if (sel && !visible(e.deviceId)) return;
          emit({
            kind: e.kind,
            at: new Date(e.atMs || Date.now()).toISOString(),
            deviceId: e.deviceId || undefined,
            jobId: e.jobId || undefined,
            taskId: e.status?.taskId || undefined,
            state: e.status ? stateName(e.status.state) : undefined,
            attempt: e.status?.attempt || undefined,
            message:
              e.status?.message ||
              e.status?.reason ||
              (detail.peer
                ? `peer ${detail.peer} served a chunk that does not match the manifest`
                : undefined),
            ...(e.detailJson ? { detail } : {}),
          });
        }
      });
      await client.subscribeAsync([eventsTopic(ctx.prefix), `${ctx.prefix}/d/+/state`], { qos: 0 });
      const redraw = () => {
        if (!tty || !dirty) return;
        dirty = false;
        const shown = [...devices.values()]
          .filter((d) => visible(d.id))
          .sort((a, b) => a.id.localeCompare(b.id));
        const rows = Math.max(5, (process.stdout.rows ?? 40) - RECENT - 6);
        const online = shown.filter((d) => d.online).length;
        let out = `\x1b[H\x1b[2JEdgeFleet watch  ${ctx.server}  ${shown.length} devices, ${online} online${o.selector ? `  [${o.selector}]` : ""}\n\n`;
        out += table(
          shown.slice(0, rows).map((d) => ({
            device: d.id,
            online: d.online ? "●" : "○",
            queued: d.queueDepth,
            running: d.running,
            agent: d.agentVersion,
            labels: Object.entries(d.labels)
              .map(([k, v]) => `${k}=${v}`)
              .join(","),
          })),
        );
        if (shown.length > rows) out += `... and ${shown.length - rows} more\n`;
        const gateways = shown.filter((d) => d.gateway);
        if (gateways.length)
          out += `\n${gateways.map((d) => describeGateway(d.id, d.gateway!, d.online)).join("\n")}\n`;
        for (const r of rollouts.values()) out += `\n${renderRollout(r)}`;
        out += `\nrecent events\n${recent.join("\n")}\n`;
        process.stdout.write(out);
      };
      const timer = setInterval(redraw, REDRAW_MS);
      // Rollout views are re-read at most once a second, only those that had events.
      let refreshing = false;
      const refresher = setInterval(() => {
        if (refreshing || !stale.size || !tty) return;
        refreshing = true;
        const ids = [...stale];
        stale.clear();
        Promise.all(ids.map((id) => rpc.call("rollout.show", { id }).then(track, () => {})))
          .then(() => {
            dirty = true;
          })
          .finally(() => {
            refreshing = false;
          });
      }, 1000);
      await new Promise<void>((resolve) => {
        const stop = () => resolve();
        process.once("SIGINT", stop);
        process.once("SIGTERM", stop);
        client.once("close", () => {
          process.stderr.write(`fleet watch: connection to ${ctx.server} closed\n`);
          process.exitCode = 3;
          resolve();
        });
      });
      clearInterval(timer);
      clearInterval(refresher);
      client.removeAllListeners("close");
      await client.endAsync(true).catch(() => {});
    });
}
