// The dashboard's pages (DESIGN.md §12), server-rendered from the operator API's results. Every
// value goes through `html` (escaped); nothing is loaded from another origin; no inline script
// or style (the Content-Security-Policy forbids both), so progress is a <progress> element and
// charts read their data from a data attribute.
import { Html, html, query } from "./html.js";

export interface Page {
  title: string;
  operator?: string;
  csrf?: string;
  active?: string;
  body: Html;
}

const NAV = [
  ["/", "Overview"],
  ["/devices", "Devices"],
  ["/jobs", "Jobs"],
  ["/rollouts", "Rollouts"],
  ["/artifacts", "Artifacts"],
] as const;

export function layout(p: Page): Html {
  return html`<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${p.title} · EdgeFleet</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/app.css">
<link rel="stylesheet" href="/static/uPlot.min.css">
<script src="/static/uPlot.iife.min.js" defer></script>
<script src="/static/app.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header>
<span class="brand">EdgeFleet</span>
${
  p.operator
    ? html`<nav aria-label="Main">${NAV.map(
        ([href, label]) =>
          html`<a href="${href}"${p.active === href ? new Html(' aria-current="page"') : ""}>${label}</a>`,
      )}</nav>
<form method="post" action="/logout" class="logout"><input type="hidden" name="csrf" value="${p.csrf}"><span>${p.operator}</span> <button type="submit">Log out</button></form>`
    : ""
}
</header>
<main id="main" tabindex="-1" data-live="${p.operator ? "1" : ""}">
${p.body}
</main>
</body>
</html>`;
}

export function loginPage(error?: string, next = "/"): Html {
  return html`<h1>Log in</h1>
${error ? html`<p class="error" role="alert">${error}</p>` : ""}
<form method="post" action="/login" class="login">
<input type="hidden" name="next" value="${next}">
<label for="username">Operator</label>
<input id="username" name="username" autocomplete="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<button type="submit">Log in</button>
</form>`;
}

export interface DeviceRow {
  id: string;
  online: boolean;
  labels: Record<string, string>;
  agentVersion: string;
  lastSeen: string | null;
  via?: string;
  gateway?: unknown;
}

const labelsOf = (labels: Record<string, string>) =>
  Object.entries(labels).map(([k, v]) => html`<span class="label">${k}=${v}</span> `);

const state = (s: string) =>
  html`<span class="state state-${s.toLowerCase().replace(/[^a-z_]/g, "")}">${s}</span>`;

const online = (on: boolean) =>
  on
    ? html`<span class="state state-online">online</span>`
    : html`<span class="state state-offline">offline</span>`;

export interface Overview {
  total: number;
  online: number;
  sites: Array<{
    site: string;
    devices: number;
    online: number;
    gateway?: { id: string; online: boolean; uplink: boolean; queued: number };
  }>;
  rollouts: Array<{
    id: string;
    name: string;
    state: string;
    counts: { total: number; succeeded: number; failed: number };
  }>;
  failures: Array<{ id: string; name: string; createdAt: string }>;
}

export function overviewPage(o: Overview): Html {
  return html`<h1>Overview</h1>
<section class="cards" aria-label="Devices">
<div class="card"><div class="num" data-testid="online">${o.online}</div><div>online</div></div>
<div class="card"><div class="num" data-testid="offline">${o.total - o.online}</div><div>offline</div></div>
<div class="card"><div class="num">${o.total}</div><div>devices</div></div>
</section>
<h2>Sites</h2>
${
  o.sites.length
    ? html`<table><thead><tr><th scope="col">Site</th><th scope="col">Devices</th><th scope="col">Online</th><th scope="col">Gateway</th></tr></thead><tbody>
${o.sites.map(
  (s) =>
    html`<tr><td><a href="/devices${query({ selector: `site=${s.site}` })}">${s.site}</a></td><td>${s.devices}</td><td>${s.online}</td><td>${
      s.gateway
        ? html`<a href="/devices/${encodeURIComponent(s.gateway.id)}">${s.gateway.id}</a> ${online(s.gateway.online)} uplink ${s.gateway.online && s.gateway.uplink ? "up" : "down"}${s.gateway.queued ? html`, ${s.gateway.queued} queued` : ""}`
        : "—"
    }</td></tr>`,
)}</tbody></table>`
    : html`<p>No device has a <code>site</code> label.</p>`
}
<h2>Active rollouts</h2>
${
  o.rollouts.length
    ? html`<ul class="rollouts">${o.rollouts.map(
        (r) =>
          html`<li><a href="/rollouts/${encodeURIComponent(r.id)}">${r.name}</a> ${state(r.state)}
<progress max="${r.counts.total}" value="${r.counts.succeeded + r.counts.failed}" aria-label="${r.name} progress">${r.counts.succeeded + r.counts.failed}/${r.counts.total}</progress> ${r.counts.succeeded + r.counts.failed}/${r.counts.total}</li>`,
      )}</ul>`
    : html`<p>None running.</p>`
}
<h2>Last failures</h2>
${
  o.failures.length
    ? html`<ul>${o.failures.map((j) => html`<li><a href="/jobs/${encodeURIComponent(j.id)}">${j.name}</a> <time>${j.createdAt}</time></li>`)}</ul>`
    : html`<p>No failed job among the latest.</p>`
}`;
}

export function devicesPage(p: {
  selector: string;
  sort: string;
  rows: DeviceRow[];
  total: number;
  offset: number;
  limit: number;
  error?: string;
}): Html {
  const link = (offset: number) =>
    `/devices${query({ selector: p.selector, sort: p.sort, offset: offset || undefined })}`;
  return html`<h1>Devices</h1>
<form method="get" action="/devices" class="filter" role="search">
<label for="selector">Selector</label>
<input id="selector" name="selector" value="${p.selector}" placeholder="site=hall-3,role in (cam,gw)">
<label for="sort">Sort</label>
<select id="sort" name="sort">${["id", "online", "lastSeen"].map(
    (s) => html`<option value="${s}"${p.sort === s ? new Html(" selected") : ""}>${s}</option>`,
  )}</select>
<button type="submit">Filter</button>
</form>
${p.error ? html`<p class="error" role="alert">${p.error}</p>` : ""}
<p data-testid="device-count">${p.total} devices${p.total ? html`, ${p.offset + 1}–${p.offset + p.rows.length} shown` : ""}</p>
<table><thead><tr><th scope="col">Device</th><th scope="col">State</th><th scope="col">Labels</th><th scope="col">Agent</th><th scope="col">Via</th><th scope="col">Last seen</th></tr></thead><tbody>
${p.rows.map(
  (d) =>
    html`<tr><td><a href="/devices/${encodeURIComponent(d.id)}">${d.id}</a></td><td>${online(d.online)}</td><td>${labelsOf(d.labels)}</td><td>${d.agentVersion}</td><td>${d.gateway ? "(gateway)" : (d.via ?? "")}</td><td>${d.lastSeen ?? "never"}</td></tr>`,
)}</tbody></table>
<nav class="pager" aria-label="Pages">
${p.offset > 0 ? html`<a href="${link(Math.max(0, p.offset - p.limit))}" rel="prev">← Previous</a>` : ""}
${p.offset + p.rows.length < p.total ? html`<a href="${link(p.offset + p.limit)}" rel="next">Next →</a>` : ""}
</nav>`;
}

export function devicePage(d: {
  device: DeviceRow & {
    facts: Record<string, unknown>;
    queueDepth: number;
    jobs: Array<{ jobId: string; state: string }>;
  };
  telemetry: Array<{ at: number; values: Record<string, number> }>;
}): Html {
  const t = d.telemetry;
  const series = (key: string) => t.map((s) => (Number.isFinite(s.values[key]) ? s.values[key]! : null));
  const chart = {
    x: t.map((s) => Math.round(s.at / 1000)),
    series: [
      { name: "CPU load (%)", values: series("cpu.load").map((v) => (v === null ? null : v * 100)) },
      { name: "Memory used (%)", values: series("mem.used_pct") },
      { name: "Temperature (°C)", values: series("temperature") },
    ],
    disk: series("disk.free").map((v) => (v === null ? null : v / 1024 ** 3)),
  };
  return html`<h1>Device ${d.device.id}</h1>
<dl class="facts">
<dt>State</dt><dd>${online(d.device.online)}</dd>
<dt>Labels</dt><dd>${labelsOf(d.device.labels)}</dd>
<dt>Agent</dt><dd>${d.device.agentVersion}</dd>
<dt>Via</dt><dd>${d.device.gateway ? "(it is a gateway)" : (d.device.via ?? "the center")}</dd>
<dt>Last seen</dt><dd>${d.device.lastSeen ?? "never"}</dd>
<dt>Queued jobs</dt><dd>${d.device.queueDepth}</dd>
</dl>
<h2>Telemetry</h2>
${
  t.length
    ? html`<div class="chart" role="img" aria-label="CPU load, memory and temperature over the last ${t.length} samples" data-chart="${JSON.stringify(chart)}"></div>
<p>Disk free now: ${chart.disk.at(-1)?.toFixed(1) ?? "?"} GiB (${t.length} samples)</p>`
    : html`<p>No telemetry yet.</p>`
}
<h2>Jobs</h2>
${
  d.device.jobs.length
    ? html`<table><thead><tr><th scope="col">Job</th><th scope="col">State</th></tr></thead><tbody>
${d.device.jobs.map((j) => html`<tr><td><a href="/jobs/${encodeURIComponent(j.jobId)}">${j.jobId}</a></td><td>${state(j.state)}</td></tr>`)}
</tbody></table>`
    : html`<p>No jobs yet.</p>`
}
<h2>Facts</h2>
<pre class="output">${JSON.stringify(d.device.facts, null, 2)}</pre>`;
}

export function jobsPage(
  jobs: Array<{
    id: string;
    name: string;
    state: string;
    createdAt: string;
    devices: number;
    origin?: string;
  }>,
  next?: string,
): Html {
  return html`<h1>Jobs</h1>
<table><thead><tr><th scope="col">Job</th><th scope="col">Name</th><th scope="col">State</th><th scope="col">Devices</th><th scope="col">Origin</th><th scope="col">Created</th></tr></thead><tbody>
${jobs.map(
  (j) =>
    html`<tr><td><a href="/jobs/${encodeURIComponent(j.id)}">${j.id}</a></td><td>${j.name}</td><td>${state(j.state)}</td><td>${j.devices}</td><td>${j.origin ?? "center"}</td><td><time>${j.createdAt}</time></td></tr>`,
)}</tbody></table>
${next ? html`<nav class="pager" aria-label="Pages"><a href="/jobs${query({ cursor: next })}" rel="next">Older →</a></nav>` : ""}`;
}

export interface JobView {
  id: string;
  name: string;
  state: string;
  createdAt: string;
  cancelled?: string;
  rolloutId?: string;
  counts: Record<string, number>;
  devices: Array<{
    deviceId: string;
    state: string;
    reason?: string;
    message?: string;
    tasks: Array<{
      id: string;
      type: string;
      state: string;
      attempt: number;
      message: string;
      reason?: string;
      output?: string;
    }>;
  }>;
}

export function jobPage(j: JobView): Html {
  const taskIds = j.devices[0]?.tasks.map((t) => t.id) ?? [];
  return html`<h1>Job ${j.name}</h1>
<p>${state(j.state)} <code>${j.id}</code> created <time>${j.createdAt}</time>${j.rolloutId ? html` · rollout <a href="/rollouts/${encodeURIComponent(j.rolloutId)}">${j.rolloutId}</a>` : ""}${j.cancelled ? html` · cancelled: ${j.cancelled}` : ""}</p>
<p>${Object.entries(j.counts).map(([k, v]) => html`<span class="count">${k} ${v}</span> `)}</p>
<h2>Tasks by device</h2>
<p class="dag">Tasks: ${taskIds.map((id, i) => html`${i ? " → " : ""}<code>${id}</code>`)}</p>
<table><thead><tr><th scope="col">Device</th><th scope="col">State</th>${taskIds.map((id) => html`<th scope="col">${id}</th>`)}</tr></thead><tbody>
${j.devices.map(
  (d) =>
    html`<tr><td><a href="/devices/${encodeURIComponent(d.deviceId)}">${d.deviceId}</a></td><td>${state(d.state)}${d.reason ? html` <small>${d.reason}</small>` : ""}</td>${d.tasks.map(
      (t) =>
        html`<td>${state(t.state)} <small>attempt ${t.attempt}</small>${t.message ? html`<div class="msg">${t.message}</div>` : ""}${
          t.output
            ? html`<details><summary>output</summary><pre class="output">${t.output}</pre></details>`
            : ""
        }</td>`,
    )}</tr>`,
)}</tbody></table>`;
}

export interface RolloutView {
  id: string;
  jobId: string;
  name: string;
  selector: string;
  state: string;
  reason?: string;
  currentWave: number;
  waves: Array<{
    wave: number;
    spec: string;
    devices: number;
    state: string;
    succeeded: number;
    failed: number;
  }>;
  counts: { total: number; succeeded: number; failed: number; running: number; pending: number };
  bytes?: Record<string, number>;
  bytesSaved?: number;
  failures: Array<{ deviceId: string; state: string; reason: string; message: string }>;
}

export function rolloutsPage(rs: RolloutView[]): Html {
  return html`<h1>Rollouts</h1>
<table><thead><tr><th scope="col">Rollout</th><th scope="col">State</th><th scope="col">Wave</th><th scope="col">Progress</th></tr></thead><tbody>
${rs.map(
  (r) =>
    html`<tr><td><a href="/rollouts/${encodeURIComponent(r.id)}">${r.name}</a></td><td>${state(r.state)}</td><td>${r.currentWave}/${r.waves.length}</td><td><progress max="${r.counts.total}" value="${r.counts.succeeded + r.counts.failed}" aria-label="${r.name} progress"></progress> ${r.counts.succeeded + r.counts.failed}/${r.counts.total}</td></tr>`,
)}</tbody></table>`;
}

export function rolloutPage(r: RolloutView, csrf: string): Html {
  const action = (verb: string, label: string, confirm?: string) =>
    html`<form method="post" action="/rollouts/${encodeURIComponent(r.id)}/${verb}" class="inline"${confirm ? html` data-confirm="${confirm}"` : ""}><input type="hidden" name="csrf" value="${csrf}"><button type="submit">${label}</button></form>`;
  const live = r.state === "RUNNING" || r.state === "PAUSED";
  return html`<h1>Rollout ${r.name}</h1>
<p><span data-testid="rollout-state">${state(r.state)}</span>${r.reason ? html` — <span class="error">${r.reason}</span>` : ""} · selector <code>${r.selector}</code> · job <a href="/jobs/${encodeURIComponent(r.jobId)}">${r.jobId}</a></p>
${live ? html`<div class="actions">${r.state === "RUNNING" ? action("pause", "Pause") : action("resume", "Resume")} ${action("abort", "Abort", "Abort this rollout? Devices not yet reached will not get the job.")}</div>` : ""}
<p>${r.counts.total} devices: ${r.counts.succeeded} succeeded, ${r.counts.failed} failed, ${r.counts.running} running, ${r.counts.pending} pending</p>
${
  r.bytes
    ? html`<p>Update bytes: ${Object.entries(r.bytes)
        .filter(([, n]) => n)
        .map(
          ([k, n]) => html`<span class="count">${k} ${n}</span> `,
        )} · saved ${r.bytesSaved ?? 0} (not from the center)</p>`
    : ""
}
<table><thead><tr><th scope="col">Wave</th><th scope="col">Size</th><th scope="col">State</th><th scope="col">Progress</th></tr></thead><tbody>
${r.waves.map(
  (w) =>
    html`<tr><td>${w.wave}</td><td>${w.spec}</td><td>${state(w.state)}</td><td><progress max="${w.devices}" value="${w.succeeded + w.failed}" aria-label="wave ${w.wave} progress"></progress> ${w.succeeded} succeeded${w.failed ? html`, ${w.failed} failed` : ""} of ${w.devices}</td></tr>`,
)}</tbody></table>
${
  r.failures.length
    ? html`<h2>Failures</h2><ul>${r.failures.map((f) => html`<li><a href="/devices/${encodeURIComponent(f.deviceId)}">${f.deviceId}</a> ${state(f.state)} ${f.reason}: ${f.message}</li>`)}</ul>`
    : ""
}`;
}

export function artifactsPage(
  list: Array<{
    name: string;
    version: string;
    size: number;
    sha256: string;
    hardware: string[];
    createdAt: number;
  }>,
): Html {
  return html`<h1>Artifacts</h1>
<table><thead><tr><th scope="col">Name</th><th scope="col">Version</th><th scope="col">Size</th><th scope="col">Hardware</th><th scope="col">sha256</th><th scope="col">Pushed</th></tr></thead><tbody>
${list.map(
  (a) =>
    html`<tr><td>${a.name}</td><td>${a.version}</td><td>${a.size}</td><td>${a.hardware.join(", ") || "any"}</td><td><code>${a.sha256.slice(0, 16)}…</code></td><td><time>${new Date(a.createdAt).toISOString()}</time></td></tr>`,
)}</tbody></table>`;
}

export function messagePage(title: string, text: string): Html {
  return html`<h1>${title}</h1><p>${text}</p>`;
}
