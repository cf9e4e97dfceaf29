/* onspec dashboard: polls /v1/dashboard/series once a second, redraws four charts and fills the draft
 * policy's and the drafter events' tables.
 * An API key, when the server needs one, is read from the URL fragment (/dashboard#key=...), which the
 * browser never sends to the server, and kept in sessionStorage for reloads.
 */
"use strict";

(function () {
  const KEEP_SECONDS = 900;
  const STRATEGY_COLORS = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2"];
  const state = {points: [], events: [], since: 0, meta: null, offset: 0, draftPolicy: {steps: {}, strategies: {}}};

  const m = /(?:^|[#&])key=([^&]+)/.exec(location.hash);
  if (m) sessionStorage.setItem("onspec-key", decodeURIComponent(m[1]));
  const key = sessionStorage.getItem("onspec-key");

  const charts = {
    tps: new LineChart(document.getElementById("c-tps"), {
      series: [{key: "tokens_per_s", label: "committed", color: "#2563eb"},
               {key: "prompt_tokens_per_s", label: "prompt (prefill)", color: "#9ca3af", dash: [4, 3]}],
      yFloor: 10}),
    acc: null,
    speed: new LineChart(document.getElementById("c-speed"), {
      series: [{key: "speedup_v", label: "estimated", color: "#16a34a"},
               {key: "trainer_speedup", label: "learner's measurement", color: "#9333ea", dash: [5, 3]}],
      yFloor: 1.5, ref: 1.0, unit: "x"}),
    load: new LineChart(document.getElementById("c-load"), {
      series: [{key: "queue", label: "queue depth", color: "#dc2626"},
               {key: "running", label: "running", color: "#2563eb"},
               {key: "batch", label: "batch size", color: "#ea580c", dash: [5, 3]}],
      yFloor: 4}),
  };
  let accKeys = "";

  function accChart(points) {
    const names = new Set();
    for (const p of points) for (const k of Object.keys(p.acceptance_by_strategy || {})) if (k !== "off") names.add(k);
    const sorted = Array.from(names).sort();
    const sig = sorted.join(",");
    if (!charts.acc || sig !== accKeys) {
      accKeys = sig;
      const series = [{key: "acceptance_v", label: "all requests", color: "#111827"}];
      sorted.forEach((n, i) => series.push({key: "acc_" + n, label: n, color: STRATEGY_COLORS[i % STRATEGY_COLORS.length],
                                            dash: [5, 3]}));
      charts.acc = new LineChart(document.getElementById("c-acc"), {series, yFloor: 2, ref: 1.0});
    }
    return charts.acc;
  }

  function banner(text) {
    const b = document.getElementById("banner");
    b.textContent = text || "";
    b.classList.toggle("hidden", !text);
  }

  function fmtUptime(s) {
    s = Math.floor(s);
    const h = Math.floor(s / 3600), mi = Math.floor((s % 3600) / 60), se = s % 60;
    return (h ? h + "h " : "") + (h || mi ? mi + "m " : "") + se + "s";
  }

  function render() {
    const win = Number(document.getElementById("win").value);
    const tMax = Date.now() / 1000 - state.offset;
    // Zoom in while there is less history than the window (at least one minute shown).
    const first = state.points.length ? state.points[0].t : tMax;
    const tMin = tMax - Math.min(win, Math.max(60, tMax - first));
    const pts = state.points.filter(p => p.t >= tMin - 2);
    for (const p of pts) {
      // 0 means "nothing decoded this second": leave a gap rather than draw a misleading zero
      p.acceptance_v = p.acceptance > 0 ? p.acceptance : null;
      p.speedup_v = p.speedup > 0 ? p.speedup : null;
      for (const [k, v] of Object.entries(p.acceptance_by_strategy || {})) p["acc_" + k] = v;
    }
    charts.tps.draw(pts, state.events, tMin, tMax);
    accChart(pts).draw(pts, state.events, tMin, tMax);
    charts.speed.draw(pts, state.events, tMin, tMax);
    charts.load.draw(pts, state.events, tMin, tMax);

    const meta = state.meta;
    if (meta) {
      document.getElementById("f-model").textContent = meta.model;
      document.getElementById("f-spec").textContent = meta.speculation + (meta.online_learning ? " + online learning" : "");
      document.getElementById("f-drafter").textContent =
        meta.drafter_version !== null && meta.drafter_version !== undefined ? "v" + meta.drafter_version
          : (meta.online_learning ? "none yet" : "suffix only");
      document.getElementById("f-req").textContent = String(meta.requests_total);
      document.getElementById("f-up").textContent = fmtUptime(meta.uptime_s);
      const last = state.points[state.points.length - 1];
      document.getElementById("f-tps").textContent = last ? last.tokens_per_s.toFixed(1) : "0";
    }
    fillTable(document.querySelector("#events tbody"), state.events.slice(-12).reverse().map(e => ({
      key: e.kind,
      cells: [new Date(e.t * 1000).toLocaleTimeString(), e.kind,
              e.version === null || e.version === undefined ? "" : "v" + e.version, e.detail || ""],
      classes: {1: "kind-" + e.kind}})));
    renderDraftPolicy(state.draftPolicy);
  }

  // Replace a table body's rows with ``rows`` ({key, cells: [text or Node], classes: {index: className}});
  // with no rows the body keeps what it has (its "nothing yet" line).
  function fillTable(body, rows) {
    if (!rows.length) return;
    body.innerHTML = "";
    for (const row of rows) {
      const tr = document.createElement("tr");
      tr.dataset.key = row.key;
      row.cells.forEach((cell, i) => {
        const td = document.createElement("td");
        if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
        if (row.classes && row.classes[i]) td.className = row.classes[i];
        tr.appendChild(td);
      });
      body.appendChild(tr);
    }
  }

  function shareBar(share) {
    const cell = document.createElement("span");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(120 * share) + "px";
    cell.appendChild(bar);
    cell.appendChild(document.createTextNode((100 * share).toFixed(1) + "%"));
    return cell;
  }

  // The draft policy's counts (DraftCounts.summary, speculation/policy.py): decoding steps by the reason they
  // ended with, and per strategy the steps each gate left it out of.
  function renderDraftPolicy(policy) {
    const steps = Object.entries(policy.steps || {});
    const total = steps.reduce((sum, [, n]) => sum + n, 0);
    const stepsTable = document.getElementById("policy-steps");
    stepsTable.dataset.total = String(total);
    fillTable(stepsTable.querySelector("tbody"), steps.map(([reason, n]) => ({
      key: reason, cells: [reason, String(n), shareBar(total ? n / total : 0)]})));
    const skips = [];
    for (const [strategy, gates] of Object.entries(policy.strategies || {})) {
      for (const [gate, n] of Object.entries(gates)) skips.push({key: strategy + "/" + gate, cells: [strategy, gate, String(n)]});
    }
    fillTable(document.querySelector("#policy-skips tbody"), skips);
  }

  async function poll() {
    try {
      const headers = key ? {Authorization: "Bearer " + key} : {};
      const r = await fetch("/v1/dashboard/series?since=" + state.since, {headers, cache: "no-store"});
      if (r.status === 401) {
        banner("This server needs an API key: open /dashboard#key=YOUR_KEY");
        return;
      }
      if (!r.ok) { banner("The server answered " + r.status); return; }
      const data = await r.json();
      banner("");
      state.meta = data.meta;
      state.offset = Date.now() / 1000 - data.meta.server_time;   // tolerate clock skew
      if (data.draft_policy) state.draftPolicy = data.draft_policy;
      for (const p of data.points) state.points.push(p);
      const seen = new Set(state.events.map(e => e.t + "/" + e.kind + "/" + e.version));
      for (const e of data.events) if (!seen.has(e.t + "/" + e.kind + "/" + e.version)) state.events.push(e);
      if (state.points.length) state.since = state.points[state.points.length - 1].t;
      const cutoff = data.meta.server_time - KEEP_SECONDS;
      state.points = state.points.filter(p => p.t >= cutoff);
      state.events = state.events.filter(e => e.t >= cutoff);
    } catch (err) {
      banner("Cannot reach the server (" + err + ")");
    } finally {
      render();
    }
  }

  document.getElementById("win").addEventListener("change", render);
  window.addEventListener("resize", render);
  poll();
  setInterval(poll, 1000);
})();
