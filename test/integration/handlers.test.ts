// The built-in config, backup, scan and reboot task types through a real agent.
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Agent } from "../../agent/agent.js";
import { TaskState as S, type TaskStatus } from "../../proto/index.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec, type TaskInput } from "../helpers/keys.js";

let h: Harness;
let agent: Agent;
const DEV = "handlers-1";
beforeAll(async () => {
  h = await harness();
  agent = await h.newAgent(DEV, { allowShell: ["/bin/sh"], systemDryRun: true });
});
afterAll(() => h.close());

const root = () => agent.config.root;

async function run(task: TaskInput, over = {}): Promise<{ job: TaskStatus; task: TaskStatus | undefined }> {
  const jobId = await h.ctl.assign(agent.deviceId, jobSpec([task], over));
  const job = await h.ctl.waitJob(agent.deviceId, jobId);
  return { job, task: h.ctl.latest(agent.deviceId, jobId, task.id ?? "") };
}

describe("config", () => {
  it("writes a file under the root atomically, with its mode", async () => {
    const r = await run({
      id: "c",
      type: "config",
      params: { path: "etc/app/app.conf", content: "port=80\n", mode: "0640" },
    });
    expect(r.job.state).toBe(S.SUCCEEDED);
    const file = join(root(), "etc/app/app.conf");
    expect(readFileSync(file, "utf8")).toBe("port=80\n");
    expect(statSync(file).mode & 0o777).toBe(0o640);
    expect(readdirSync(join(root(), "etc/app"))).toEqual(["app.conf"]); // no temp files left
  });

  it("restores the previous content when validation fails, and runs reload after a good one", async () => {
    const file = join(root(), "etc/app/app.conf");
    const bad = await run({
      id: "c",
      type: "config",
      params: {
        path: "etc/app/app.conf",
        content: "port=oops\n",
        validate: ["/bin/sh", "-c", "grep -q 'port=[0-9]' {path} || { echo bad port; exit 1; }"],
      },
    });
    expect(bad.job.state).toBe(S.FAILED);
    expect(bad.task).toMatchObject({ reason: "validation_failed", output: "bad port\n" });
    expect(bad.task?.message).toContain("previous content restored");
    expect(readFileSync(file, "utf8")).toBe("port=80\n");
    expect(statSync(file).mode & 0o777).toBe(0o640);
    const good = await run({
      id: "c",
      type: "config",
      params: {
        path: "etc/app/app.conf",
        content: "port=81\n",
        validate: ["/bin/sh", "-c", "grep -q 'port=[0-9]' {path}"],
        reload: ["/bin/sh", "-c", "touch reloaded"],
      },
    });
    expect(good.job.state).toBe(S.SUCCEEDED);
    expect(readFileSync(file, "utf8")).toBe("port=81\n");
    expect(existsSync(join(root(), "etc/app/reloaded"))).toBe(true);
  });

  it("reads a mode given as a YAML number (0600 -> 600) as octal, not decimal (M7)", async () => {
    const r = await run({
      id: "c",
      type: "config",
      params: { path: "etc/app/secret.conf", content: "k=v\n", mode: 600 },
    });
    expect(r.job.state).toBe(S.SUCCEEDED);
    expect(statSync(join(root(), "etc/app/secret.conf")).mode & 0o7777).toBe(0o600);
  });

  it.each<[string, object, S, string]>([
    ["a path outside the root", { path: "../../etc/passwd", content: "x" }, S.FAILED, "bad_path"],
    ["a bad mode", { path: "a", content: "x", mode: "999" }, S.REJECTED, "invalid_params"],
    ["a setuid mode (M7)", { path: "a", content: "x", mode: "4755" }, S.REJECTED, "invalid_params"],
    ["a setgid mode as a number (M7)", { path: "a", content: "x", mode: 2755 }, S.REJECTED, "invalid_params"],
    [
      "a validate command not allowed",
      { path: "a", content: "x", validate: ["/usr/bin/env", "true"] },
      S.REJECTED,
      "task_type_not_allowed",
    ],
    ["no content", { path: "a" }, S.REJECTED, "invalid_params"],
  ])("refuses %s", async (_n, params, state, reason) => {
    const r = await run({ id: "c", type: "config", params });
    expect(r.job.state).toBe(state);
    expect(state === S.REJECTED ? r.job.reason : r.task?.reason).toBe(reason);
  });
});

describe("backup", () => {
  it("archives paths under the root and keeps the newest `keep`", async () => {
    mkdirSync(join(root(), "etc/app"), { recursive: true });
    for (let i = 0; i < 3; i++) {
      const r = await run({ id: "b", type: "backup", params: { paths: ["etc/app"], name: "app", keep: 2 } });
      expect(r.job.state).toBe(S.SUCCEEDED);
      expect(r.task?.message).toMatch(/^backups\/app-.*\.tar\.gz: \d+ bytes, sha256 [0-9a-f]{16}/);
      await new Promise((res) => setTimeout(res, 5));
    }
    const dir = join(root(), "var/lib/fleet-agent/backups");
    expect(readdirSync(dir).filter((f) => f.endsWith(".tar.gz"))).toHaveLength(2);
  });

  it.each<[string, object, S, string]>([
    ["a missing path", { paths: ["nope"] }, S.FAILED, "missing_path"],
    ["a bad name", { paths: ["etc"], name: "../x" }, S.REJECTED, "invalid_params"],
    ["no paths", { paths: [] }, S.REJECTED, "invalid_params"],
  ])("refuses %s", async (_n, params, state, reason) => {
    const r = await run({ id: "b", type: "backup", params });
    expect(r.job.state).toBe(state);
    expect(state === S.REJECTED ? r.job.reason : r.task?.reason).toBe(reason);
  });
});

describe("scan", () => {
  it("reports an inventory, and file integrity against a baseline", async () => {
    const d = join(root(), "opt/watched");
    mkdirSync(d, { recursive: true });
    writeFileSync(join(d, "keep"), "1");
    writeFileSync(join(d, "change"), "1");
    writeFileSync(join(d, "remove"), "1");
    const first = await run({ id: "s", type: "scan", params: { integrity: { paths: ["opt/watched"] } } });
    expect(first.job.state).toBe(S.SUCCEEDED);
    expect(first.task?.message).toMatch(/listening ports.*integrity baseline of 3 files/);
    const report = JSON.parse(first.task!.output!);
    expect(report.os.platform).toBe("linux");
    expect(report.memory.total).toBeGreaterThan(0);
    writeFileSync(join(d, "change"), "2");
    rmSync(join(d, "remove"));
    writeFileSync(join(d, "added"), "1");
    const second = await run({
      id: "s",
      type: "scan",
      params: { packages: false, integrity: { paths: ["opt/watched"] } },
    });
    expect(second.task?.message).toContain("integrity: 1 added, 1 removed, 1 changed");
    expect(JSON.parse(second.task!.output!).integrity).toEqual({
      added: ["opt/watched/added"],
      removed: ["opt/watched/remove"],
      changed: ["opt/watched/change"],
    });
  });

  it("refuses bad params", async () => {
    const r = await run({ id: "s", type: "scan", params: { integrity: { paths: [] } } });
    expect(r.job).toMatchObject({ state: S.REJECTED, reason: "invalid_params" });
  });
});

describe("reboot", () => {
  it("succeeds only once the agent runs again after the reboot (same attempt)", async () => {
    const jobId = await h.ctl.assign(agent.deviceId, jobSpec([{ id: "r", type: "reboot" }]));
    await h.ctl.waitFor(
      "reboot requested",
      () => h.ctl.latest(agent.deviceId, jobId, "r")?.state === S.RUNNING,
    );
    await new Promise((res) => setTimeout(res, 300));
    expect(h.ctl.latest(agent.deviceId, jobId, "")?.state).toBe(S.QUEUED);
    agent = await h.restartAgent(agent); // the dry-run system's "boot"
    const done = await h.ctl.waitJob(agent.deviceId, jobId);
    expect(done.state).toBe(S.SUCCEEDED);
    const t = h.ctl.statuses(agent.deviceId).filter((s) => s.jobId === jobId && s.taskId === "r");
    expect(t.at(-1)).toMatchObject({ state: S.SUCCEEDED, attempt: 1 });
    expect(t.at(-1)?.message).toMatch(/^rebooted/);
    // (The "resuming" QUEUED in between is coalesced with what follows it: outbox flush window.)
  });

  it("times out when the machine does not come back", async () => {
    const r = await run({ id: "r", type: "reboot", timeoutS: 1 });
    expect(r.job.state).toBe(S.TIMED_OUT);
  });
});
