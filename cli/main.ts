import { Command, CommanderError } from "commander";
import { AGENT_VERSION } from "../agent/version.js";
import { registerAgent } from "./agent.js";
import { CliError, EXIT } from "./exit.js";

export async function main(argv: string[]): Promise<number> {
  const program = new Command("fleet")
    .description("EdgeFleet: fleet manager for IoT and edge devices")
    .version(AGENT_VERSION)
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  registerAgent(program);
  try {
    await program.parseAsync(argv);
    return EXIT.OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.exitCode === 0 ? EXIT.OK : EXIT.USAGE;
    }
    if (err instanceof CliError) {
      process.stderr.write(`fleet: ${err.message}\n`);
      return err.exitCode;
    }
    process.stderr.write(`fleet: ${(err as Error)?.stack ?? String(err)}\n`);
    return EXIT.FAILED;
  }
}
