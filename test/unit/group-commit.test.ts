// Group commit's native path (issue 17): on an open classic-level root it encodes operations
// itself and calls the database's own batch. What lands on disk must be byte for byte what
// abstract-level's `batch()` writes for the same operations, and anything the native path does
// not cover (a prewrite hook, a `write` listener, another database's sublevel, a bad operation)
// must go through `batch()` with its behaviour and its errors.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ClassicLevel } from "classic-level";
import { afterEach, describe, expect, it } from "vitest";
import { GroupCommit } from "../../common/group-commit.js";

const cleanup: Array<() => Promise<void>> = [];
afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

async function level(valueEncoding = "json") {
  const dir = mkdtempSync(join(tmpdir(), "fleet-gc-"));
  const db = new ClassicLevel<string, unknown>(dir, { valueEncoding });
  await db.open();
  cleanup.push(async () => {
    await db.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return db;
}

/** Every key and value as stored, in hex. */
async function raw(db: ClassicLevel<string, unknown>): Promise<Array<[string, string]>> {
  const out: Array<[string, string]> = [];
  for await (const [k, v] of db.iterator({ keyEncoding: "buffer", valueEncoding: "buffer" }))
    out.push([(k as unknown as Buffer).toString("hex"), (v as unknown as Buffer).toString("hex")]);
  return out;
}

/** Counts the calls of `db.batch()` (the path the native one replaces). */
function countBatchCalls(db: ClassicLevel<string, unknown>): { n: number } {
  const calls = { n: 0 };
  const batch = db.batch.bind(db);
  db.batch = ((...a: Parameters<typeof batch>) => {
    calls.n++;
    return batch(...a);
  }) as typeof db.batch;
  return calls;
}

/** The same mixed operations (as the agent's store and the controller's write them) on a db. */
function ops(db: ClassicLevel<string, unknown>, round: number) {
  const job = db.sublevel<string, unknown>("dev-1:job", { valueEncoding: "json" });
  const out = db.sublevel<string, Uint8Array>("dev-1:out", { valueEncoding: "view" });
  const nested = db.sublevel("site").sublevel<string, unknown>("exec", { valueEncoding: "json" });
  const text = db.sublevel<string, string>("txt", { valueEncoding: "utf8" });
  return [
    { type: "put", sublevel: job, key: `j${round}`, value: { id: `j${round}`, tasks: { a: { state: 2 } } } },
    {
      type: "put",
      sublevel: out,
      key: String(round).padStart(16, "0"),
      value: new Uint8Array([round, 0, 255, 7]),
    },
    { type: "put", sublevel: nested, key: "j!1", value: [round, "é", null] },
    { type: "put", sublevel: text, key: "plain", value: `ünï ${round}` },
    { type: "put", key: "root", value: { round } }, // the root's own (json) encoding
    { type: "put", sublevel: job, key: "as-bytes", value: Buffer.from("raw"), valueEncoding: "buffer" },
    { type: "del", sublevel: out, key: String(round - 1).padStart(16, "0") },
    { type: "del", sublevel: job, key: "never-there" },
  ] as never[];
}

describe("GroupCommit", () => {
  it("writes, through the native batch, the very bytes batch() writes", async () => {
    const viaBatch = await level();
    const viaGroup = await level();
    const batchCalls = countBatchCalls(viaGroup);
    const group = new GroupCommit(viaGroup as never);
    for (let round = 1; round <= 3; round++) {
      await viaBatch.batch(ops(viaBatch, round));
      // two callers in one group, as concurrent agents' writes are
      await Promise.all([
        group.write(ops(viaGroup, round).slice(0, 4), true),
        group.write(ops(viaGroup, round).slice(4), false),
      ]);
    }
    expect(batchCalls.n).toBe(0); // the native path was taken
    const stored = await raw(viaGroup);
    expect(stored).toEqual(await raw(viaBatch));
    expect(stored.length).toBe(8);
    // and reads back through the ordinary sublevel API
    const out = viaGroup.sublevel<string, Uint8Array>("dev-1:out", { valueEncoding: "view" });
    expect([...((await out.get(String(3).padStart(16, "0"))) ?? [])]).toEqual([3, 0, 255, 7]);
    expect(await viaGroup.sublevel("site").sublevel("exec", { valueEncoding: "json" }).get("j!1")).toEqual([
      3,
      "é",
      null,
    ]);
  });

  it("leaves to batch() a prewrite hook, a write listener, another database's sublevel and bad operations", async () => {
    const db = await level();
    const other = await level();
    const group = new GroupCommit(db as never);
    const batchCalls = countBatchCalls(db);
    const seen: string[] = [];
    const hook = (op: { key: string }) => seen.push(`hook ${op.key}`);
    db.hooks.prewrite.add(hook as never);
    await group.write([{ type: "put", key: "a", value: 1 }] as never[], false);
    db.hooks.prewrite.delete(hook as never);
    const listener = (o: Array<{ key: string }>) => seen.push(`event ${o[0]!.key}`);
    db.on("write", listener);
    await group.write([{ type: "put", key: "b", value: 2 }] as never[], false);
    db.off("write", listener);
    expect(seen).toEqual(["hook a", "event b"]);

    expect(batchCalls.n).toBe(2);
    const foreign = other.sublevel<string, unknown>("x", { valueEncoding: "json" });
    await group.write([{ type: "put", sublevel: foreign, key: "k", value: 3 }] as never[], false);
    expect(batchCalls.n).toBe(3); // whatever batch() makes of it, the native path does not guess

    await expect(
      group.write([{ type: "put", key: "v", value: undefined }] as never[], false),
    ).rejects.toThrow(/value cannot be .*undefined/i);
    await expect(group.write([{ type: "frob", key: "v" }] as never[], false)).rejects.toThrow(
      /'put' or 'del'/,
    );
    await expect(group.write([{ type: "put", key: null, value: 1 }] as never[], false)).rejects.toThrow(
      /key cannot be/i,
    );
    expect(batchCalls.n).toBe(6);
    await group.write([{ type: "put", key: "c", value: 4 }] as never[], false);
    expect(batchCalls.n).toBe(6); // and back on the native path
    expect(await db.get("c")).toBe(4);
  });

  it("reports a failed write to every caller of the group, and writes again afterwards", async () => {
    const db = await level();
    const group = new GroupCommit(db as never);
    await db.close();
    const a = group.write([{ type: "put", key: "a", value: 1 }] as never[], true);
    await expect(a).rejects.toThrow(/not open/i);
    await db.open();
    await group.write([{ type: "put", key: "a", value: 1 }] as never[], true);
    expect(await db.get("a")).toBe(1);
  });
});
