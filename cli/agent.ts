import type { Command } from "commander";
import { Agent } from "../agent/agent.js";
import { ConfigError, loadAgentConfig } from "../agent/config.js";
import { createLogger } from "../agent/log.js";
import { CliError, EXIT } from "./exit.js";

export function registerAgent(program: Command): void {
  program
    .command("agent")
    .description("run the device agent of a flashed root (DIR/etc/fleet-agent/config.json)")
    .option("--root <dir>", "the flashed root; config at DIR/etc/fleet-agent/config.json")
    .option("--config <file>", "a config file; its directory is the root unless --root is given")
    .action(async (opts: { root?: string; config?: string }) => {
      let config: ReturnType<typeof loadAgentConfig>;
      try {
        config = loadAgentConfig(opts);
      } catch (err) {
        if (err instanceof ConfigError) throw new CliError(err.message, EXIT.USAGE);
        throw err;
      }
      const log = createLogger();
      const agent = new Agent({ config, log });
      await agent.start();
      await new Promise<void>((resolve) => {
        let stopping = false;
        const stop = (sig: string) => {
          if (stopping) return;
          stopping = true;
          log.info({ signal: sig }, "stopping");
          agent.stop().then(resolve, (err) => {
            log.error({ err }, "stop failed");
            resolve();
          });
        };
        process.once("SIGTERM", () => stop("SIGTERM"));
        process.once("SIGINT", () => stop("SIGINT"));
      });
    });
}
