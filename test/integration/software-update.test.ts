// The software-update task through a real agent (in-process), against a test artifact server
// that can misbehave.
import { existsSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Agent } from "../../agent/agent.js";
import { httpArtifactSource } from "../../agent/artifacts.js";
import { TaskState as S, type TaskStatus } from "../../proto/index.js";
import { generateSigningKey } from "../../proto/signing.js";
import { type ArtifactServer, makeRelease, serve, startArtifactServer } from "../helpers/artifacts.js";
import { type Harness, harness } from "../helpers/harness.js";
import { jobSpec, tempDir } from "../helpers/keys.js";

let h: Harness;
let srv: ArtifactServer;
const work = tempDir("fleet-rel-");
let n = 0;

beforeAll(async () => {
  h = await harness();
  srv = await startArtifactServer();
  for (const [v, o] of [
    ["1.0.0", {}],
    ["1.1.0", { padding: 200_000 }],
    ["1.2.0", { healthExit: 1 }],
    ["0.9.0", {}],
    ["2.0.0", { foreignOwner: 1000 }],
  ] as const)
    serve(srv, makeRelease(work.dir, "app", v, o));
});
afterAll(async () => {
  await h.close();
  await srv.close();
  work.cleanup();
});

async function device(): Promise<Agent> {
  return h.newAgent(
    `upd-${++n}`,
    { systemDryRun: true },
    { artifacts: httpArtifactSource(srv.url, { deviceId: "x", password: "y" }) },
  );
}

async function update(
  agent: Agent,
  version: string,
  extra: Record<string, unknown> = {},
  task: Record<string, unknown> = {},
): Promise<{ job: TaskStatus; task: TaskStatus }> {
  const params = {
    artifact: "app",
    version,
    target: "opt/app",
    healthCheck: { command: ["./health.sh"], timeoutS: 10 },
    ...extra,
  };
  const jobId = await h.ctl.assign(
    agent.deviceId,
    jobSpec([{ id: "u", type: "software-update", params, ...task }]),
  );
  const job = await h.ctl.waitJob(agent.deviceId, jobId);
  return { job, task: h.ctl.latest(agent.deviceId, jobId, "u")! };
}

const current = (a: Agent) => readlinkSync(join(a.config.root, "opt/app/current"));
const currentVersion = (a: Agent) =>
  readFileSync(join(a.config.root, "opt/app/current/VERSION"), "utf8").trim();

describe("software-update", () => {
  it("installs, updates, rolls back a failing health check, refuses and allows a downgrade", async () => {
    const a = await device();
    expect((await update(a, "1.0.0")).job.state).toBe(S.SUCCEEDED);
    expect(current(a)).toBe("releases/1.0.0"); // relative link
    expect(currentVersion(a)).toBe("1.0.0");
    const up = await update(a, "1.1.0");
    expect(up.task).toMatchObject({
      state: S.SUCCEEDED,
      message: "app 1.1.0 installed (was releases/1.0.0)",
    });
    expect(currentVersion(a)).toBe("1.1.0");
    const bad = await update(a, "1.2.0");
    expect(bad.task).toMatchObject({ state: S.FAILED, reason: "rolled_back" });
    expect(bad.task.message).toMatch(
      /health check failed: \.\/health\.sh exit code 1: health of 1\.2\.0; rolled back to releases\/1\.1\.0/,
    );
    expect(currentVersion(a)).toBe("1.1.0");
    const down = await update(a, "0.9.0");
    expect(down.task).toMatchObject({ state: S.FAILED, reason: "downgrade_refused" });
    expect((await update(a, "0.9.0", { allowDowngrade: true })).job.state).toBe(S.SUCCEEDED);
    expect(currentVersion(a)).toBe("0.9.0");
    // The last two releases are kept (0.9.0 and 1.1.0); 1.0.0 was pruned.
    expect(existsSync(join(a.config.root, "opt/app/releases/1.1.0"))).toBe(true);
    expect(existsSync(join(a.config.root, "opt/app/releases/1.0.0"))).toBe(false);
    const again = await update(a, "0.9.0", { allowDowngrade: true });
    expect(again.task.message).toBe("app 0.9.0 is already installed");
  });

  it("rejects a corrupted artifact (sha256) and a tampered or foreign manifest (signature)", async () => {
    const a = await device();
    srv.mode.corrupt = true;
    try {
      const r = await update(a, "1.0.0");
      expect(r.task).toMatchObject({ state: S.FAILED, reason: "corrupt_artifact" });
    } finally {
      srv.mode.corrupt = false;
    }
    expect(existsSync(join(a.config.root, "opt/app/current"))).toBe(false);
    const foreign = serve(
      srv,
      makeRelease(work.dir, "app", "3.0.0", { key: generateSigningKey().privateKeyPem }),
    );
    expect((await update(a, foreign.version)).task).toMatchObject({
      state: S.FAILED,
      reason: "bad_manifest",
    });
    const real = makeRelease(work.dir, "app", "3.1.0");
    const tampered = Buffer.from(real.signed);
    tampered[10] = (tampered[10] ?? 0) ^ 0x01;
    serve(srv, { ...real, signed: tampered });
    expect((await update(a, "3.1.0")).task).toMatchObject({ state: S.FAILED, reason: "bad_manifest" });
  });

  it("a URL health check: 2xx keeps the update, 500 rolls it back", async () => {
    const a = await device();
    expect((await update(a, "1.0.0", { healthCheck: { url: `${srv.url}/health/ok` } })).job.state).toBe(
      S.SUCCEEDED,
    );
    const r = await update(a, "1.1.0", { healthCheck: { url: `${srv.url}/health/bad`, timeoutS: 5 } });
    expect(r.task).toMatchObject({ state: S.FAILED, reason: "rolled_back" });
    expect(r.task.message).toContain("/health/bad answered 500");
    expect(currentVersion(a)).toBe("1.0.0");
  });

  it("checks free disk space against the artifact's size", async () => {
    const a = await h.newAgent(
      `upd-${++n}`,
      { systemDryRun: true },
      {
        artifacts: httpArtifactSource(srv.url, { deviceId: "x", password: "y" }),
        extraFacts: { "disk.free": 1000 },
      },
    );
    expect((await update(a, "1.1.0")).task).toMatchObject({ state: S.FAILED, reason: "insufficient_disk" });
  });

  it("refuses incompatible hardware", async () => {
    const a = await device();
    serve(srv, makeRelease(work.dir, "app", "4.0.0", { hardware: ["riscv64-board"] }));
    expect((await update(a, "4.0.0")).task).toMatchObject({
      state: S.FAILED,
      reason: "incompatible_hardware",
    });
  });

  it("resumes an interrupted download with Range: at most one chunk fetched twice", async () => {
    const a = await device();
    srv.sent.length = 0;
    srv.mode.cutAfter = 120_000;
    const r = await update(a, "1.1.0", {}, { retry: { maxAttempts: 3, backoffS: 0.1 } });
    expect(r.job.state).toBe(S.SUCCEEDED);
    const size = srv.releases.get("app@1.1.0")!.bytes.length;
    expect(srv.sent[0]).toBe(120_000);
    expect(srv.sent.reduce((x, y) => x + y, 0)).toBe(size); // the second request asked only for the rest
    const statuses = h.ctl.statuses(a.deviceId).filter((s) => s.taskId === "u");
    expect(statuses.some((s) => s.state === S.WAITING && s.reason === "retry_backoff")).toBe(true);
  });

  it("aborts a server that sends more than the manifest says, and one that trickles", async () => {
    const a = await device();
    srv.mode.extra = 5000;
    try {
      expect((await update(a, "1.0.0")).task).toMatchObject({
        state: S.FAILED,
        reason: "oversized_download",
      });
    } finally {
      srv.mode.extra = undefined;
    }
    srv.mode.trickleMs = 1000;
    try {
      const r = await update(a, "1.0.0", { stallTimeoutS: 0.3 });
      expect(r.task).toMatchObject({ state: S.FAILED, reason: "download_stalled" });
    } finally {
      srv.mode.trickleMs = undefined;
    }
  });

  it("with rebootRequired, succeeds only after the agent comes back; rolls back when it does not in time", async () => {
    let a = await device();
    expect((await update(a, "1.0.0")).job.state).toBe(S.SUCCEEDED);
    const jobId = await h.ctl.assign(
      a.deviceId,
      jobSpec([
        {
          id: "u",
          type: "software-update",
          params: { artifact: "app", version: "1.1.0", target: "opt/app", rebootRequired: true },
        },
      ]),
    );
    const saved = async () => (await a.store.kv.get<{ state: string }>(`update/${jobId}//u`))?.state;
    const deadline = Date.now() + 20_000;
    while ((await saved()) !== "REBOOTING" && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
    expect(await saved()).toBe("REBOOTING");
    await new Promise((r) => setTimeout(r, 1200));
    expect(h.ctl.latest(a.deviceId, jobId, "")?.state).toBe(S.QUEUED);
    a = await h.restartAgent(a); // the dry-run system's "reboot"
    expect((await h.ctl.waitJob(a.deviceId, jobId)).state).toBe(S.SUCCEEDED);
    expect(currentVersion(a)).toBe("1.1.0");
    // Unconfirmed: no reboot happens before the deadline.
    const r = await update(a, "1.2.0", { rebootRequired: true, rebootDeadlineS: 1, healthCheck: undefined });
    expect(r.task).toMatchObject({ state: S.FAILED, reason: "rolled_back" });
    expect(r.task.message).toContain("did not confirm after a reboot");
    expect(currentVersion(a)).toBe("1.1.0");
  });

  it("unpacks as the agent's user, without setuid or setgid bits (M6)", async () => {
    const a = await device();
    const r = await update(a, "2.0.0");
    expect(r.job.state).toBe(S.SUCCEEDED);
    for (const f of ["suid", "health.sh", "VERSION"]) {
      const st = statSync(join(a.config.root, "opt/app/releases/2.0.0", f));
      expect(st.uid, f).toBe(process.getuid!());
      expect(st.mode & 0o7000, f).toBe(0);
    }
    expect(statSync(join(a.config.root, "opt/app/releases/2.0.0/health.sh")).mode & 0o111).toBeTruthy();
  });

  it("refuses bad params", async () => {
    const a = await device();
    const jobId = await h.ctl.assign(
      a.deviceId,
      jobSpec([
        {
          id: "u",
          type: "software-update",
          params: { artifact: "app", version: "1.0.0", target: "opt/app", healthCheck: {} },
        },
      ]),
    );
    expect(await h.ctl.waitJob(a.deviceId, jobId)).toMatchObject({
      state: S.REJECTED,
      reason: "invalid_params",
    });
  });
});
