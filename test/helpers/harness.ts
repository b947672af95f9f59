import pino from "pino";
import { Agent, type AgentOptions } from "../../agent/agent.js";
import type { AgentConfigInput } from "../../agent/config.js";
import { startBroker, type TestBroker } from "./broker.js";
import { TestController } from "./controller.js";
import { agentConfig, tempDir } from "./keys.js";

export const quietLog = pino({ level: process.env.TEST_LOG_LEVEL ?? "silent" });

export interface Harness {
  broker: TestBroker;
  ctl: TestController;
  agents: Agent[];
  newAgent(deviceId: string, over?: Partial<AgentConfigInput>, opts?: Partial<AgentOptions>): Promise<Agent>;
  /** Stops an agent and starts a new one on the same data (a process restart, in-process). */
  restartAgent(agent: Agent, opts?: { waitSync?: boolean }): Promise<Agent>;
  waitSynced(agent: Agent, syncsBefore: number): Promise<void>;
  close(): Promise<void>;
}

export async function harness(brokerHooks: Parameters<typeof startBroker>[1] = {}): Promise<Harness> {
  const broker = await startBroker(0, brokerHooks);
  const ctl = new TestController(broker.url);
  await ctl.start();
  const dirs: Array<() => void> = [];
  const options = new Map<Agent, AgentOptions>();
  const launch = async (o: AgentOptions, waitSync: boolean) => {
    const agent = new Agent(o);
    options.set(agent, o);
    h.agents.push(agent);
    const syncs = ctl.syncs.get(agent.deviceId) ?? 0;
    await agent.start();
    if (waitSync) await h.waitSynced(agent, syncs);
    return agent;
  };
  const h: Harness = {
    broker,
    ctl,
    agents: [],
    async newAgent(deviceId, over = {}, opts = {}) {
      const { dir, cleanup } = tempDir();
      dirs.push(cleanup);
      return launch(
        {
          config: agentConfig(dir, deviceId, [broker.url], over),
          log: quietLog,
          measureFacts: false,
          ...opts,
        },
        true,
      );
    },
    async restartAgent(agent, { waitSync = true } = {}) {
      await agent.stop();
      h.agents.splice(h.agents.indexOf(agent), 1);
      return launch(options.get(agent)!, waitSync);
    },
    async waitSynced(agent, syncsBefore) {
      const synced = () =>
        agent.connected && (ctl.syncs.get(agent.deviceId) ?? 0) > syncsBefore && ctl.online(agent.deviceId);
      await ctl.waitFor(`${agent.deviceId} synced`, synced, 60_000).catch((err: Error) => {
        // Which part never came: the connection, the SyncRequest, or the DeviceState.
        const syncs = ctl.syncs.get(agent.deviceId) ?? 0;
        throw new Error(
          `${err.message} (agent connected: ${agent.connected}; SyncRequests seen: ${syncs}, ${syncsBefore} before; registry online: ${ctl.online(agent.deviceId)}; connection attempts: ${agent.connectAttemptTimes.length})`,
        );
      });
    },
    async close() {
      for (const a of h.agents) await a.stop().catch(() => {});
      await ctl.stop();
      await broker.close();
      for (const d of dirs) d();
    },
  };
  return h;
}
