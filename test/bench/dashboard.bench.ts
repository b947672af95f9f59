// B10 dashboard at fleet size (issue 14): N simulated devices (BENCH_DASHBOARD_DEVICES, default
// 10,000) connected to one server; in Debian's chromium, the time to show the devices page (the
// first page of N, sorted by id), its last page, a selector filter and the overview — against
// the smallest page of the same dashboard (artifacts, nothing in it) in the same run.
import type { ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { it } from "vitest";
import { simulate, startFleet, stopAll, waitUntil } from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";
import { report } from "./report.js";

const N = Number(process.env.BENCH_DASHBOARD_DEVICES ?? 10_000);

it(`B10: the dashboard with ${N} devices`, async () => {
  const data = tempDir("fleet-bench-dash-");
  const { server, env } = await startFleet(data.dir, {
    config: (cfg) => {
      cfg.limits.connectsPerSecondPerAddress = 100_000;
    },
  });
  const sims: ChildProcess[] = [];
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu"],
  });
  try {
    sims.push(await simulate(env, ["--devices", String(N), "--label", "pool=sim"]));
    const base = server.urls.http;
    const op = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    await page.goto(`${base}/login`);
    await page.getByLabel("Operator").fill(op.username);
    await page.getByLabel("Password").fill(op.password);
    await page.getByRole("button", { name: "Log in" }).click();
    await page.waitForLoadState();
    await waitUntil(
      `${N} devices online`,
      async () => {
        await page.goto(`${base}/`);
        return Number(await page.getByTestId("online").textContent()) >= N;
      },
      300_000,
    );
    const time = async (path: string) => {
      const ms: number[] = [];
      for (let i = 0; i < 5; i++) {
        const t = performance.now();
        await page.goto(`${base}${path}`, { waitUntil: "load" });
        ms.push(performance.now() - t);
      }
      return ms.sort((a, b) => a - b)[2]!;
    };
    const baseline = await time("/artifacts");
    const rows = [
      ["/devices", "devices page, first 100 of all"],
      [`/devices?offset=${N - 100}`, "devices page, the last 100"],
      ["/devices?sort=lastSeen", "devices page sorted by last seen"],
      ["/devices?selector=pool%3Dsim%2Csite%21%3Dx", "devices page with a selector"],
      ["/", "overview (counts, sites, rollouts, failures)"],
    ] as const;
    const out = [];
    for (const [path, name] of rows) {
      const ms = await time(path);
      out.push({
        name: `${name} (${N} devices), in chromium, median of 5`,
        value: ms,
        unit: "ms",
        baseline,
        ratio: ms / baseline,
        goal: "fast at 10,000 (reported)",
      });
    }
    const domRows = await page.goto(`${base}/devices`).then(() => page.locator("tbody tr").count());
    report("B10-dashboard", [
      ...out,
      {
        name: "rows in the DOM on the devices page (baseline: devices)",
        value: domRows,
        unit: "rows",
        baseline: N,
        ratio: domRows / N,
        goal: "one page, not all",
      },
    ]);
  } finally {
    await browser.close();
    stopAll(sims, server, data.cleanup);
  }
}, 900_000);
