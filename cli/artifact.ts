// `fleet artifact push|ls|rm`: software artifacts in the server's content-addressed store, each
// with a manifest signed by the operator key.
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { open, stat } from "node:fs/promises";
import { basename } from "node:path";
import { Readable } from "node:stream";
import { createGunzip } from "node:zlib";
import type { Command } from "commander";
import { chunkStream } from "../common/chunking.js";
import { pb } from "../proto/index.js";
import { signManifest } from "../proto/signing.js";
import { loadContext, operatorOptions } from "./context.js";
import { CliError } from "./exit.js";
import { type ListOptions, listOptions, printJson, printList } from "./format.js";
import { type HttpOptions, httpBase, httpPages, request } from "./http.js";

async function sha256Of(file: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/**
 * A gzip file's uncompressed content in content-defined chunks (DESIGN.md §11); undefined for
 * anything else (stored and fetched whole, as before chunking).
 */
async function chunksOf(file: string) {
  const fh = await open(file, "r");
  const magic = Buffer.alloc(2);
  await fh.read(magic, 0, 2, 0);
  await fh.close();
  if (magic[0] !== 0x1f || magic[1] !== 0x8b) return undefined;
  try {
    const list = await chunkStream(createReadStream(file).pipe(createGunzip()));
    return {
      chunks: list.chunks.map((c) => ({ sha256: Buffer.from(c.sha256, "hex"), size: c.size })),
      contentSha256: Buffer.from(list.contentSha256, "hex"),
      contentSize: list.contentSize,
    };
  } catch (err) {
    throw new CliError(`${file}: not a readable gzip file (${(err as Error).message})`);
  }
}

export function registerArtifact(program: Command): void {
  const artifact = program
    .command("artifact")
    .description("software artifacts on the server (for software-update tasks)");
  operatorOptions(artifact.command("push <file>"))
    .description("upload a .tar.gz with a signed manifest (name, version, size, sha256, hardware)")
    .requiredOption("--name <name>", "artifact name, e.g. app")
    .requiredOption("--version <version>", "version, e.g. 2.1.0")
    .option("--hardware <list>", "compatible hardware, comma-separated (default: any)")
    .option("--http <url>", "the server's HTTP URL (default: asked from the server)")
    .action(async (file: string, o: HttpOptions & { name: string; version: string; hardware?: string }) => {
      const st = await stat(file).catch(() => undefined);
      if (!st?.isFile()) throw new CliError(`${file} is not a file`);
      const ctx = loadContext(o);
      const manifest = {
        name: o.name,
        version: o.version,
        size: st.size,
        sha256: await sha256Of(file),
        hardware: o.hardware
          ? o.hardware
              .split(",")
              .map((h) => h.trim())
              .filter(Boolean)
          : [],
        createdAtMs: Date.now(),
        ...(await chunksOf(file)),
      };
      const signed = pb.SignedManifest.encode(signManifest(manifest, ctx.signingKeyPem, ctx.keyId)).finish();
      const base = await httpBase(ctx, o);
      let sent = 0;
      const tty = process.stderr.isTTY && !o.json;
      const stream = createReadStream(file).on("data", (chunk) => {
        sent += chunk.length;
        if (tty) {
          const pct = Math.floor((sent / st.size) * 100);
          process.stderr.write(`\rupload ${basename(file)} [${"#".repeat(pct / 5).padEnd(20, ".")}] ${pct}%`);
        }
      });
      const r = await request(ctx, base, "v1/artifacts", {
        method: "PUT",
        body: Readable.toWeb(stream) as unknown as BodyInit,
        duplex: "half",
        headers: {
          "x-fleet-manifest": Buffer.from(signed).toString("base64"),
          "content-length": String(st.size),
        },
      });
      if (tty) process.stderr.write("\n");
      if (o.json) return printJson(r);
      const chunked = manifest.chunks
        ? `, ${manifest.chunks.length} chunks of ${manifest.contentSize} bytes uncompressed`
        : "";
      process.stdout.write(
        `stored ${o.name} ${o.version}: ${st.size} bytes${chunked}, sha256 ${manifest.sha256}\n`,
      );
    });
  listOptions(operatorOptions(artifact.command("ls")))
    .description("list artifacts (or, with --uploads, what devices uploaded: backups)")
    .option("--uploads", "list device uploads instead")
    .option("--http <url>", "the server's HTTP URL")
    .action(async (o: HttpOptions & ListOptions & { uploads?: boolean }) => {
      const ctx = loadContext(o);
      const base = await httpBase(ctx, o);
      const items = httpPages<Record<string, unknown>>(
        ctx,
        base,
        o.uploads ? "v1/uploads" : "v1/artifacts",
        o.limit,
      );
      if (o.uploads) return printList(items, o, (u) => u, ["deviceId", "file", "size", "at"]);
      await printList(
        items,
        o,
        (a) => ({
          ...a,
          sha256: String(a.sha256).slice(0, 16),
          createdAt: new Date(Number(a.createdAt)).toISOString(),
        }),
        ["name", "version", "size", "sha256", "hardware", "createdAt"],
      );
    });
  operatorOptions(artifact.command("rm <name> <version>"))
    .description("remove an artifact (its blob goes when no other version uses it)")
    .option("--http <url>", "the server's HTTP URL")
    .action(async (name: string, version: string, o: HttpOptions) => {
      const ctx = loadContext(o);
      const r = await request(
        ctx,
        await httpBase(ctx, o),
        `v1/artifacts/${encodeURIComponent(name)}/${encodeURIComponent(version)}`,
        { method: "DELETE" },
      );
      if (o.json) return printJson(r);
      process.stdout.write(`removed ${name} ${version}\n`);
    });
}
