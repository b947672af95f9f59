// `fleet init`: operator signing key, fleet CA + server certificate, controller and operator
// credentials, and the operator context.
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";
import { writeFileAtomic, writeSecretJson } from "../common/files.js";
import { generateSigningKey } from "../proto/signing.js";
import { paths, readJsonFile, type ServerConfig, serverConfigSchema } from "./config.js";
import { hashPassword, mosquittoHash, newToken } from "./credentials.js";
import { createCa, issueServerCert } from "./pki.js";

export interface InitResult {
  dir: string;
  created: boolean;
  operator: { username: string; keyId: string };
  /** The operator's signing key (outside the data directory), when one was made. */
  keyFile?: string;
}

/**
 * Where operator signing keys are kept: never in the server's data directory (the server needs
 * only public keys; a copy or backup of its data must not carry the power to sign jobs).
 */
export function defaultKeyDir(): string {
  return resolve(process.env.FLEET_KEY_DIR ?? join(homedir(), ".config", "edgefleet", "keys"));
}

export async function initFleet(
  dir: string,
  o: { server?: string; hosts?: string[]; force?: boolean; keyDir?: string } = {},
): Promise<InitResult> {
  const p = paths(dir);
  if (existsSync(p.server) && !o.force) {
    const cfg = readJsonFile(p.server, serverConfigSchema);
    return {
      dir,
      created: false,
      operator: { username: cfg.operators[0]!.username, keyId: cfg.operators[0]!.keyId },
    };
  }
  const hosts = o.hosts ?? ["localhost", "127.0.0.1"];
  const key = generateSigningKey();
  const ca = createCa();
  const tls = issueServerCert(ca, hosts);
  const operatorPassword = newToken();
  writeFileAtomic(p.caCert, ca.certPem);
  writeFileAtomic(p.caKey, ca.keyPem, 0o600);
  writeFileAtomic(p.serverCert, tls.certPem);
  writeFileAtomic(p.serverKey, tls.keyPem, 0o600);
  const keyFile = join(o.keyDir ?? defaultKeyDir(), `${key.keyId}.key`);
  writeFileAtomic(keyFile, key.privateKeyPem, 0o600);
  const server: ServerConfig = {
    prefix: "fleet/v1",
    controller: {
      username: "fleet-controller",
      password: newToken(),
      clientId: `fleet-controller-${randomBytes(16).toString("hex")}`,
    },
    operators: [
      {
        username: "admin",
        passwordHash: await hashPassword(operatorPassword),
        keyId: key.keyId,
        publicKey: key.publicKeyPem,
        brokerHash: mosquittoHash(operatorPassword),
      },
    ],
    historyRetentionDays: 30,
    metricsAuth: false,
    limits: {
      maxConnections: 20_000,
      connectsPerSecondPerAddress: 50,
      maxPayloadBytes: 256 * 1024,
      connectTimeoutMs: 10_000,
      maxKeepaliveS: 600,
      artifactBytesPerSecond: 0,
    },
    hosts,
  };
  writeSecretJson(p.server, server);
  writeSecretJson(p.operator, {
    server: o.server ?? "mqtt://127.0.0.1:1883",
    username: "admin",
    password: operatorPassword,
    keyId: key.keyId,
    signingKey: keyFile,
    caCert: "tls/ca.pem",
  });
  return { dir, created: true, operator: { username: "admin", keyId: key.keyId }, keyFile };
}

/** Resolves a path from the operator context, relative to the context file's directory. */
export function contextPath(contextFile: string, p: string): string {
  return isAbsolute(p) ? p : join(contextFile, "..", p);
}
