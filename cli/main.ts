import { Command, CommanderError } from "commander";
import { AGENT_VERSION } from "../common/version.js";
import { registerAcl } from "./acl.js";
import { registerAgent } from "./agent.js";
import { registerArtifact } from "./artifact.js";
import { registerDevice } from "./device.js";
import { CliError, EXIT } from "./exit.js";
import { registerFlash } from "./flash.js";
import { registerInit } from "./init.js";
import { registerJobs } from "./jobs.js";
import { registerNotify } from "./notify.js";
import { registerRollout } from "./rollout.js";
import { registerRun } from "./run.js";
import { registerServer } from "./server.js";
import { registerSimulate } from "./simulate.js";
import { registerWatch } from "./watch.js";

/** `fleet jobs ls | head`: a reader that stops reading ends the command quietly, as in Unix tools. */
function quietOnClosedPipe(): void {
  for (const stream of [process.stdout, process.stderr])
    stream.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "EPIPE") process.exit(typeof process.exitCode === "number" ? process.exitCode : 0);
      throw err;
    });
}

export async function main(argv: string[]): Promise<number> {
  quietOnClosedPipe();
  const program = new Command("fleet")
    .description("EdgeFleet: fleet manager for IoT and edge devices")
    .version(AGENT_VERSION)
    // `--version` after a subcommand belongs to it (fleet artifact push --version 2.1.0).
    .enablePositionalOptions()
    .exitOverride()
    .showHelpAfterError("(add --help for usage)")
    .configureOutput({ writeErr: (s) => process.stderr.write(s) });
  registerInit(program);
  registerServer(program);
  registerDevice(program);
  registerFlash(program);
  registerAgent(program);
  registerRun(program);
  registerJobs(program);
  registerRollout(program);
  registerArtifact(program);
  registerAcl(program);
  registerNotify(program);
  registerWatch(program);
  registerSimulate(program);
  for (const c of program.commands) {
    c.exitOverride();
    for (const sub of c.commands) sub.exitOverride();
  }
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === "number" ? process.exitCode : EXIT.OK;
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
