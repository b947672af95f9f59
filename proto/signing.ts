import {
  createHash,
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  sign,
  verify,
} from "node:crypto";
import { type DecodedJobSpec, decodeJobSpec, type JobSpec, pb, type SignedJob } from "./index.js";

export function generateSigningKey(): { privateKeyPem: string; publicKeyPem: string; keyId: string } {
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  return {
    privateKeyPem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    publicKeyPem: publicKey.export({ type: "spki", format: "pem" }).toString(),
    keyId: keyIdOf(publicKey),
  };
}

/** A short, stable id of an ed25519 public key: the first 16 hex digits of sha256(SPKI DER). */
export function keyIdOf(publicKey: KeyObject | string): string {
  const key = typeof publicKey === "string" ? createPublicKey(publicKey) : publicKey;
  return createHash("sha256")
    .update(key.export({ type: "spki", format: "der" }))
    .digest("hex")
    .slice(0, 16);
}

/** ed25519 verification that treats a malformed signature as a bad one. */
export function verifies(data: Uint8Array, key: KeyObject, signature: Uint8Array): boolean {
  try {
    return verify(null, data, key, signature);
  } catch {
    return false;
  }
}

export function loadPrivateKey(pem: string): KeyObject {
  return createPrivateKey(pem);
}

/** Signs the exact serialized bytes of the spec (DESIGN.md §5). */
export function signJob(spec: JobSpec, privateKey: KeyObject | string, keyId: string): SignedJob {
  const key = typeof privateKey === "string" ? createPrivateKey(privateKey) : privateKey;
  const bytes = pb.JobSpec.encode(spec).finish();
  return { spec: bytes, signature: sign(null, bytes, key), keyId };
}

export type SignatureCheck =
  /** `digest`: specDigest of what was verified (the job's identity for de-duplication). */
  | { ok: true; spec: DecodedJobSpec; digest: string }
  | { ok: false; reason: "unsigned" | "unknown_key" | "bad_signature" | "malformed"; message: string };

/**
 * Signatures already found good, for many verifiers that trust the same keys in one process
 * (the simulator's devices): a job sent to 10,000 simulated devices is verified once. Keyed by
 * key id and signature, and the signed bytes must be identical. A real device has none.
 */
export class VerifiedSignatures {
  private readonly good = new Map<string, { spec: Buffer; digest: string }>();
  constructor(private readonly max = 1000) {}

  /** The spec's digest, if this key's signature over exactly these bytes was found good. */
  digestOf(keyId: string, signature: Uint8Array, spec: Uint8Array): string | undefined {
    const hit = this.good.get(`${keyId}:${view(signature).toString("base64")}`);
    return hit?.spec.equals(spec) ? hit.digest : undefined;
  }

  add(keyId: string, signature: Uint8Array, spec: Uint8Array, digest: string): void {
    if (this.good.size >= this.max) this.good.delete(this.good.keys().next().value!);
    // A copy: `spec` may be a view into the packet that carried it.
    this.good.set(`${keyId}:${view(signature).toString("base64")}`, { spec: Buffer.from(spec), digest });
  }
}

/** The same bytes as a Buffer, not copied (Buffer.from of a Uint8Array copies). */
function view(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

export function verifySignedJob(
  signed: SignedJob,
  trustedKeys: ReadonlyMap<string, KeyObject>,
  verified?: VerifiedSignatures,
): SignatureCheck {
  const specBytes = signed.spec ?? new Uint8Array();
  if (!signed.signature || signed.signature.length === 0 || !signed.keyId) {
    return { ok: false, reason: "unsigned", message: "job carries no signature" };
  }
  const key = trustedKeys.get(signed.keyId);
  if (!key) return { ok: false, reason: "unknown_key", message: `signed by unknown key ${signed.keyId}` };
  let digest = verified?.digestOf(signed.keyId, signed.signature, specBytes);
  if (digest === undefined) {
    // not verified before by the same trusted key
    if (!verifies(specBytes, key, signed.signature))
      return {
        ok: false,
        reason: "bad_signature",
        message: `signature does not verify with key ${signed.keyId}`,
      };
    digest = specDigest(signed);
    verified?.add(signed.keyId, signed.signature, specBytes, digest);
  }
  try {
    return { ok: true, spec: decodeJobSpec(specBytes), digest };
  } catch (err) {
    return { ok: false, reason: "malformed", message: `spec does not decode: ${(err as Error).message}` };
  }
}

/** sha256 of the signed spec bytes: two deliveries of one job id are "the same job" iff these match. */
export function specDigest(signed: SignedJob): string {
  return createHash("sha256")
    .update(signed.spec ?? new Uint8Array())
    .digest("hex");
}

export type Manifest = InstanceType<typeof pb.ArtifactManifest>;

export function signManifest(
  m: Manifest | Parameters<typeof pb.ArtifactManifest.encode>[0],
  privateKey: KeyObject | string,
  keyId: string,
) {
  const key = typeof privateKey === "string" ? createPrivateKey(privateKey) : privateKey;
  const bytes = pb.ArtifactManifest.encode(m).finish();
  return { manifest: bytes, signature: sign(null, bytes, key), keyId };
}

export function verifyManifest(
  signed: { manifest?: Uint8Array | null; signature?: Uint8Array | null; keyId?: string | null },
  trustedKeys: ReadonlyMap<string, KeyObject>,
): { ok: true; manifest: Manifest } | { ok: false; message: string } {
  const key = signed.keyId ? trustedKeys.get(signed.keyId) : undefined;
  if (!signed.manifest?.length || !signed.signature?.length || !key)
    return { ok: false, message: "manifest is unsigned or signed by an unknown key" };
  if (!verifies(signed.manifest, key, signed.signature))
    return { ok: false, message: "manifest signature does not verify" };
  try {
    return { ok: true, manifest: pb.ArtifactManifest.decode(signed.manifest) };
  } catch (err) {
    return { ok: false, message: `manifest does not decode: ${(err as Error).message}` };
  }
}
