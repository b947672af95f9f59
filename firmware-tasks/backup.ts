// `backup {paths, name?, keep?}`: a .tar.gz of paths under the root, written atomically into the
// agent's data directory (backups/), keeping the newest `keep`. (Uploading to the server's
// artifact store arrives with the artifact store.)
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, readdir, rename, rm, stat } from "node:fs/promises";
import { basename, join, relative } from "node:path";
import { create as createTar } from "tar";
import { z } from "zod";
import { TaskFailedError } from "./errors.js";
import { pathAllowed, underRoot } from "./paths.js";
import { defineHandler } from "./types.js";

const params = z
  .object({
    paths: z.array(z.string()).min(1),
    name: z
      .string()
      .regex(/^[A-Za-z0-9._-]{1,64}$/, "letters, digits, . _ -")
      .default("backup"),
    keep: z.number().int().min(1).max(1000).default(3),
    /** Also upload the archive to the server (fleet artifact ls --uploads). */
    upload: z.boolean().default(false),
  })
  .strict();

export default defineHandler({
  type: "backup",
  paramsSchema: params,
  check(p, policy) {
    for (const x of p.paths) {
      const outside = pathAllowed(x, policy.allowPaths);
      if (outside) return outside;
    }
    return undefined;
  },
  idempotent: true,
  async run(ctx, p, signal) {
    const rel = p.paths.map((x) => relative(ctx.root, underRoot(ctx.root, x)));
    for (const r of rel) {
      if (!(await stat(join(ctx.root, r)).catch(() => undefined)))
        throw new TaskFailedError(`nothing to back up at ${r}`, { reason: "missing_path" });
    }
    const dir = join(ctx.dataDir, "backups");
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const stamp = new Date(ctx.now()).toISOString().replace(/[:.]/g, "-");
    const file = join(dir, `${p.name}-${stamp}.tar.gz`);
    const tmp = `${file}.partial`;
    await createTar({ gzip: true, file: tmp, cwd: ctx.root, portable: true }, rel);
    if (signal.aborted) {
      await rm(tmp, { force: true });
      throw signal.reason;
    }
    await rename(tmp, file);
    const h = createHash("sha256");
    for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
    const size = (await stat(file)).size;
    const sha = h.digest("hex");
    if (p.upload) {
      ctx.progress(60, "uploading");
      await ctx.artifacts.upload(file, basename(file), sha, signal);
    }
    const mine = (await readdir(dir))
      .filter((f) => f.startsWith(`${p.name}-`) && f.endsWith(".tar.gz"))
      .sort();
    for (const old of mine.slice(0, Math.max(0, mine.length - p.keep)))
      await rm(join(dir, old), { force: true });
    return {
      message: `${relative(ctx.dataDir, file)}: ${size} bytes, sha256 ${sha.slice(0, 16)}…, kept ${Math.min(mine.length, p.keep)}${p.upload ? ", uploaded" : ""}`,
    };
  },
});
