// B2 agent ingest: jobs per second from publish to each job verified, stored and its QUEUED
// status durably in the outbox (the agent's work), for one agent on real LevelDB, against raw
// QoS 1 publishes each followed by one LevelDB put. A second row reports until the real
// controller code (test/helpers/controller.ts) has applied every QUEUED status.
import { join } from "node:path";
import { ClassicLevel } from "classic-level";
import mqtt from "mqtt";
import { it } from "vitest";
import { encodeEnvelope } from "../../proto/envelope.js";
import { TaskState } from "../../proto/index.js";
import { deviceTopic } from "../../proto/topics.js";
import { harness } from "../helpers/harness.js";
import { jobSpec, sign, tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_JOBS ?? 5000);

it(`B2: ${N} jobs into one agent`, async () => {
  const h = await harness();
  try {
    // Baseline: a bare subscriber that puts every message into LevelDB before its PUBACK.
    const { dir, cleanup } = tempDir();
    const db = new ClassicLevel(join(dir, "db"));
    await db.open();
    const sub = await mqtt.connectAsync(h.broker.url, { clientId: "raw-sub", clean: false });
    let got = 0;
    let rawDone!: () => void;
    const rawFinished = new Promise<void>((r) => {
      rawDone = r;
    });
    sub.handleMessage = (packet, done) => {
      db.put(String(got), Buffer.from(packet.payload as Buffer), { sync: true }).then(() => {
        done();
        if (++got === N) rawDone();
      });
    };
    await sub.subscribeAsync("raw/in", { qos: 1 });
    const pub = await mqtt.connectAsync(h.broker.url, { clientId: "raw-pub" });
    const payloads = Array.from({ length: N }, () =>
      encodeEnvelope({ jobAssignment: { job: sign(jobSpec([{ id: "a", type: "noop" }])) } }),
    );
    let t = performance.now();
    await Promise.all(payloads.map((p) => pub.publishAsync("raw/in", Buffer.from(p), { qos: 1 })));
    await rawFinished;
    const rawMs = performance.now() - t;
    await sub.endAsync();
    await pub.endAsync();
    await db.close();
    cleanup();

    // EdgeFleet: signed jobs verified and stored by the agent, QUEUED statuses back through the outbox.
    const agent = await h.newAgent("bench-ingest");
    const specs = Array.from({ length: N }, () => jobSpec([{ id: "a", type: "noop" }]));
    const envs = specs.map((s) =>
      Buffer.from(encodeEnvelope({ jobAssignment: { job: sign(s), deviceId: "bench-ingest" } })),
    );
    const topic = deviceTopic("fleet/v1", "bench-ingest", "job");
    const client = await mqtt.connectAsync(h.broker.url, { clientId: "bench-pub" });
    t = performance.now();
    const base = agent.store.outbox.lastSeq;
    await Promise.all(envs.map((e) => client.publishAsync(topic, e, { qos: 1 })));
    await h.ctl.waitFor("all stored", () => agent.store.outbox.lastSeq - base >= N, 600_000);
    const agentMs = performance.now() - t;
    await h.ctl.waitFor(
      "all queued",
      () =>
        h.ctl
          .statuses("bench-ingest")
          .filter((s) => s.taskId === "" && (s.state === TaskState.QUEUED || s.state === TaskState.REJECTED))
          .length >= N,
      600_000,
    );
    const fleetMs = performance.now() - t;
    await client.endAsync();
    const rejected = h.ctl.statuses("bench-ingest").filter((s) => s.state === TaskState.REJECTED).length;
    report("B2-agent-ingest", [
      {
        name: `${N} jobs publish -> verified, stored, QUEUED in the outbox (${rejected} rejected)`,
        value: (N / agentMs) * 1000,
        unit: "jobs/s",
        baseline: (N / rawMs) * 1000,
        ratio: rawMs / agentMs,
        goal: ">= 0.5 of raw QoS1 + LevelDB put",
      },
      {
        name: "... and every QUEUED applied by the controller's Delivery (one device's batches in order)",
        value: (N / fleetMs) * 1000,
        unit: "jobs/s",
        baseline: (N / rawMs) * 1000,
        ratio: rawMs / fleetMs,
        goal: "(reported)",
      },
    ]);
    void agent;
  } finally {
    await h.close();
  }
});
