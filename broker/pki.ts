// The fleet CA, the server certificate and device client certificates (node-forge builds and
// signs X.509; Node's crypto generates the keys and parses certificates).
import { generateKeyPairSync, randomBytes, X509Certificate } from "node:crypto";
import forge from "node-forge";

export interface CertPair {
  certPem: string;
  keyPem: string;
}

function rsaKeyPair() {
  const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
  return {
    keyPem: privateKey.export({ type: "pkcs8", format: "pem" }).toString(),
    publicPem: publicKey.export({ type: "spki", format: "pem" }).toString(),
  };
}

function baseCert(publicPem: string, cn: string, years: number, ou?: string) {
  const cert = forge.pki.createCertificate();
  cert.publicKey = forge.pki.publicKeyFromPem(publicPem);
  cert.serialNumber = `01${randomBytes(15).toString("hex")}`;
  cert.validity.notBefore = new Date(Date.now() - 3600_000);
  cert.validity.notAfter = new Date(Date.now() + years * 365 * 86_400_000);
  cert.setSubject([
    { name: "commonName", value: cn },
    ...(ou ? [{ name: "organizationalUnitName", value: ou }] : []),
  ]);
  return cert;
}

export function createCa(name = "EdgeFleet CA"): CertPair {
  const { keyPem, publicPem } = rsaKeyPair();
  const cert = baseCert(publicPem, name, 20);
  cert.setIssuer(cert.subject.attributes);
  cert.setExtensions([
    { name: "basicConstraints", cA: true, critical: true },
    { name: "keyUsage", keyCertSign: true, cRLSign: true, critical: true },
    { name: "subjectKeyIdentifier" },
  ]);
  cert.sign(forge.pki.privateKeyFromPem(keyPem), forge.md.sha256.create());
  return { certPem: forge.pki.certificateToPem(cert), keyPem };
}

function issue(
  ca: CertPair,
  publicPem: string,
  cn: string,
  ext: object[],
  years: number,
  ou?: string,
): string {
  const caCert = forge.pki.certificateFromPem(ca.certPem);
  const cert = baseCert(publicPem, cn, years, ou);
  cert.setIssuer(caCert.subject.attributes);
  cert.setExtensions([{ name: "basicConstraints", cA: false }, ...ext]);
  cert.sign(forge.pki.privateKeyFromPem(ca.keyPem), forge.md.sha256.create());
  return forge.pki.certificateToPem(cert);
}

export function issueServerCert(ca: CertPair, hosts: string[]): CertPair {
  const { keyPem, publicPem } = rsaKeyPair();
  const altNames = hosts.map((h) => (/^[\d.]+$|:/.test(h) ? { type: 7, ip: h } : { type: 2, value: h }));
  const certPem = issue(
    ca,
    publicPem,
    hosts[0] ?? "localhost",
    [
      { name: "keyUsage", digitalSignature: true, keyEncipherment: true },
      { name: "extKeyUsage", serverAuth: true },
      { name: "subjectAltName", altNames },
    ],
    5,
  );
  return { certPem, keyPem };
}

/** A client certificate for a device: CN = device id (DESIGN.md §3). */
/**
 * A device's certificate: CN = device id (DESIGN.md §3); OU = `site=<its site label>` when it
 * has one. Client and server: it logs in with it (mTLS) and serves chunks to its site's peers
 * with it (§11), who check the OU.
 */
export function issueDeviceCert(ca: CertPair, deviceId: string, site?: string): CertPair {
  const { keyPem, publicPem } = rsaKeyPair();
  const certPem = issue(
    ca,
    publicPem,
    deviceId,
    [
      { name: "keyUsage", digitalSignature: true, keyEncipherment: true },
      { name: "extKeyUsage", clientAuth: true, serverAuth: true },
    ],
    10,
    site ? `site=${site}` : undefined,
  );
  return { certPem, keyPem };
}

export function commonName(certPem: string | Buffer): string | undefined {
  const subject = new X509Certificate(certPem).subject;
  return /(?:^|\n)CN=([^\n]+)/.exec(subject)?.[1];
}
