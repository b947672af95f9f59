// EdgeFleet dashboard: live pages without reloading. One server-sent event stream per page; on
// the controller's events the page's <main> is fetched again (at most once a second) and swapped
// in place — no polling per device. Charts read their data from data-chart attributes.

(() => {
  const main = document.getElementById("main");
  const drawn = [];
  window.addEventListener("resize", () => {
    for (const { plot, el } of drawn) if (el.isConnected) plot.setSize({ width: widthOf(el), height: 220 });
  });
  const widthOf = (el) => Math.max(240, Math.min(900, el.clientWidth || 600));
  const charts = () => {
    if (typeof uPlot === "undefined") return;
    for (const el of document.querySelectorAll("[data-chart]")) {
      if (el.dataset.drawn) continue;
      el.dataset.drawn = "1";
      const d = JSON.parse(el.dataset.chart);
      const colors = ["#1f6feb", "#8250df", "#bf3989"];
      const width = widthOf(el);
      const plot = new uPlot(
        {
          width,
          height: 220,
          series: [
            {},
            ...d.series.map((s, i) => ({ label: s.name, stroke: colors[i % colors.length], width: 2 })),
          ],
          axes: [{}, {}],
        },
        [d.x, ...d.series.map((s) => s.values)],
        el,
      );
      drawn.push({ plot, el });
    }
  };
  const confirmForms = () => {
    for (const f of document.querySelectorAll("form[data-confirm]")) {
      if (f.dataset.bound) continue;
      f.dataset.bound = "1";
      f.addEventListener("submit", (e) => {
        if (!window.confirm(f.dataset.confirm)) e.preventDefault();
      });
    }
  };
  charts();
  confirmForms();
  if (!main || main.dataset.live !== "1" || typeof EventSource === "undefined") return;
  let pending = false;
  let last = 0;
  const refresh = async () => {
    pending = false;
    last = Date.now();
    try {
      const res = await fetch(location.href, {
        headers: { "x-fleet-fragment": "1" },
        credentials: "same-origin",
      });
      if (res.status === 401 || res.redirected) return location.reload();
      if (!res.ok) return;
      const active = document.activeElement;
      const keepFocus = active && main.contains(active) && active.id;
      main.innerHTML = await res.text();
      charts();
      confirmForms();
      if (keepFocus) document.getElementById(keepFocus)?.focus();
      main.dataset.updated = String(Date.now());
    } catch {
      // the next event tries again
    }
  };
  const schedule = () => {
    if (pending) return;
    pending = true;
    setTimeout(refresh, Math.max(0, 1000 - (Date.now() - last)));
  };
  const events = new EventSource("/events");
  events.onmessage = schedule;
})();
