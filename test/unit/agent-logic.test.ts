import { describe, expect, it } from "vitest";
import { TrustedClock } from "../../agent/clock.js";
import { ConfigError, parseAgentConfig } from "../../agent/config.js";
import { CronMatcher, cronProblem } from "../../agent/cron.js";
import { deriveJobState, evaluateTrigger } from "../../agent/dag.js";
import { checkRequirements } from "../../agent/facts.js";
import { backoffDelay } from "../../agent/retry.js";
import { OnUnmet, TaskState as S, Trigger } from "../../proto/index.js";
import { checkGraph, compareValues } from "../../proto/jobspec.js";

const t = (id: string, dependsOn: string[] = []) => ({ id, type: "noop", dependsOn });

describe("task graph", () => {
  it.each([
    ["chain", [t("a"), t("b", ["a"]), t("c", ["b"])], undefined],
    ["diamond", [t("a"), t("b", ["a"]), t("c", ["a"]), t("d", ["b", "c"])], undefined],
    ["cross-job dep is not checked here", [t("a", ["job:01X"])], undefined],
    ["self loop", [t("a", ["a"])], "dependency_cycle"],
    ["3-cycle", [t("a", ["c"]), t("b", ["a"]), t("c", ["b"])], "dependency_cycle"],
    ["cycle behind a root", [t("r"), t("a", ["r", "b"]), t("b", ["a"])], "dependency_cycle"],
    ["unknown dep", [t("a", ["nope"])], "unknown_dependency"],
    ["duplicate id", [t("a"), t("a")], "duplicate_task_id"],
  ])("%s", (_name, tasks, reason) => {
    expect(checkGraph(tasks)?.reason).toBe(reason);
  });

  it("names the cycle", () => {
    expect(checkGraph([t("a", ["b"]), t("b", ["a"])])?.message).toMatch(/a -> b -> a|b -> a -> b/);
  });

  const deps = (...s: S[]) => new Map(s.map((x, i) => [`d${i}`, x]));
  it.each([
    [Trigger.TRIGGER_ALL_SUCCESS, deps(S.SUCCEEDED, S.SUCCEEDED), "ready"],
    [Trigger.TRIGGER_ALL_SUCCESS, deps(S.SUCCEEDED, S.RUNNING), "wait"],
    [Trigger.TRIGGER_ALL_SUCCESS, deps(S.FAILED, S.RUNNING), "skip"],
    [Trigger.TRIGGER_ALL_SUCCESS, deps(S.SKIPPED), "skip"],
    [Trigger.TRIGGER_ALL_DONE, deps(S.FAILED, S.SUCCEEDED), "ready"],
    [Trigger.TRIGGER_ALL_DONE, deps(S.FAILED, S.WAITING), "wait"],
    [Trigger.TRIGGER_ONE_FAILED, deps(S.TIMED_OUT, S.RUNNING), "ready"],
    [Trigger.TRIGGER_ONE_FAILED, deps(S.SUCCEEDED, S.SUCCEEDED), "skip"],
    [Trigger.TRIGGER_ONE_FAILED, deps(S.SUCCEEDED, S.QUEUED), "wait"],
    [Trigger.TRIGGER_ALL_SUCCESS, deps(), "ready"],
  ])("trigger %i with deps %o -> %s", (trigger, d, kind) => {
    expect(evaluateTrigger(trigger, d).kind).toBe(kind);
  });

  it.each([
    [[S.SUCCEEDED, S.SKIPPED], false, S.SUCCEEDED],
    [[S.SUCCEEDED, S.FAILED, S.SKIPPED], false, S.FAILED],
    [[S.TIMED_OUT, S.SUCCEEDED], false, S.TIMED_OUT],
    [[S.CANCELED, S.SUCCEEDED], true, S.CANCELED],
    [[S.RUNNING, S.QUEUED], false, S.RUNNING],
    [[S.WAITING, S.SUCCEEDED], false, S.QUEUED],
  ])("job state of %o (cancelled %s) is %i", (states, cancelled, expected) => {
    expect(deriveJobState(states, cancelled)).toBe(expected);
  });
});

describe("preconditions", () => {
  const facts = {
    "agent.version": "1.10.0",
    "os.arch": "arm64",
    "disk.free": 600 * 1024 ** 2,
    "battery.percent": 20,
    "labels.site": "berlin",
  };
  const req = (fact: string, op: string, value: string, onUnmet = OnUnmet.ON_UNMET_WAIT) => ({
    fact,
    op,
    value,
    onUnmet,
  });
  it.each([
    [req("agent.version", ">=", "1.2.0"), "met"],
    [req("agent.version", "<", "1.9.9"), "wait"],
    [req("os.arch", "in", "arm64,x64"), "met"],
    [req("os.arch", "notin", "(arm64,x64)"), "wait"],
    [req("disk.free", ">=", "500MB"), "met"],
    [req("disk.free", ">=", "1GB", OnUnmet.ON_UNMET_FAIL), "fail"],
    [req("battery.percent", ">=", "30", OnUnmet.ON_UNMET_SKIP), "skip"],
    [req("labels.site", "==", "berlin"), "met"],
    [req("software.app", ">=", "2.0.0"), "wait"],
    [req("software.app", "exists", ""), "wait"],
  ])("%o -> %s", (r, kind) => {
    expect(checkRequirements([r], facts).kind).toBe(kind);
  });
  it("fail beats skip beats wait, and the message names the fact and its value", () => {
    const out = checkRequirements(
      [req("battery.percent", ">", "50"), req("disk.free", ">", "1TB", OnUnmet.ON_UNMET_FAIL)],
      facts,
    );
    expect(out).toMatchObject({ kind: "fail" });
    expect(out.kind !== "met" && out.message).toContain("disk.free > 1TB (is");
  });
  it("compares versions numerically, sizes by unit", () => {
    expect(compareValues("1.10.0", "1.9.0")).toBe(1);
    // semver: a pre-release comes before its release; partial versions pad with zeros.
    expect(compareValues("1.2.0-rc1", "1.2.0")).toBe(-1);
    expect(compareValues("1.2.0", "1.2.0-rc1")).toBe(1);
    expect(compareValues("1.2.0-rc.2", "1.2.0-rc.10")).toBe(-1);
    expect(compareValues("v2.0", "1.9.9")).toBe(1);
    expect(compareValues("1.2", "1.2.0")).toBe(0);
    expect(compareValues("1.5GB", "1.4GB")).toBe(1); // sizes, not versions
    expect(compareValues(2048, "2KB")).toBe(0);
  });
});

describe("trusted clock", () => {
  const src = (wall: number) => {
    const s = { wall, mono: 0, w: () => s.wall, m: () => s.mono };
    return { s, time: { wall: () => s.wall, mono: () => s.mono } };
  };
  const NOW = Date.parse("2026-11-28T00:00:00Z");
  it("follows an agreeing wall clock", () => {
    const { s, time } = src(NOW);
    const c = new TrustedClock(time, 0);
    s.wall += 5000;
    s.mono += 5000;
    expect(c.now()).toBe(NOW + 5000);
    expect(c.wallTrusted()).toBe(true);
  });
  it("a 1970 clock runs from the floor and jumps to a signed issued_at", () => {
    const { s, time } = src(0);
    const c = new TrustedClock(time, NOW - 86_400_000);
    expect(c.now()).toBe(NOW - 86_400_000);
    expect(c.wallTrusted()).toBe(false);
    expect(c.observe(NOW)).toBe(true);
    s.mono += 1000;
    expect(c.now()).toBe(NOW + 1000);
  });
  it("ignores wall clock jumps of years in either direction until a trusted time arrives", () => {
    const { s, time } = src(NOW);
    const c = new TrustedClock(time, NOW);
    s.wall += 3 * 365 * 86_400_000;
    s.mono += 1000;
    expect(c.now()).toBe(NOW + 1000);
    s.wall = NOW - 5 * 365 * 86_400_000;
    s.mono += 1000;
    expect(c.now()).toBe(NOW + 2000);
    c.hint(NOW + 60_000);
    expect(c.now()).toBe(NOW + 60_000);
  });
  it("an unsigned hint sets now but never the floor; the next hint undoes a wrong one (H5)", () => {
    const { s, time } = src(NOW);
    const c = new TrustedClock(time, NOW - 1000);
    c.hint(NOW + 10 * 365 * 86_400_000);
    expect(c.now()).toBe(NOW + 10 * 365 * 86_400_000);
    expect(c.floor).toBe(NOW - 1000);
    c.hint(NOW);
    s.mono += 1000;
    s.wall += 1000;
    expect(c.now()).toBe(NOW + 1000);
    s.wall = 0; // and a hint never takes "now" below the floor
    c.hint(NOW - 86_400_000);
    expect(c.now()).toBe(NOW - 1000);
  });
});

describe("cron", () => {
  it("validates expressions and time zones", () => {
    expect(cronProblem("0 2 * * *", "Europe/Berlin")).toBeUndefined();
    expect(cronProblem("0 99 * * *")).toMatch(/invalid cron/);
    expect(cronProblem("0 2 * * *", "Mars/Olympus")).toMatch(/time zone/);
  });
  it("windows open after each match, in the window's time zone", () => {
    const m = new CronMatcher("0 2 * * *", "Europe/Berlin");
    const at = (iso: string) => Date.parse(iso);
    expect(m.windowOpen(at("2026-11-28T01:30:00Z"), 2 * 3600_000).open).toBe(true); // 02:30 Berlin
    expect(m.windowOpen(at("2026-11-28T03:30:00Z"), 2 * 3600_000).open).toBe(false); // 04:30 Berlin
    expect(m.windowOpen(at("2026-11-28T00:59:00Z"), 2 * 3600_000).open).toBe(false); // 01:59 Berlin
    expect(m.windowOpen(at("2026-11-28T01:00:00Z"), 2 * 3600_000)).toEqual({
      open: true,
      until: at("2026-11-28T03:00:00Z"),
    }); // opens at its slot
  });
  it("long windows are computed, not walked minute by minute (M5)", () => {
    const yearly = new CronMatcher("0 0 1 1 *", "UTC");
    const at = (iso: string) => Date.parse(iso);
    const DAY = 86_400_000;
    expect(yearly.windowOpen(at("2026-11-28T00:00:00Z"), 400 * DAY).open).toBe(true);
    expect(yearly.windowOpen(at("2026-11-28T00:00:00Z"), 300 * DAY).open).toBe(false);
    // Feb 29 only: the last slot is years back; still one computation.
    const leap = new CronMatcher("0 0 29 2 *", "UTC");
    expect(leap.windowOpen(at("2026-11-28T00:00:00Z"), 400 * DAY).open).toBe(false);
    expect(leap.windowOpen(at("2028-03-01T00:00:00Z"), 2 * DAY).open).toBe(true);
  });
});

describe("recurring slots", () => {
  const at = (iso: string) => Date.parse(iso);
  it("finds the latest slot since the last check, computed from the expression", () => {
    const m = new CronMatcher("*/5 * * * *", "UTC");
    expect(m.latestSlot(at("2026-11-28T10:04:00Z"), at("2026-11-28T10:05:30Z"), 60_000)).toBe(
      at("2026-11-28T10:05:00Z"),
    );
    // Already seen: the last check was after the slot.
    expect(m.latestSlot(at("2026-11-28T10:05:10Z"), at("2026-11-28T10:05:30Z"), 60_000)).toBeUndefined();
    // Older than the look-back (the clock jumped): not fired late.
    expect(m.latestSlot(0, at("2026-11-28T10:07:30Z"), 60_000)).toBeUndefined();
  });
  it("six fields count seconds; a time zone shifts the slots", () => {
    const everySecond = new CronMatcher("* * * * * *");
    expect(everySecond.latestSlot(at("2026-11-28T10:00:00Z"), at("2026-11-28T10:00:01.400Z"), 60_000)).toBe(
      at("2026-11-28T10:00:01Z"),
    );
    const berlin = new CronMatcher("0 3 * * *", "Europe/Berlin");
    expect(berlin.previous(at("2026-11-28T12:00:00Z"))).toBe(at("2026-11-28T02:00:00Z"));
  });
});

describe("reconnect backoff", () => {
  it("grows exponentially to the cap, with full jitter", () => {
    const o = { minMs: 1000, maxMs: 60_000 };
    expect(backoffDelay(0, { ...o, random: () => 0.999 })).toBe(999);
    expect(backoffDelay(3, { ...o, random: () => 0.5 })).toBe(4000);
    expect(backoffDelay(20, { ...o, random: () => 0.999 })).toBe(59_940);
    expect(backoffDelay(5, { ...o, random: () => 0 })).toBe(0);
  });
});

describe("agent config", () => {
  it("reports every problem at once, each with its path", () => {
    try {
      parseAgentConfig(
        {
          deviceId: "bad id!",
          brokers: ["http://x"],
          trustedKeys: [],
          username: "other",
          telemetryIntervalS: -1,
          extra: 1,
        },
        "/",
      );
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      const p = (err as ConfigError).problems.join("\n");
      for (const path of [
        "deviceId:",
        "brokers.0:",
        "trustedKeys:",
        "telemetryIntervalS:",
        "(root): Unrecognized key",
      ])
        expect(p).toContain(path);
    }
  });
});

describe("status bounds (M1)", () => {
  it("cuts message, reason and output so one status fits a batch", async () => {
    const { boundStatus } = await import("../../common/output.js");
    const s = boundStatus(
      {
        jobId: "j",
        taskId: "t",
        message: "m".repeat(100_000),
        reason: "r".repeat(1000),
        output: "o".repeat(1_000_000),
      },
      128 * 1024,
    );
    expect(Buffer.byteLength(s.message!)).toBeLessThanOrEqual(4096);
    expect(Buffer.byteLength(s.reason!)).toBeLessThanOrEqual(256);
    expect(Buffer.byteLength(s.output!)).toBeLessThanOrEqual(128 * 1024);
    expect(s.output).toMatch(/^\[\.\.\. \d+ bytes truncated\]/);
    const small = { jobId: "j", message: "fine", output: "ok" };
    expect(boundStatus(small, 128 * 1024)).toBe(small); // nothing to cut: not copied
    const wide = { jobId: "j", message: "é".repeat(3000) }; // 3,000 units, 6,000 bytes
    expect(Buffer.byteLength(boundStatus(wide, 128 * 1024).message!)).toBeLessThanOrEqual(4096);
  });
});

describe("terminal safety", () => {
  it("device text cannot carry escape sequences into the CLI's tables and outputs", async () => {
    const { printable, table } = await import("../../cli/format.js");
    expect(printable("ok\x1b]0;pwned\x07\x1b[2J")).toBe("ok\\x1b]0;pwned\\x07\\x1b[2J");
    expect(printable("line 1\n\tline 2\x9b", true)).toBe("line 1\n\tline 2\\x9b");
    expect(table([{ message: "a\x1b[31mred\nb" }])).toContain("a\\x1b[31mred\\x0ab");
  });
});

describe("allowPaths", () => {
  it("compares normalised paths by segment", async () => {
    const { pathAllowed } = await import("../../firmware-tasks/paths.js");
    const allowed = ["etc/app", "opt/"];
    expect(pathAllowed("etc/app/app.conf", allowed)).toBeUndefined();
    expect(pathAllowed("/opt/app", allowed)).toBeUndefined();
    expect(pathAllowed("etc/app", allowed)).toBeUndefined();
    expect(pathAllowed("etc/apparmor.d/x", allowed)).toMatch(/outside this device's allowPaths/);
    expect(pathAllowed("etc/app/../../etc/passwd", allowed)).toMatch(/outside/);
    expect(pathAllowed("etc/passwd", undefined)).toBeUndefined();
  });
});

describe("paths under the root", () => {
  it("a symlink under the root cannot lead a path out of it", async () => {
    const { mkdtempSync, mkdirSync, symlinkSync, rmSync } = await import("node:fs");
    const { tmpdir } = await import("node:os");
    const { join } = await import("node:path");
    const { underRoot } = await import("../../firmware-tasks/paths.js");
    const root = mkdtempSync(join(tmpdir(), "fleet-root-"));
    const outside = mkdtempSync(join(tmpdir(), "fleet-outside-"));
    try {
      mkdirSync(join(root, "etc"));
      symlinkSync(outside, join(root, "etc", "app"));
      expect(() => underRoot(root, "etc/app/app.conf")).toThrow(/through a symlink/);
      expect(() => underRoot(root, "../x")).toThrow(/escapes the agent root/);
      expect(underRoot(root, "etc/other/new.conf")).toBe(join(root, "etc/other/new.conf"));
    } finally {
      rmSync(root, { recursive: true, force: true });
      rmSync(outside, { recursive: true, force: true });
    }
  });
});
