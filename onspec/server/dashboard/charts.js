/* onspec dashboard: a small canvas line-chart drawer (no dependencies, nothing fetched from the network).
 *
 * new LineChart(canvas, {series: [{key, label, color, dash}], yMin, yFloor, ref, unit})
 * chart.draw(points, events, tMin, tMax)   points: [{t, <key>: number|null}], events: [{t, kind, version}]
 *
 * After drawing, the canvas carries data-points (number of finite values drawn) and data-max (largest
 * value), which the headless-browser test reads to check that the charts are not empty.
 */
"use strict";

const EVENT_COLORS = {swap: "#7c3aed", promote: "#16a34a", "manual-promote": "#16a34a", rollback: "#dc2626",
                      "manual-rollback": "#dc2626"};
// Only these change what serves, so only these are marked on the charts (the table lists every event).
const MARKED_EVENTS = new Set(Object.keys(EVENT_COLORS));

function niceStep(range, target) {
  const raw = range / Math.max(1, target);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  const step = norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10;
  return step * mag;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a >= 1000) return (v / 1000).toFixed(a >= 10000 ? 0 : 1) + "k";
  if (a >= 10 || v === 0) return v.toFixed(0);
  if (a >= 1) return v.toFixed(1);
  return v.toFixed(2);
}

class LineChart {
  constructor(canvas, opts) {
    this.canvas = canvas;
    this.opts = Object.assign({yMin: 0, yFloor: 1, ref: null, unit: ""}, opts);
  }

  draw(points, events, tMin, tMax) {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const pad = {l: 44, r: 12, t: 26, b: 22};
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    const series = this.opts.series;

    let count = 0, yMax = -Infinity;
    for (const p of points) {
      for (const s of series) {
        const v = p[s.key];
        if (typeof v === "number" && isFinite(v)) { count++; yMax = Math.max(yMax, v); }
      }
    }
    c.dataset.points = String(count);
    c.dataset.max = count ? String(yMax) : "0";
    const yTop = Math.max(this.opts.yFloor, count ? yMax * 1.12 : 0, this.opts.ref ? this.opts.ref * 1.2 : 0);
    const yLo = this.opts.yMin;
    const X = t => pad.l + (tMax > tMin ? (t - tMin) / (tMax - tMin) : 1) * pw;
    const Y = v => pad.t + ph - ((v - yLo) / (yTop - yLo)) * ph;

    // grid and y labels
    g.font = "11px system-ui, sans-serif";
    g.fillStyle = "#6b7280";
    g.strokeStyle = "#e5e7eb";
    g.lineWidth = 1;
    const step = niceStep(yTop - yLo, 4);
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (let v = yLo; v <= yTop + 1e-9; v += step) {
      const y = Math.round(Y(v)) + 0.5;
      g.beginPath(); g.moveTo(pad.l, y); g.lineTo(pad.l + pw, y); g.stroke();
      g.fillText(fmt(v), pad.l - 6, y);
    }
    // x labels: seconds before now
    g.textAlign = "center";
    g.textBaseline = "top";
    const span = tMax - tMin;
    const xs = niceStep(span, 6);
    for (let s = 0; s <= span + 1e-9; s += xs) {
      const x = X(tMax - s);
      g.fillText(s === 0 ? "now" : "-" + (s >= 60 && s % 60 === 0 ? (s / 60) + "m" : s + "s"), x, pad.t + ph + 6);
    }
    // reference line (e.g. speedup 1.0)
    if (this.opts.ref !== null) {
      g.save();
      g.setLineDash([4, 4]);
      g.strokeStyle = "#9ca3af";
      const y = Math.round(Y(this.opts.ref)) + 0.5;
      g.beginPath(); g.moveTo(pad.l, y); g.lineTo(pad.l + pw, y); g.stroke();
      g.restore();
    }
    // drafter events: vertical markers with a label
    g.textBaseline = "top";
    g.textAlign = "left";
    let lastX = -Infinity, row = 0;
    for (const e of (events || []).slice().sort((a, b) => a.t - b.t)) {
      if (e.t < tMin || e.t > tMax || !MARKED_EVENTS.has(e.kind)) continue;
      const x = Math.round(X(e.t)) + 0.5;
      // labels of close events go on successive rows instead of on top of each other
      row = x - lastX < 70 ? (row + 1) % 4 : 0;
      lastX = x;
      g.save();
      g.strokeStyle = EVENT_COLORS[e.kind] || "#7c3aed";
      g.fillStyle = g.strokeStyle;
      g.setLineDash([3, 3]);
      g.beginPath(); g.moveTo(x, pad.t); g.lineTo(x, pad.t + ph); g.stroke();
      const label = e.kind + (e.version !== null && e.version !== undefined ? " v" + e.version : "");
      const lw = g.measureText(label).width;
      const lx = x + 3 + lw > pad.l + pw ? x - 3 - lw : x + 3;
      g.fillStyle = "rgba(255,255,255,0.85)";
      g.fillRect(lx - 1, pad.t + 2 + 12 * row, lw + 2, 12);
      g.fillStyle = g.strokeStyle;
      g.fillText(label, lx, pad.t + 2 + 12 * row);
      g.restore();
    }
    // series
    for (const s of series) {
      g.save();
      g.strokeStyle = s.color;
      g.lineWidth = 2;
      if (s.dash) g.setLineDash(s.dash);
      g.beginPath();
      let pen = false, prevT = null;
      for (const p of points) {
        const v = p[s.key];
        const ok = typeof v === "number" && isFinite(v) && p.t >= tMin;
        // a gap of more than 3 s (server restarted, tab slept) breaks the line
        if (!ok || (prevT !== null && p.t - prevT > 3)) pen = false;
        if (ok) {
          const x = X(p.t), y = Y(Math.min(v, yTop));
          if (pen) g.lineTo(x, y); else g.moveTo(x, y);
          pen = true;
          prevT = p.t;
        }
      }
      g.stroke();
      g.restore();
    }
    // legend with latest values
    g.textBaseline = "middle";
    g.textAlign = "left";
    let lx = pad.l;
    for (const s of series) {
      let last = null;
      for (let i = points.length - 1; i >= 0; i--) {
        const v = points[i][s.key];
        if (typeof v === "number" && isFinite(v)) { last = v; break; }
      }
      const text = s.label + (last === null ? "" : " " + fmt(last) + this.opts.unit);
      g.fillStyle = s.color;
      g.fillRect(lx, 8, 10, 3);
      g.fillStyle = "#374151";
      g.fillText(text, lx + 14, 10);
      lx += g.measureText(text).width + 30;
    }
    if (!count) {
      g.fillStyle = "#9ca3af";
      g.textAlign = "center";
      g.font = "13px system-ui, sans-serif";
      g.fillText("waiting for traffic\u2026", pad.l + pw / 2, pad.t + ph / 2);
    }
  }
}

window.LineChart = LineChart;
