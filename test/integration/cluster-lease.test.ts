// The controller lease in Redis (broker/cluster.ts), against a real redis-server: one holder at
// a time, a standby takes over when the holder lets go, and a holder whose lease was taken
// stops with the reason.
import pino from "pino";
import { afterAll, beforeAll, expect, it } from "vitest";
import { Cluster } from "../../broker/cluster.js";
import { type External, startRedis } from "../helpers/external.js";
import { waitUntil } from "../helpers/fleet.js";

let redis: External;
const log = pino({ level: "silent" });
const nodes: Cluster[] = [];
const node = (nodeId: string) => {
  const c = new Cluster({ url: redis.url, nodeId, prefix: "lease-test", leaseMs: 1500, log });
  nodes.push(c);
  return c;
};

beforeAll(async () => {
  redis = await startRedis();
});
afterAll(async () => {
  for (const n of nodes) await n.stop().catch(() => {});
  redis?.stop();
});

it("one leader; the standby takes over when it stops; a leader whose lease is taken is told why", async () => {
  const a = node("a");
  const b = node("b");
  await a.connect();
  await b.connect();
  const leaders: string[] = [];
  const lost: string[] = [];
  a.campaign(
    async () => void leaders.push("a"),
    (why) => lost.push(`a: ${why}`),
  );
  await waitUntil("a leads", () => leaders.includes("a"), 5000);
  b.campaign(
    async () => void leaders.push("b"),
    (why) => lost.push(`b: ${why}`),
  );
  await new Promise((r) => setTimeout(r, 2000)); // several renewals: b stays a standby
  expect(leaders).toEqual(["a"]);
  await a.stop(); // hands the lease over at once
  await waitUntil("b leads", () => leaders.includes("b"), 5000);
  expect(lost).toEqual([]);
  // Someone else writes the lease (a split brain in the making): b must stop.
  await b.redis.set("lease-test:controller-lease", "intruder", "PX", 5000);
  await waitUntil("b told", () => lost.length > 0, 5000);
  expect(lost).toEqual(["b: the controller lease is held by another node or expired"]);
});
