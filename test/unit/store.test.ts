// The agent's store on a real LevelDB: signed jobs kept as bytes, records of older versions
// (signed job as base64 in the JSON record) still load, and statuses enter the outbox only
// with the state they describe.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ClassicLevel } from "classic-level";
import { afterEach, describe, expect, it } from "vitest";
import { AgentStore, type Db } from "../../agent/store.js";
import { TaskState } from "../../proto/index.js";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
const open = async () => {
  const dir = mkdtempSync(join(tmpdir(), "fleet-store-"));
  dirs.push(dir);
  const store = new AgentStore(new ClassicLevel(dir) as unknown as Db);
  await store.open();
  return { store, dir };
};

describe("agent store", () => {
  it("keeps the signed job as bytes and reads records written by older agents", async () => {
    const { store, dir } = await open();
    const signed = Uint8Array.from([10, 3, 1, 2, 3]);
    const job = { jobId: "new", digest: "d", signed, receivedAt: 1, expiresAt: 2 };
    await store.commit({ jobs: [job] }, true);
    // An agent of the previous version stored the SignedJob as base64 inside the JSON record.
    await store.jobs.put("old", {
      jobId: "old",
      digest: "e",
      signed: Buffer.from([7, 7]).toString("base64"),
      receivedAt: 1,
      expiresAt: 2,
    });
    await store.close();
    const again = new AgentStore(new ClassicLevel(dir) as unknown as Db);
    await again.open();
    const jobs = new Map((await again.loadJobs()).map((j) => [j.jobId, j]));
    expect([...jobs.get("new")!.signed]).toEqual([...signed]);
    expect([...jobs.get("old")!.signed]).toEqual([7, 7]);
    expect(await again.jobs.get("new")).not.toHaveProperty("signed");
    await again.close();
  });

  it("numbers statuses in commit order and keeps them until acknowledged, across a reopen", async () => {
    const { store, dir } = await open();
    const s = (jobId: string) => ({ jobId, taskId: "", state: TaskState.QUEUED, atMs: 1 });
    const a = await store.commit({ statuses: [s("a"), s("b")] }, true);
    const b = await store.commit({ statuses: [s("c")] }, false);
    expect([...a, ...b].map((x) => x.seq)).toEqual([1, 2, 3]);
    await store.outbox.onAck(2);
    expect(await store.outbox.pendingCount()).toBe(1);
    await store.close();
    const again = new AgentStore(new ClassicLevel(dir) as unknown as Db);
    await again.open();
    expect(again.outbox.lastAckedSeq).toBe(2);
    expect((await again.outbox.pending(0, 10)).map((x) => x.jobId)).toEqual(["c"]);
    expect((await again.commit({ statuses: [s("d")] }, true))[0]!.seq).toBe(4);
    expect(again.outbox.epoch).toMatch(/^[0-9a-f]{16}$/);
    await again.close();
  });
});
