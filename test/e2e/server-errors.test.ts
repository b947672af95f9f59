// `fleet server` refuses bad flags and a bad data directory with one line and an exit code,
// and a server that cannot reach its broker or Redis stops (it does not hang with its HTTP
// ports open) and says why.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, expect, it } from "vitest";
import { freePort } from "../helpers/external.js";
import { cli } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const data = tempDir("fleet-srv-err-");
afterAll(() => data.cleanup());
const ports = [
  "--mqtt-port",
  "0",
  "--mqtts-port",
  "0",
  "--ws-port",
  "0",
  "--http-port",
  "0",
  "--https-port",
  "0",
];

it.each([
  [["--lease-ms", "500", "--cluster", "redis://127.0.0.1:6379"], 2, /--lease-ms 500: a whole number >= 1000/],
  [["--cluster", "localhost:6379"], 2, /--cluster localhost:6379: expected redis:\/\/HOST:PORT/],
  [
    ["--external-broker", "localhost:1883"],
    2,
    /--external-broker localhost:1883: expected mqtt:\/\/HOST:PORT/,
  ],
  [["--cluster", "redis://127.0.0.1:1", "--external-broker", "mqtt://127.0.0.1:1"], 2, /exclude each other/],
])("refuses %j", async (args, code, message) => {
  const r = await cli(["server", "--dir", join(data.dir, "flags"), ...ports, ...args]);
  expect(r.code).toBe(code);
  expect(r.stderr).toMatch(message);
});

it("stops with a reason when the external broker or Redis cannot be reached", async () => {
  const dead = await freePort();
  const ext = await cli(
    ["server", "--dir", join(data.dir, "ext"), ...ports, "--external-broker", `mqtt://127.0.0.1:${dead}`],
    {},
    30_000,
  );
  expect(ext.code).toBe(1);
  expect(ext.stderr).toMatch(
    /cannot start the server: the controller cannot connect to mqtt:\/\/127\.0\.0\.1:\d+: connect ECONNREFUSED/,
  );
  expect(ext.stderr).not.toMatch(/\n\s+at /); // no stack trace
  const redis = await cli(
    ["server", "--dir", join(data.dir, "ext"), ...ports, "--cluster", `redis://127.0.0.1:${dead}`],
    {},
    30_000,
  );
  expect(redis.code).toBe(1);
  expect(redis.stderr).toMatch(
    /cannot start the server: cannot reach the cluster's Redis at redis:\/\/127\.0\.0\.1:\d+/,
  );
});

it("names every problem of a bad server.json", async () => {
  const dir = join(data.dir, "bad");
  expect((await cli(["init", "--dir", dir])).code).toBe(0);
  writeFileSync(join(dir, "server.json"), JSON.stringify({ prefix: 7 }));
  const r = await cli(["server", "--dir", dir, ...ports], {}, 30_000);
  expect(r.code).toBe(2);
  expect(r.stderr).toMatch(/server\.json:/);
  expect(r.stderr).toMatch(/- controller: /);
  expect(r.stderr).toMatch(/- operators: /);
});
