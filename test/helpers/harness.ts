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
  dirs: Array<() => void>;
  agents: Agent[];
  newAgent(deviceId: string, over?: Partial<AgentConfigInput>, opts?: Partial<AgentOptions>): Promise<Agent>;
  close(): Promise<void>;
}

export async function harness(): Promise<Harness> {
  const broker = await startBroker();
  const ctl = new TestController(broker.url);
  await ctl.start();
  const h: Harness = {
    broker,
    ctl,
    dirs: [],
    agents: [],
    async newAgent(deviceId, over = {}, opts = {}) {
      const { dir, cleanup } = tempDir();
      h.dirs.push(cleanup);
      const agent = new Agent({
        config: agentConfig(dir, deviceId, [broker.url], over),
        log: quietLog,
        measureFacts: false,
        ...opts,
      });
      h.agents.push(agent);
      await agent.start();
      const syncs = ctl.syncs.get(deviceId) ?? 0;
      await ctl.waitFor(`${deviceId} synced`, () => agent.connected && (ctl.syncs.get(deviceId) ?? 0) > syncs);
      return agent;
    },
    async close() {
      for (const a of h.agents) await a.stop().catch(() => {});
      await ctl.stop();
      await broker.close();
      for (const d of h.dirs) d();
    },
  };
  return h;
}
