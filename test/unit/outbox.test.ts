// The outbox's flush window (issue 17): statuses committed within it go out in one batch, a
// task's unsent non-terminal status is overwritten in place by its successor (same seq, so the
// controller's seq protocol is unchanged), terminal states and anything once sent are never
// overwritten, and nothing is sent from a seq whose overwrite is still on its way to disk.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ClassicLevel } from "classic-level";
import pino from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { type Op, Outbox } from "../../agent/outbox.js";
import type { GroupCommit } from "../../common/group-commit.js";
import { decodeEnvelope } from "../../proto/envelope.js";
import { TaskState, type TaskStatus } from "../../proto/index.js";

const cleanup: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

/** An outbox on a real LevelDB whose writes can be held back, and what it published. */
async function outbox(flushDelayMs: number, signals: { busy?: () => boolean; log?: pino.Logger } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "fleet-outbox-"));
  const db = new ClassicLevel<string, unknown>(dir);
  await db.open();
  let gate: Promise<void> = Promise.resolve();
  /** Writes to refuse (as a full disk would), of those `refusing` picks. */
  let refuse = 0;
  let refusing = (_ops: Op[]) => true;
  const writer = {
    write: async (ops: Op[]) => {
      await gate;
      if (refuse > 0 && refusing(ops)) {
        refuse--;
        throw new Error("disk full");
      }
      await db.batch(ops as never);
    },
  } as unknown as GroupCommit<Op>;
  const entries = db.sublevel<string, Uint8Array>("out", { valueEncoding: "view" });
  const meta = db.sublevel<string, unknown>("meta", { valueEncoding: "json" });
  const box = new Outbox(entries as never, meta as never, writer, 64 * 1024, flushDelayMs);
  await box.open(() => "epoch");
  const batches: TaskStatus[][] = [];
  box.start({
    log: pino({ level: "silent" }),
    publish: (payload) => {
      batches.push(decodeEnvelope(payload).statusBatch!.statuses!);
      return true;
    },
    maxBatchBytes: 64 * 1024,
    ...signals,
  });
  cleanup.push(async () => {
    box.stop();
    await db.close();
    rmSync(dir, { recursive: true, force: true });
  });
  const hold = () => {
    let open!: () => void;
    gate = new Promise((r) => {
      open = r;
    });
    return open;
  };
  const shown = () => batches.map((b) => b.map((s) => `${s.seq}:${s.taskId}:${TaskState[s.state!]}`));
  const failWrites = (n: number, which = (_ops: Op[]) => true) => {
    refuse = n;
    refusing = which;
  };
  return { box, batches, hold, shown, entries, meta, writer, failWrites };
}

const st = (taskId: string, state: TaskState, jobId = "j1"): TaskStatus => ({
  jobId,
  executionId: "",
  taskId,
  state,
});
const settle = (ms = 0) => new Promise((r) => setTimeout(r, ms));
const until = async (ok: () => boolean) => {
  for (let i = 0; i < 1000 && !ok(); i++) await settle(10);
};

describe("outbox flush window", () => {
  it("coalesces a task's transitions within the window into one record, seqs contiguous", async () => {
    const { box, shown, entries } = await outbox(1000);
    box.onConnected();
    await box.append([st("", TaskState.QUEUED)], [], true);
    await box.append([st("a", TaskState.RUNNING)], [], true);
    await box.append([st("a", TaskState.SUCCEEDED), st("", TaskState.SUCCEEDED)], [], true);
    expect(shown()).toEqual([]); // the window is still open
    box.flush();
    await settle(10);
    expect(shown()).toEqual([["1::QUEUED", "2:a:SUCCEEDED", "3::SUCCEEDED"]]);
    expect(box.lastSeq).toBe(3);
    // On disk too: the overwritten record, not a fourth one.
    expect(await entries.keys().all()).toHaveLength(3);
  });

  it("sends once the window closes, by itself", async () => {
    const { box, shown } = await outbox(30);
    box.onConnected();
    await box.append([st("a", TaskState.RUNNING)], [], true);
    await box.append([st("a", TaskState.FAILED)], [], true);
    await settle(100);
    expect(shown()).toEqual([["1:a:FAILED"]]);
  });

  it("sends at once when the agent goes idle, not a window after the last commit", async () => {
    const { box, shown } = await outbox(1000);
    box.onConnected();
    box.onIdle(); // nothing waits: nothing to send
    await box.append([st("", TaskState.QUEUED), st("a", TaskState.RUNNING)], [], true);
    await box.append([st("a", TaskState.SUCCEEDED), st("", TaskState.SUCCEEDED)], [], true);
    await settle(20);
    expect(shown()).toEqual([]); // the window (1 s) is open
    box.onIdle();
    await settle(20);
    expect(shown()).toEqual([["1::QUEUED", "2:a:SUCCEEDED", "3::SUCCEEDED"]]);
  });

  it("keeps a job's statuses in order: only the job's latest status is overwritten", async () => {
    const { box, shown } = await outbox(1000);
    box.onConnected();
    await box.append([st("b", TaskState.WAITING), st("a", TaskState.RUNNING)], [], true);
    await box.append([st("a", TaskState.SUCCEEDED)], [], true); // a's is the latest: in place
    await box.append([st("b", TaskState.RUNNING)], [], true); // a's came after b's: appended
    await box.append([st("b", TaskState.SUCCEEDED)], [], true); // now b's is the latest
    box.flush();
    await settle(10);
    expect(shown()).toEqual([["1:b:WAITING", "2:a:SUCCEEDED", "3:b:SUCCEEDED"]]);
  });

  it("never overwrites a terminal status or one already sent", async () => {
    const { box, shown } = await outbox(0);
    box.onConnected();
    await box.append([st("a", TaskState.RUNNING)], [], true); // sent at once
    await settle(10);
    await box.append([st("a", TaskState.SUCCEEDED)], [], true);
    await settle(10);
    expect(shown()).toEqual([["1:a:RUNNING"], ["2:a:SUCCEEDED"]]);

    const late = await outbox(1000);
    late.box.onConnected();
    await late.box.append([st("b", TaskState.CANCELED)], [], true);
    await late.box.append([st("b", TaskState.QUEUED)], [], true); // (a new status after a terminal one)
    late.box.flush();
    await settle(10);
    expect(late.shown()).toEqual([["1:b:CANCELED", "2:b:QUEUED"]]);
  });

  it("without a flush window (0) every change is kept, also while offline", async () => {
    const { box, shown } = await outbox(0);
    await box.append([st("a", TaskState.WAITING)], [], true); // not connected: unsent
    await box.append([st("a", TaskState.RUNNING)], [], true);
    box.onConnected();
    await settle(10);
    expect(shown()).toEqual([["1:a:WAITING", "2:a:RUNNING"]]);
  });

  it("sends nothing from a seq whose overwrite is not yet on disk", async () => {
    const { box, shown, hold } = await outbox(1000);
    box.onConnected();
    await box.append([st("a", TaskState.RUNNING), st("b", TaskState.RUNNING, "j2")], [], true);
    const open = hold();
    const pending = box.append([st("a", TaskState.SUCCEEDED)], [], true);
    box.flush(); // e.g. an ack or a reconnect while the overwrite is being written
    await settle(10);
    expect(shown()).toEqual([]); // neither a's old RUNNING nor what follows it
    open();
    await pending;
    box.flush();
    await settle(10);
    expect(shown()).toEqual([["1:a:SUCCEEDED", "2:b:RUNNING"]]);
  });
});

describe("outbox flush window while a commit is on its way", () => {
  it("past the longest window it waits for a commit then on its way (only then sends)", async () => {
    // flushDelayMs 2: the longest window is 50 × 2 = 100 ms.
    const { box, shown, hold } = await outbox(2, { busy: () => true });
    box.onConnected();
    await box.append([st("a", TaskState.RUNNING)], [], true);
    const land = hold(); // the next write (its successor) takes long: a loaded disk
    const successor = box.append([st("a", TaskState.SUCCEEDED)], [], true);
    await settle(300);
    expect(shown()).toEqual([]); // held past the longest window: a commit is on its way
    land();
    await successor;
    await until(() => shown().length > 0);
    expect(shown()).toEqual([["1:a:SUCCEEDED"]]); // one batch, the RUNNING overwritten

    // Busy with no commit on its way: sent after the longest window, as before.
    const idle = await outbox(2, { busy: () => true });
    idle.box.onConnected();
    await idle.box.append([st("c", TaskState.RUNNING)], [], true);
    await until(() => idle.shown().length > 0);
    expect(idle.shown()).toEqual([["1:c:RUNNING"]]);
  });

  it("counts the longest window in checks: a saturated event loop holds a batch longer", async () => {
    // flushDelayMs 10: 50 windows are 500 ms where timers fire on time. Here every turn of the
    // loop takes 25 ms (a saturated agent), so 50 checks take well over a second.
    const { box, shown } = await outbox(10, { busy: () => true });
    box.onConnected();
    const saturate = setInterval(() => {
      const t = Date.now();
      while (Date.now() - t < 25);
    }, 0);
    try {
      await box.append([st("c", TaskState.RUNNING)], [], true);
      await settle(700);
      expect(shown()).toEqual([]); // a wall-clock bound (500 ms) would have sent it by now
    } finally {
      clearInterval(saturate);
    }
    await until(() => shown().length > 0);
    expect(shown()).toEqual([["1:c:RUNNING"]]);
  });
});

describe("outbox after a failed write", () => {
  const lost = (s: TaskStatus) => `${s.seq}:${s.taskId}:${s.state ? TaskState[s.state] : s.reason}`;

  it("fills the seqs of a failed write, so the statuses after it still reach the controller in order", async () => {
    const { box, batches, failWrites, entries } = await outbox(0);
    box.onConnected();
    await box.append([st("a", TaskState.RUNNING, "j1")], [], true); // seq 1
    await until(() => batches.length === 1);
    failWrites(1); // the write of seq 2
    await expect(box.append([st("a", TaskState.SUCCEEDED, "j1")], [], true)).rejects.toThrow("disk full");
    const key2 = (2).toString(16).padStart(16, "0");
    failWrites(1, (ops) => ops.some((o) => o.key === key2)); // and the first try to fill it
    await box.append([st("b", TaskState.SUCCEEDED, "j2")], [], true); // seq 3: on disk, held back
    await settle(50);
    expect(batches.flat().map(lost)).toEqual(["1:a:RUNNING"]);
    // The disk takes the fill on a retry: seq 2 says what was lost, then seq 3 goes out.
    await until(() => batches.flat().length === 3);
    expect(batches.flat().map(lost)).toEqual(["1:a:RUNNING", "2:a:lost_write", "3:b:SUCCEEDED"]);
    expect(batches.flat()[1]).toMatchObject({ jobId: "j1", taskId: "a", state: 0 });
    expect((await entries.keys().all()).length).toBe(3);
  });

  it("fills at start a hole an earlier run left on disk", async () => {
    const { box, entries, meta, writer } = await outbox(0);
    await box.append([st("a", TaskState.SUCCEEDED, "j1")], [], true); // 1
    await box.append([st("a", TaskState.SUCCEEDED, "j2")], [], true); // 2
    await box.append([st("a", TaskState.SUCCEEDED, "j3")], [], true); // 3
    await box.append([st("a", TaskState.SUCCEEDED, "j4")], [], true); // 4
    box.stop();
    await entries.del((2).toString(16).padStart(16, "0")); // as a failed write of an older agent left it
    const again = new Outbox(entries as never, meta as never, writer, 64 * 1024, 0);
    await again.open(() => "epoch");
    expect((await again.pending(0, 10)).map(lost)).toEqual([
      "1:a:SUCCEEDED",
      "2::lost_write",
      "3:a:SUCCEEDED",
      "4:a:SUCCEEDED",
    ]);
    expect((await again.append([st("a", TaskState.SUCCEEDED, "j5")], [], true))[0]!.seq).toBe(5);
  });
});

describe("outbox acknowledgements", () => {
  it("an ack writes one mark; acknowledged entries are cleared in bulk, and what a restart left too", async () => {
    const { box, shown, entries, meta, writer } = await outbox(0);
    box.onConnected();
    for (let i = 0; i < 100; i++) await box.append([st("a", TaskState.SUCCEEDED, `j${i}`)], [], true);
    await settle(10);
    expect(shown().flat()).toHaveLength(100);
    await box.onAck(10);
    expect(await box.pendingCount()).toBe(90);
    expect(await entries.keys().all()).toHaveLength(100); // dead, not yet cleared
    await box.onAck(70); // 64 or more acknowledged since the last clear: cleared at once
    await box.settled();
    expect(await box.pendingCount()).toBe(30);
    expect(await entries.keys().all()).toHaveLength(30);
    await box.onAck(80);
    await box.settled();
    expect(await entries.keys().all()).toHaveLength(30); // 10 dead ones wait for more
    // A restart: the next outbox on the same database clears them, and goes on after seq 100.
    box.stop();
    const again = new Outbox(entries as never, meta as never, writer, 64 * 1024, 0);
    await again.open(() => "epoch");
    await again.settled();
    expect(await entries.keys().all()).toHaveLength(20);
    expect(again.lastAckedSeq).toBe(80);
    expect(await again.pending(0, 100)).toHaveLength(20);
    expect((await again.append([st("a", TaskState.SUCCEEDED, "jz")], [], true))[0]!.seq).toBe(101);
  });

  it("a lost ack (acks go at QoS 0) is repaired: a stalled outbox is sent again and the next ack releases it", async () => {
    vi.useFakeTimers({ toFake: ["setInterval", "clearInterval", "Date"] });
    try {
      const warned: string[] = [];
      const log = { warn: (_o: unknown, msg: string) => warned.push(msg) } as unknown as pino.Logger;
      const { box, shown } = await outbox(0, { log });
      box.onConnected();
      await box.append([st("a", TaskState.SUCCEEDED, "j1")], [], true);
      await box.append([st("a", TaskState.SUCCEEDED, "j2")], [], true);
      await until(() => shown().flat().length === 2);
      // The controller's ack never arrives. Within the re-send time nothing is sent again ...
      vi.advanceTimersByTime(10_000);
      await settle(20);
      expect(shown().flat()).toHaveLength(2);
      // ... after it, everything unacknowledged is.
      vi.advanceTimersByTime(10_000);
      await until(() => shown().flat().length === 4);
      expect(shown().slice(-1)).toEqual([["1:a:SUCCEEDED", "2:a:SUCCEEDED"]]);
      expect(warned).toEqual(["no status ack; re-sending the outbox"]);
      await box.onAck(2); // the controller acknowledges the re-sent (already applied) batch
      expect(await box.pendingCount()).toBe(0);
      vi.advanceTimersByTime(60_000);
      await settle(20);
      expect(shown().flat()).toHaveLength(4); // and nothing more goes out
    } finally {
      vi.useRealTimers();
    }
  });

  it("the wait for an ack starts when a batch goes out, not at the last ack before an idle hour", async () => {
    vi.useFakeTimers({ toFake: ["setInterval", "clearInterval", "Date"] });
    try {
      const { box, shown } = await outbox(0);
      box.onConnected();
      await box.append([st("a", TaskState.SUCCEEDED, "j1")], [], true);
      await until(() => shown().flat().length === 1);
      await box.onAck(1);
      vi.advanceTimersByTime(3_600_000); // an idle hour: nothing outstanding
      await box.append([st("a", TaskState.SUCCEEDED, "j2")], [], true);
      await until(() => shown().flat().length === 2);
      // The next stall check comes within 5 s, the ack has not (a loaded controller): not
      // a stall yet. (It was: the last progress was an hour ago, so 27% of the jobs of a
      // 10,000-device rollout went out twice.)
      vi.advanceTimersByTime(6_000);
      await settle(20);
      expect(shown().flat()).toHaveLength(2);
      vi.advanceTimersByTime(15_000); // now it is one
      await until(() => shown().flat().length === 3);
    } finally {
      vi.useRealTimers();
    }
  });

  it("a clear that fails is logged and done again at the next ack; nothing pending is touched", async () => {
    const warned: string[] = [];
    const log = { warn: (_o: unknown, msg: string) => warned.push(msg) } as unknown as pino.Logger;
    const { box, entries } = await outbox(0, { log });
    box.onConnected();
    for (let i = 0; i < 80; i++) await box.append([st("a", TaskState.SUCCEEDED, `j${i}`)], [], true);
    const clear = entries.clear.bind(entries) as (o: object) => Promise<void>;
    let fail = true;
    (entries as unknown as { clear: (o: object) => Promise<void> }).clear = (o) =>
      fail ? Promise.reject(new Error("disk full")) : clear(o);
    await box.onAck(70);
    await box.settled();
    expect(warned).toEqual(["cannot clear acknowledged statuses (retried later)"]);
    expect(await entries.keys().all()).toHaveLength(80); // still there, dead
    expect(await box.pendingCount()).toBe(10);
    fail = false;
    await box.onAck(71);
    await box.settled();
    expect(await entries.keys().all()).toHaveLength(9);
    expect((await box.pending(0, 100)).map((s) => s.seq)).toEqual([72, 73, 74, 75, 76, 77, 78, 79, 80]);
  });
});
