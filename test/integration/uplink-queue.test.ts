// A gateway's store-and-forward queue (agent/uplink-queue.ts, DESIGN.md §11) on real LevelDB:
// bounded by bytes, telemetry dropped first and oldest first, statuses never dropped, kept across
// a restart, sent in arrival order, and what could not be sent stays for the next time.
import { ClassicLevel } from "classic-level";
import { afterEach, describe, expect, it } from "vitest";
import type { Db } from "../../agent/store.js";
import { UplinkQueue } from "../../agent/uplink-queue.js";
import { Counters } from "../../common/counters.js";
import { quietLog } from "../helpers/harness.js";
import { tempDir } from "../helpers/keys.js";

const dirs: Array<{ cleanup(): void }> = [];
const dbs: Db[] = [];
afterEach(async () => {
  for (const db of dbs.splice(0)) await db.close();
  for (const d of dirs.splice(0)) d.cleanup();
});

async function open(dir: string, maxBytes: number) {
  const db = new ClassicLevel<string, unknown>(dir, { valueEncoding: "json" }) as unknown as Db;
  await db.open();
  dbs.push(db);
  const counters = new Counters();
  const q = new UplinkQueue({ db, maxBytes, log: quietLog, counters });
  await q.load();
  return { db, q, counters };
}

const body = (n: number, tag: string) => Buffer.from(tag.padEnd(n, "."));

async function drainAll(q: UplinkQueue, accept = (_topic: string) => true) {
  const got: string[] = [];
  await q.drain(async (topic, payload) => {
    if (!accept(topic)) return false;
    got.push(`${topic}:${payload.toString().replace(/\.+$/, "")}`);
    return true;
  });
  return got;
}

describe("uplink queue", () => {
  it("keeps arrival order and survives a restart", async () => {
    const d = tempDir("fleet-uq-");
    dirs.push(d);
    const first = await open(d.dir, 1 << 20);
    for (let i = 0; i < 100; i++)
      await first.q.push(i % 3 ? "t" : "s", body(50, `m${i}`), i % 3 ? "telemetry" : "status", 1);
    expect(first.q.length).toBe(100);
    await first.db.close();
    dbs.splice(dbs.indexOf(first.db), 1);
    const again = await open(d.dir, 1 << 20);
    expect(again.q.length).toBe(100);
    expect(again.counters.get("gateway_queue_messages")).toBe(100);
    const got = await drainAll(again.q);
    expect(got).toEqual(Array.from({ length: 100 }, (_, i) => `${i % 3 ? "t" : "s"}:m${i}`));
    expect(again.q.length).toBe(0);
    expect(again.counters.get("gateway_queue_bytes")).toBe(0);
    // Pushed after the drain: numbered after what was there, so still in order after a restart.
    await again.q.push("s", body(10, "late"), "status", 1);
    expect(await drainAll(again.q)).toEqual(["s:late"]);
  });

  it("drops the oldest telemetry first when full, never a status", async () => {
    const d = tempDir("fleet-uq-");
    dirs.push(d);
    const { q, counters } = await open(d.dir, 10 * 101);
    // 10 entries of 101 bytes (100 payload + 1 topic) fill it.
    for (let i = 0; i < 10; i++)
      await q.push(i < 5 ? "s" : "t", body(100, `m${i}`), i < 5 ? "status" : "telemetry", 1);
    expect(q.bytes).toBe(1010);
    // Two more statuses: the two oldest telemetry messages go.
    expect(await q.push("s", body(100, "m10"), "status", 1)).toBe(true);
    expect(await q.push("s", body(100, "m11"), "status", 1)).toBe(true);
    expect(counters.get("gateway_queue_dropped_telemetry")).toBe(2);
    // Telemetry pushes out older telemetry, too.
    expect(await q.push("t", body(100, "m12"), "telemetry", 0)).toBe(true);
    // Statuses push out the rest of the telemetry; with only statuses left, the next status is
    // refused (it stays in its device's outbox) and counted — no status is ever dropped.
    for (let i = 13; i < 18; i++) await q.push("s", body(100, `m${i}`), "status", 1);
    expect(counters.get("gateway_queue_dropped_telemetry")).toBe(6);
    expect(counters.get("gateway_queue_full")).toBe(2);
    expect(await drainAll(q)).toEqual(
      ["m0", "m1", "m2", "m3", "m4", "m10", "m11", "m13", "m14", "m15"].map((m) => `s:${m}`),
    );
  });

  it("keeps what could not be sent (the uplink went down mid-drain)", async () => {
    const d = tempDir("fleet-uq-");
    dirs.push(d);
    const { q } = await open(d.dir, 1 << 20);
    for (let i = 0; i < 200; i++) await q.push(i < 100 ? "a" : "b", body(20, `m${i}`), "status", 1);
    const first = await drainAll(q, (topic) => topic === "a");
    expect(first.length).toBe(100);
    expect(q.length).toBe(100);
    const rest = await drainAll(q);
    expect(rest).toEqual(Array.from({ length: 100 }, (_, i) => `b:m${i + 100}`));
  });
});
