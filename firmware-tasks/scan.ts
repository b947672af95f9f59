// `scan {packages?, integrity?: {paths}}`: an inventory from systeminformation (OS, kernel, CPU,
// memory, disks, network interfaces, listening ports, installed packages where dpkg, rpm or apk
// exists), and optionally a file-integrity check of paths under the root against a baseline
// kept in the agent's store (added, removed, changed files; the baseline is then updated).
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { access, readdir, stat } from "node:fs/promises";
import { join, relative } from "node:path";
import si from "systeminformation";
import { z } from "zod";
import { underRoot } from "./paths.js";
import { runCommand } from "./process.js";
import { defineHandler, type TaskContext } from "./types.js";

const params = z
  .object({
    packages: z.boolean().default(true),
    integrity: z
      .object({ paths: z.array(z.string()).min(1), maxFiles: z.number().int().min(1).default(10_000) })
      .strict()
      .optional(),
  })
  .strict();

const PACKAGE_TOOLS: Array<{
  bin: string;
  args: string[];
  parse: (line: string) => [string, string] | undefined;
}> = [
  {
    bin: "/usr/bin/dpkg-query",
    // biome-ignore lint/suspicious/noTemplateCurlyInString: dpkg-query's own format syntax
    args: ["-W", "-f", "${Package}\\t${Version}\\n"],
    parse: (l) => l.split("\t") as [string, string],
  },
  {
    bin: "/usr/bin/rpm",
    args: ["-qa", "--qf", "%{NAME}\\t%{VERSION}-%{RELEASE}\\n"],
    parse: (l) => l.split("\t") as [string, string],
  },
  {
    bin: "/sbin/apk",
    args: ["info", "-v"],
    parse: (l) => /^(.+)-(\d[^-]*-r\d+)$/.exec(l)?.slice(1, 3) as [string, string] | undefined,
  },
];

async function packages(ctx: TaskContext, signal: AbortSignal): Promise<Record<string, string> | undefined> {
  for (const t of PACKAGE_TOOLS) {
    if (
      !(await access(t.bin).then(
        () => true,
        () => false,
      ))
    )
      continue;
    const r = await runCommand(t.bin, t.args, {
      cwd: ctx.scratchDir,
      env: { PATH: "/usr/bin:/bin:/sbin" },
      signal,
      outputLimit: 16 * 1024 * 1024,
    });
    if (r.code !== 0) continue;
    const out: Record<string, string> = {};
    for (const line of r.output.split("\n")) {
      const kv = line && t.parse(line);
      if (kv?.[0]) out[kv[0]] = kv[1] ?? "";
    }
    return out;
  }
  return undefined;
}

function sha256File(file: string, signal: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash("sha256");
    createReadStream(file, { signal })
      .on("data", (d) => h.update(d))
      .on("end", () => resolve(h.digest("hex")))
      .on("error", reject);
  });
}

async function walk(root: string, path: string, out: string[], max: number): Promise<void> {
  const st = await stat(path).catch(() => undefined);
  if (!st || out.length >= max) return;
  if (st.isFile()) out.push(relative(root, path));
  else if (st.isDirectory())
    for (const e of (await readdir(path)).sort()) await walk(root, join(path, e), out, max);
}

export default defineHandler({
  type: "scan",
  paramsSchema: params,
  idempotent: true,
  async run(ctx, p, signal) {
    const [os, cpu, mem, disks, fs, nics, conns] = await Promise.all([
      si.osInfo(),
      si.cpu(),
      si.mem(),
      si.diskLayout().catch(() => []),
      si.fsSize().catch(() => []),
      si.networkInterfaces().catch(() => []),
      si.networkConnections().catch(() => []),
    ]);
    ctx.progress(40, "inventory");
    const report: Record<string, unknown> = {
      os: {
        platform: os.platform,
        distro: os.distro,
        release: os.release,
        kernel: os.kernel,
        arch: os.arch,
        hostname: os.hostname,
      },
      cpu: { brand: cpu.brand, cores: cpu.cores },
      memory: { total: mem.total, available: mem.available },
      disks: disks.map((d) => ({ name: d.name, type: d.type, size: d.size })),
      filesystems: fs.map((f) => ({ mount: f.mount, size: f.size, available: f.available })),
      network: (Array.isArray(nics) ? nics : [nics]).map((n) => ({
        iface: n.iface,
        ip4: n.ip4,
        ip6: n.ip6,
        mac: n.mac,
      })),
      listening: conns
        .filter((c) => c.state === "LISTEN")
        .map((c) => ({
          protocol: c.protocol,
          address: c.localAddress,
          port: c.localPort,
          process: c.process,
        })),
    };
    const pkgs = p.packages ? await packages(ctx, signal) : undefined;
    if (pkgs) report.packages = pkgs;
    ctx.progress(70, "packages");
    let summary = `${os.distro} ${os.release}, ${(report.listening as unknown[]).length} listening ports${pkgs ? `, ${Object.keys(pkgs).length} packages` : ""}`;
    if (p.integrity) {
      const key = `scan/baseline/${createHash("sha256").update(p.integrity.paths.join("\n")).digest("hex").slice(0, 16)}`;
      const files: string[] = [];
      for (const path of p.integrity.paths)
        await walk(ctx.root, underRoot(ctx.root, path), files, p.integrity.maxFiles);
      const now: Record<string, string> = {};
      for (const f of files) now[f] = await sha256File(join(ctx.root, f), signal);
      const baseline = await ctx.kv.get<Record<string, string>>(key);
      await ctx.kv.put(key, now);
      if (baseline) {
        const diff = {
          added: Object.keys(now).filter((f) => !(f in baseline)),
          removed: Object.keys(baseline).filter((f) => !(f in now)),
          changed: Object.keys(now).filter((f) => f in baseline && baseline[f] !== now[f]),
        };
        report.integrity = diff;
        summary += `; integrity: ${diff.added.length} added, ${diff.removed.length} removed, ${diff.changed.length} changed`;
      } else {
        report.integrity = { baseline: "created", files: files.length };
        summary += `; integrity baseline of ${files.length} files`;
      }
    }
    await ctx.kv.put("scan/last", report);
    return { message: summary, output: JSON.stringify(report, null, 1) };
  },
});
