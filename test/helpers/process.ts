// Real agent processes (`bin/fleet agent --root R`) for tests about process behaviour.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import type { AgentConfigInput } from "../../agent/config.js";
import { operator, tempDir } from "./keys.js";

const FLEET = resolve(import.meta.dirname, "..", "..", "bin", "fleet");

export function flashRoot(deviceId: string, brokers: string[], over: Partial<AgentConfigInput> = {}) {
  const { dir, cleanup } = tempDir("fleet-root-");
  mkdirSync(join(dir, "etc", "fleet-agent"), { recursive: true });
  const config = {
    deviceId,
    brokers,
    password: "test-secret",
    trustedKeys: [{ keyId: operator.keyId, publicKey: operator.publicKeyPem }],
    telemetryIntervalS: 0,
    reconnect: { minMs: 50, maxMs: 500 },
    ...over,
  };
  writeFileSync(join(dir, "etc", "fleet-agent", "config.json"), JSON.stringify(config, null, 2), {
    mode: 0o600,
  });
  return { root: dir, cleanup };
}

export interface AgentProcess {
  child: ChildProcess;
  stderr: () => string;
  exited: Promise<number | null>;
}

export function spawnAgent(root: string, env: Record<string, string> = {}): AgentProcess {
  const child = spawn(process.execPath, [FLEET, "agent", "--root", root], {
    env: { ...process.env, FLEET_LOG_LEVEL: "info", ...env },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let err = "";
  child.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  return { child, stderr: () => err, exited };
}
