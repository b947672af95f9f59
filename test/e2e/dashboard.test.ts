// The web dashboard (issue 14, DESIGN.md §12) in a real browser: playwright-core driving Debian's
// chromium against a real fleet server, real flashed agents and simulated devices. Login refused
// and accepted; the device list filtered by a selector; a device page; a rollout followed live
// to SUCCEEDED without a reload; pause from the page seen by `fleet rollout show`; CSRF refused;
// no request to another origin and no console error on any page. Screenshots go to
// docs/screenshots (looked at by a person before a view is called done).
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Browser, chromium, type Page } from "playwright-core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  type AgentProc,
  cli,
  cliJson,
  flashMoved,
  type ServerProcess,
  simulate,
  startAgent,
  startFleet,
  stopAll,
  waitOnline,
  waitUntil,
} from "../helpers/fleet.js";
import { tempDir } from "../helpers/keys.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SHOTS = join(import.meta.dirname, "..", "..", "docs", "screenshots");
const data = tempDir("fleet-dash-");
let server: ServerProcess;
let env: Record<string, string>;
let browser: Browser;
let base = "";
let operator: { username: string; password: string };
const agents: AgentProc[] = [];
const sims: ChildProcess[] = [];
const cleanups: Array<() => void> = [];
/** Whatever the pages asked of another origin, and every console error. */
const foreign: string[] = [];
const consoleErrors: string[] = [];

async function newPage(width = 1280): Promise<Page> {
  const page = await browser.newPage({ viewport: { width, height: 900 } });
  page.on("request", (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith("data:")) foreign.push(r.url());
  });
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(`${page.url()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => consoleErrors.push(`${page.url()}: ${e.message}`));
  return page;
}

async function login(page: Page, password = operator.password) {
  await page.goto(`${base}/`);
  await page.getByLabel("Operator").fill(operator.username);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.waitForLoadState();
}

/** A one-task rollout to the simulated devices, waves 1,100%, with this bake (not waited for). */
const createRollout = (bake: string) =>
  cli(
    [
      "rollout",
      "create",
      "-f",
      rolloutFile(),
      "--selector",
      "pool=sim",
      "--waves",
      "1,100%",
      "--bake",
      bake,
      "--json",
    ],
    env,
  );

const rolloutFile = () => {
  const f = join(data.dir, "hello.yaml");
  writeFileSync(f, "name: hello-dash\ntasks:\n  - { id: hello, type: noop }\n");
  return f;
};

beforeAll(async () => {
  ({ server, env } = await startFleet(data.dir));
  base = server.urls.http;
  operator = JSON.parse(readFileSync(join(data.dir, "operator.json"), "utf8"));
  for (const [id, site] of [
    ["hall-1", "hall"],
    ["yard-1", "yard"],
  ] as const) {
    const { root, cleanup } = await flashMoved(id, env, ["--label", `site=${site}`, "--peer-port", "0"]);
    cleanups.push(cleanup);
    const cfg = join(root, "etc", "fleet-agent", "config.json");
    const c = JSON.parse(readFileSync(cfg, "utf8"));
    c.telemetryIntervalS = 1; // a chart with a few points
    writeFileSync(cfg, JSON.stringify(c), { mode: 0o600 });
    agents.push(startAgent(root));
    await waitOnline(env, id);
  }
  sims.push(await simulate(env, ["--devices", "40", "--prefix", "sim-", "--label", "pool=sim"]));
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  mkdirSync(SHOTS, { recursive: true });
}, 120_000);

afterAll(async () => {
  await browser?.close();
  stopAll(sims, ...agents, server, cleanups, data.cleanup);
});

describe("dashboard", () => {
  it("without a session nothing is shown; a wrong password is refused; the right one gets in", async () => {
    const res = await fetch(`${base}/devices`, { redirect: "manual" });
    expect(res.status).toBe(303);
    expect(res.headers.get("location")).toBe("/login?next=%2Fdevices");
    expect((await fetch(`${base}/events`)).status).toBe(401);
    // An oversized form is refused with its reason, not a server error.
    const big = await fetch(`${base}/login`, { method: "POST", body: "a".repeat(40_000) });
    expect(big.status).toBe(413);
    expect(await big.text()).toMatch(/a form is at most 16384 bytes/);
    const page = await newPage();
    await login(page, "wrong");
    expect(await page.getByRole("alert").textContent()).toBe("Wrong operator name or password.");
    await login(page);
    expect(await page.getByRole("heading", { level: 1 }).textContent()).toBe("Overview");
    const cookie = (await page.context().cookies()).find((c) => c.name === "fleet_session")!;
    expect(cookie).toMatchObject({ httpOnly: true, sameSite: "Strict" });
    await waitUntil("42 online", async () => {
      await page.reload();
      return (await page.getByTestId("online").textContent()) === "42";
    });
    await page.screenshot({ path: join(SHOTS, "overview.png"), fullPage: true });
    await page.close();
  }, 60_000);

  it("the device list filtered by a selector, and a device page with its chart", async () => {
    const page = await newPage();
    await login(page);
    await page.getByRole("link", { name: "Devices" }).click();
    await page.getByLabel("Selector").fill("site=hall");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.waitForURL(/selector=site%3Dhall/);
    expect(await page.getByTestId("device-count").textContent()).toMatch(/^1 devices/);
    expect(await page.locator("tbody tr").count()).toBe(1);
    await page.getByLabel("Selector").fill("pool=sim");
    await page.getByRole("button", { name: "Filter" }).click();
    await page.waitForURL(/selector=pool%3Dsim/);
    expect(await page.getByTestId("device-count").textContent()).toMatch(/^40 devices/);
    // A bad selector says why, on the page.
    await page.goto(`${base}/devices?selector=${encodeURIComponent("site in (")}`);
    expect(await page.getByRole("alert").textContent()).toMatch(/selector:/);
    await waitUntil("telemetry samples", async () => {
      await page.goto(`${base}/devices/hall-1`);
      return (await page.locator(".uplot").count()) > 0;
    });
    expect(await page.getByText("site=hall").count()).toBeGreaterThan(0);
    await page.screenshot({ path: join(SHOTS, "device.png"), fullPage: true });
    // On a phone: nothing wider than the screen.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.reload();
    await page.locator(".uplot").waitFor();
    expect(await page.evaluate(() => document.documentElement.scrollWidth)).toBeLessThanOrEqual(390);
    await page.screenshot({ path: join(SHOTS, "device-phone.png"), fullPage: true });
    await page.close();
  }, 60_000);

  it("a rollout followed live to SUCCEEDED without a reload", async () => {
    const page = await newPage();
    await login(page);
    let navigations = 0;
    const r = await createRollout("4s");
    expect(r.code, r.stderr).toBe(0);
    const id = cliJson<{ id: string }>(r).id;
    await page.goto(`${base}/rollouts/${id}`);
    page.on("framenavigated", (f) => {
      if (f === page.mainFrame()) navigations++;
    });
    expect(await page.getByTestId("rollout-state").textContent()).toBe("RUNNING");
    await page.getByTestId("rollout-state").filter({ hasText: "SUCCEEDED" }).waitFor({ timeout: 30_000 });
    expect(navigations).toBe(0);
    await page.screenshot({ path: join(SHOTS, "rollout.png"), fullPage: true });
    await page.close();
  }, 60_000);

  it("pause from the page is what `fleet rollout show` says; a POST without the CSRF token is refused", async () => {
    const page = await newPage();
    await login(page);
    const r = await createRollout("60s");
    const id = cliJson<{ id: string }>(r).id;
    await page.goto(`${base}/rollouts/${id}`);
    await page.getByRole("button", { name: "Pause" }).click();
    await page.getByRole("button", { name: "Resume" }).waitFor();
    const shown = cliJson<{ state: string }>(await cli(["rollout", "show", id, "--json"], env));
    expect(shown.state).toBe("PAUSED");
    // The same request without the token (a forged form): refused, nothing changes.
    const cookie = (await page.context().cookies()).find((c) => c.name === "fleet_session")!;
    const forged = await fetch(`${base}/rollouts/${id}/abort`, {
      method: "POST",
      headers: {
        cookie: `fleet_session=${cookie.value}`,
        "content-type": "application/x-www-form-urlencoded",
      },
      body: "csrf=nope",
      redirect: "manual",
    });
    expect(forged.status).toBe(403);
    expect(cliJson<{ state: string }>(await cli(["rollout", "show", id, "--json"], env)).state).toBe(
      "PAUSED",
    );
    // And from another origin, even with the right token.
    const token = await page.locator("input[name=csrf]").first().getAttribute("value");
    const cross = await fetch(`${base}/rollouts/${id}/abort`, {
      method: "POST",
      headers: {
        cookie: `fleet_session=${cookie.value}`,
        origin: "http://evil.example",
        "content-type": "application/x-www-form-urlencoded",
      },
      body: `csrf=${token}`,
      redirect: "manual",
    });
    expect(cross.status).toBe(403);
    await page.getByRole("button", { name: "Resume" }).click();
    await page.getByRole("button", { name: "Pause" }).waitFor();
    expect(cliJson<{ state: string }>(await cli(["rollout", "show", id, "--json"], env)).state).toBe(
      "RUNNING",
    );
    // Every other view renders; then logout ends the session.
    for (const path of ["/jobs", "/rollouts", "/artifacts", "/"]) {
      await page.goto(`${base}${path}`);
      expect(await page.getByRole("heading", { level: 1 }).count()).toBe(1);
    }
    await page.getByRole("link", { name: "Jobs" }).click();
    await page.locator("tbody a").first().click();
    expect(await page.getByRole("heading", { level: 2, name: "Tasks by device" }).count()).toBe(1);
    await page.getByRole("button", { name: "Log out" }).click();
    await page.waitForURL(/\/login/);
    expect(
      (await fetch(`${base}/`, { headers: { cookie: `fleet_session=${cookie.value}` }, redirect: "manual" }))
        .status,
    ).toBe(303);
    await page.close();
  }, 90_000);

  it("no page asked another origin for anything, and no page logged an error", () => {
    expect(foreign).toEqual([]);
    expect(consoleErrors, consoleErrors.join("\n")).toEqual([]);
    expect(existsSync(join(SHOTS, "overview.png"))).toBe(true);
  });
});
