// Credentials (DESIGN.md §3). Device and controller secrets are random 256-bit tokens, stored
// only as SHA-256 and compared in constant time: a slow KDF adds nothing for a random token and
// would make a reconnect storm of 10,000 devices cost minutes of CPU. Human operator passwords
// use scrypt.
import { createHash, pbkdf2Sync, randomBytes, scrypt, timingSafeEqual } from "node:crypto";

export function newToken(): string {
  return randomBytes(32).toString("base64url");
}

export function tokenHash(token: string | Buffer): string {
  return createHash("sha256").update(token).digest("hex");
}

export function tokenMatches(token: string | Buffer, hashHex: string): boolean {
  const a = createHash("sha256").update(token).digest();
  const b = Buffer.from(hashHex, "hex");
  return a.length === b.length && timingSafeEqual(a, b);
}

const SCRYPT = { N: 1 << 15, r: 8, p: 1, maxmem: 64 * 1024 * 1024 };

function scryptAsync(password: string, salt: Buffer, o: typeof SCRYPT): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    scrypt(password, salt, 32, o, (err, key) => (err ? reject(err) : resolve(key))),
  );
}

/** `scrypt$N$r$p$salt$hash` (base64url parts). */
export async function hashPassword(password: string): Promise<string> {
  const salt = randomBytes(16);
  const key = await scryptAsync(password, salt, SCRYPT);
  return ["scrypt", SCRYPT.N, SCRYPT.r, SCRYPT.p, salt.toString("base64url"), key.toString("base64url")].join(
    "$",
  );
}

export async function verifyPassword(password: string, stored: string): Promise<boolean> {
  const [kind, n, r, p, salt, hash] = stored.split("$");
  if (kind !== "scrypt" || !salt || !hash) return false;
  const expected = Buffer.from(hash, "base64url");
  const key = await scryptAsync(password, Buffer.from(salt, "base64url"), {
    N: Number(n),
    r: Number(r),
    p: Number(p),
    maxmem: SCRYPT.maxmem,
  });
  return key.length === expected.length && timingSafeEqual(key, expected);
}

// Mosquitto's password_file format for PBKDF2-SHA512 (`mosquitto_passwd` since 2.0):
// `$7$<iterations>$<base64 salt (12 bytes)>$<base64 hash (64 bytes)>`. Computed when a secret is
// issued (the server keeps no plaintext), so `fleet acl export` can write it at any time.
const MOSQ_ITERATIONS = 101;

export function mosquittoHash(
  password: string,
  salt = randomBytes(12),
  iterations = MOSQ_ITERATIONS,
): string {
  const hash = pbkdf2Sync(password, salt, iterations, 64, "sha512");
  return `$7$${iterations}$${salt.toString("base64")}$${hash.toString("base64")}`;
}
