// Everything a device controls — its id (within the id rules), labels, facts, task messages and
// output, reasons — is escaped in every dashboard page (broker/dashboard/views.ts): a device
// must not be able to put script or markup into an operator's browser.
import { describe, expect, it } from "vitest";
import { escapeHtml, html } from "../../broker/dashboard/html.js";
import * as views from "../../broker/dashboard/views.js";

const EVIL = `<script>alert(1)</script>"><img src=x onerror=alert(2)>'\`</textarea></pre>`;

function assertInert(page: string) {
  expect(page).not.toContain("<script>alert");
  expect(page).not.toContain("<img");
  expect(page).not.toContain("</textarea>");
  expect(page).not.toMatch(/onerror=alert\(2\)>/);
  expect(page).toContain("&lt;script&gt;alert(1)&lt;/script&gt;");
}

describe("dashboard HTML", () => {
  it("escapes the five characters and backticks; keeps fragments built with html", () => {
    expect(escapeHtml(`&<>"'\``)).toBe("&amp;&lt;&gt;&quot;&#39;&#96;");
    expect(html`<b>${"<i>"}</b>${html`<i>${"&"}</i>`}`.text).toBe("<b>&lt;i&gt;</b><i>&amp;</i>");
    expect(html`${[1, "<", html`<br>`]}`.text).toBe("1&lt;<br>");
  });

  it("device labels, facts, via and agent version", () => {
    const device = {
      id: "dev-1",
      online: true,
      labels: { [EVIL]: EVIL },
      agentVersion: EVIL,
      lastSeen: EVIL,
      via: EVIL,
    };
    assertInert(
      views.devicesPage({ selector: EVIL, sort: "id", rows: [device], total: 1, offset: 0, limit: 100 }).text,
    );
    const page = views.devicePage({
      device: {
        ...device,
        facts: { [EVIL]: EVIL, nested: { x: EVIL } },
        queueDepth: 0,
        jobs: [{ jobId: EVIL, state: EVIL }],
      },
      telemetry: [{ at: 1, values: { "cpu.load": 0.5 } }],
    }).text;
    assertInert(page);
    // The chart's data is an attribute: quotes escaped, so it cannot end it.
    expect(page).toMatch(/data-chart="\{&quot;x&quot;/);
  });

  it("task messages, reasons and output; rollout failures; sites", () => {
    const job: views.JobView = {
      id: "J",
      name: EVIL,
      state: "FAILED",
      createdAt: EVIL,
      cancelled: EVIL,
      counts: { failed: 1 },
      devices: [
        {
          deviceId: "dev-1",
          state: EVIL,
          reason: EVIL,
          message: EVIL,
          tasks: [
            { id: EVIL, type: EVIL, state: EVIL, attempt: 1, message: EVIL, reason: EVIL, output: EVIL },
          ],
        },
      ],
    };
    assertInert(views.jobPage(job).text);
    const rollout: views.RolloutView = {
      id: "R",
      jobId: "J",
      name: EVIL,
      selector: EVIL,
      state: "ABORTED",
      reason: EVIL,
      currentWave: 1,
      waves: [{ wave: 1, spec: EVIL, devices: 1, state: "DONE", succeeded: 0, failed: 1 }],
      counts: { total: 1, succeeded: 0, failed: 1, running: 0, pending: 0 },
      failures: [{ deviceId: "dev-1", state: EVIL, reason: EVIL, message: EVIL }],
    };
    assertInert(views.rolloutPage(rollout, "token").text);
    assertInert(
      views.overviewPage({
        total: 1,
        online: 1,
        sites: [
          { site: EVIL, devices: 1, online: 1, gateway: { id: EVIL, online: true, uplink: true, queued: 1 } },
        ],
        rollouts: [{ id: EVIL, name: EVIL, state: EVIL, counts: { total: 1, succeeded: 0, failed: 0 } }],
        failures: [{ id: EVIL, name: EVIL, createdAt: EVIL }],
      }).text,
    );
    assertInert(views.loginPage(EVIL, EVIL).text);
    assertInert(views.layout({ title: EVIL, operator: EVIL, csrf: EVIL, body: html`${EVIL}` }).text);
  });
});
