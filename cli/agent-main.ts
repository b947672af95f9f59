// Entry point of the flashed, self-contained agent bundle (opt/fleet-agent/agent.cjs).
import { Command, CommanderError } from "commander";
import { AGENT_VERSION } from "../common/version.js";
import { registerAgent } from "./agent.js";
import { CliError, EXIT } from "./exit.js";

const program = new Command("fleet-agent").version(AGENT_VERSION).exitOverride();
registerAgent(program);
program.parseAsync(process.argv).then(
  () => {
    process.exitCode = EXIT.OK;
  },
  (err: unknown) => {
    if (err instanceof CommanderError) process.exitCode = err.exitCode === 0 ? EXIT.OK : EXIT.USAGE;
    else if (err instanceof CliError) {
      process.stderr.write(`fleet-agent: ${err.message}\n`);
      process.exitCode = err.exitCode;
    } else {
      process.stderr.write(`fleet-agent: ${(err as Error)?.stack ?? String(err)}\n`);
      process.exitCode = EXIT.FAILED;
    }
  },
);
