// PMGD dashboard: the API's built-in live view of its jobs. Vanilla JS, inline SVG plots.
//
// It polls the REST API of the origin it was served from (GET /jobs, /jobs/{id}/metrics?since=,
// /jobs/{id}/logs?since=, /cluster) about once a second and appends what is new. Every plot's
// <svg> carries data-series and data-points (what it drew), and <body data-ready="1"> is set
// after the first successful metrics render, so a headless browser can check the page.
"use strict";

const POLL_MS = 1000;
const CLUSTER_EVERY = 5; // polls between GET /cluster
const MAX_DRAWN = 1500; // points drawn per series (older points are thinned, never the newest)
const FINAL = new Set(["finished", "diverged", "stopped", "failed", "interrupted"]);
const ALLOWED = { // which control buttons a state enables (the API answers 409 otherwise)
  start: ["created"],
  pause: ["running"],
  resume: ["paused", "interrupted"],
  stop: ["created", "running", "paused", "interrupted"],
  delete: ["created", "finished", "diverged", "stopped", "failed", "interrupted"],
};
const PALETTE = ["#2f6fdb", "#e4572e", "#17a398", "#f0a202", "#8e5ad8", "#d6336c", "#5c7c8a", "#76b041",
                 "#1b998b", "#c44536"];
const COLORS = { cost: "#2f6fdb", accuracy: "#17a34a", angle: "#e4572e" };

// The API's base path: the page is served at <base>/dashboard.
const BASE = location.pathname.replace(/\/dashboard\/?$/, "").replace(/\/$/, "");
const $ = (sel) => document.querySelector(sel);

const S = {
  jobs: [],
  selected: new URLSearchParams(location.search).get("job") || "",
  job: null,
  series: {}, // name → [[tick, value], ...]
  lastTick: {}, // name → newest tick held
  since: -1, // ?since= of the next metrics poll: the newest tick held (the API writes each flush atomically)
  metricsDone: false, // the job ended and its last metrics were read
  logSeq: 0,
  logLines: 0,
  polls: 0,
  ready: false,
  loaded: false, // the job list was read once
};

// --- HTTP ------------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = localStorage.getItem("pmgd.token") || "";
  if (token && method !== "GET") headers.Authorization = "Bearer " + token;
  const resp = await fetch(BASE + path, {
    method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) {
    let detail = resp.statusText || "error";
    try {
      const j = await resp.json();
      if (typeof j.detail === "string") detail = j.detail;
      else if (Array.isArray(j.detail)) {
        detail = j.detail.map((d) => (d.loc ? d.loc.filter((x) => x !== "body").join(".") + ": " : "") + d.msg).join("; ");
      }
    } catch (_) { /* not JSON */ }
    if (resp.status === 401) detail += " (set the API token at the top right)";
    throw new HttpError(resp.status, detail);
  }
  return resp.status === 204 ? null : resp.json();
}

// --- formatting ------------------------------------------------------------------------------

function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e9) return v.toLocaleString("en-US");
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

function fmtTick(v) { // axis labels: 0, 500, 1.5k, 20k, 1M
  const a = Math.abs(v);
  const trim = (x) => String(Number(x.toPrecision(3)));
  if (a >= 1e6) return trim(v / 1e6) + "M";
  if (a >= 1e3) return trim(v / 1e3) + "k";
  return trim(v);
}

function fmtLog(v) { // log-axis labels
  if (v >= 0.01 && v < 1e4) return String(Number(v.toPrecision(2)));
  const e = Math.round(Math.log10(v));
  return Math.abs(v / 10 ** e - 1) < 1e-9 ? "1e" + e : v.toExponential(0);
}

function fmtWhen(t) {
  if (!t) return "—";
  const d = new Date(t * 1000);
  const now = new Date();
  const hm = d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return d.toDateString() === now.toDateString() ? hm : d.toISOString().slice(0, 10) + " " + hm.slice(0, 5);
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1e-3) return (s * 1e6).toPrecision(3) + " µs";
  if (s < 1) return (s * 1e3).toPrecision(3) + " ms";
  if (s < 120) return s.toPrecision(3) + " s";
  return (s / 60).toPrecision(3) + " min";
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

let toastTimer = null;
function toast(msg, kind = "error") {
  const t = $("#toast");
  t.textContent = msg;
  t.className = "toast " + kind;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 6000);
}

// --- SVG plots -------------------------------------------------------------------------------

const SVGNS = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs, parent, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

function niceStep(range, count) {
  const raw = range / Math.max(count, 1);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const f = raw / mag;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag;
}

function linearTicks(lo, hi, count) {
  const step = niceStep(hi - lo, count);
  const out = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

function thin(points) { // keep at most MAX_DRAWN points, always the first and the newest
  if (points.length <= MAX_DRAWN) return points;
  const stride = points.length / (MAX_DRAWN - 1);
  const out = [];
  for (let i = 0; i < MAX_DRAWN - 1; i++) out.push(points[Math.floor(i * stride)]);
  out.push(points[points.length - 1]);
  return out;
}

function movingAverage(points, window) { // centred mean of `window` points (the ends use fewer)
  const half = Math.floor(window / 2), out = [];
  let sum = 0, lo = 0, hi = -1;
  for (let i = 0; i < points.length; i++) {
    while (hi < Math.min(points.length - 1, i + half)) sum += points[++hi][1];
    while (lo < i - half) sum -= points[lo++][1];
    out.push([points[i][0], sum / (hi - lo + 1)]);
  }
  return out;
}

/**
 * Draw `series` ([{label, color, points: [[tick, value], ...]}]) into `svg` (viewBox 480×240).
 * opts: yLabel, log (log-10 y axis), yMin/yMax (fixed ends, else from the data), yFloorMax
 * (the top is at least this), scale (multiply values), legend, smooth (overlay a moving
 * average on the faded raw line), now (label of the newest value), empty (text when no data).
 * data-series / data-points say how many series and points were drawn (overlays not counted).
 */
function renderPlot(svg, series, opts) {
  const W = 480, H = 240, LEGEND_COLS = 5;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const scale = opts.scale || 1;
  const drawn = series
    .map((s) => ({ ...s, points: s.points.filter((p) => Number.isFinite(p[1]) && (!opts.log || p[1] > 0)) }))
    .filter((s) => s.points.length > 0)
    .map((s) => ({ ...s, smooth: opts.smooth && s.points.length > 20
      ? thin(movingAverage(s.points, Math.max(5, Math.round(s.points.length / 60)))) : null,
    points: thin(s.points) }));
  const total = drawn.reduce((n, s) => n + s.points.length, 0);
  svg.dataset.series = String(drawn.length);
  svg.dataset.points = String(total);
  const legendRows = opts.legend && drawn.length ? Math.ceil(drawn.length / LEGEND_COLS) : 1;
  const m = { l: 52, r: 14, t: 10 + 14 * legendRows, b: 38 };
  const frame = { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b };
  if (!drawn.length) {
    svgEl("rect", { ...frame, fill: "#fafbfc", stroke: "#edf0f4" }, svg);
    svgEl("text", { x: (W + m.l - m.r) / 2, y: (H - m.b + m.t) / 2, "text-anchor": "middle", class: "empty-text" }, svg,
      opts.empty || "no data yet");
    return;
  }
  let x0 = 0, x1 = 0, y0 = Infinity, y1 = -Infinity;
  for (const s of drawn) {
    for (const [t, v] of s.points) {
      x1 = Math.max(x1, t); x0 = Math.min(x0, t);
      y0 = Math.min(y0, v * scale); y1 = Math.max(y1, v * scale);
    }
  }
  if (x1 <= x0) x1 = x0 + 1;
  let yTicks, ymap;
  const py = (f) => H - m.b - f * (H - m.t - m.b);
  if (opts.log) {
    const lo = Math.floor(Math.log10(y0));
    let hi = Math.ceil(Math.log10(y1));
    if (hi <= lo) hi = lo + 1;
    const mult = hi - lo <= 2 ? [1, 2, 5] : [1];
    yTicks = [];
    for (let e = lo; e <= hi; e++) for (const k of mult) if (k === 1 || e < hi) yTicks.push(k * 10 ** e);
    ymap = (v) => py((Math.log10(v) - lo) / (hi - lo));
  } else {
    const lo = opts.yMin !== undefined ? opts.yMin : Math.min(0, y0);
    let hi = opts.yMax !== undefined ? opts.yMax : Math.max(y1, opts.yFloorMax || 0);
    if (hi <= lo) hi = lo + 1;
    if (opts.yMax === undefined) { const step = niceStep(hi - lo, 5); hi = lo + Math.ceil((hi - lo) / step - 1e-9) * step; }
    yTicks = linearTicks(lo, hi, 5);
    ymap = (v) => py((v - lo) / (hi - lo));
  }
  const xmap = (t) => m.l + ((t - x0) / (x1 - x0)) * (W - m.l - m.r);

  const grid = svgEl("g", {}, svg);
  for (const v of yTicks) {
    const y = ymap(v).toFixed(1);
    svgEl("line", { x1: m.l, x2: W - m.r, y1: y, y2: y, class: "grid" }, grid);
    svgEl("text", { x: m.l - 6, y: Number(y) + 3.5, "text-anchor": "end", class: "tick-label" }, grid,
      opts.log ? fmtLog(v) : fmtTick(v));
  }
  for (const t of linearTicks(x0, x1, 6)) {
    const x = xmap(t).toFixed(1);
    svgEl("line", { x1: x, x2: x, y1: m.t, y2: H - m.b, class: "grid" }, grid);
    svgEl("text", { x, y: H - m.b + 14, "text-anchor": "middle", class: "tick-label" }, grid, fmtTick(t));
  }
  svgEl("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }, svg);
  svgEl("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }, svg);
  svgEl("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle", class: "axis-title" }, svg,
    "perturbed ticks (τp)");
  const mid = (m.t + H - m.b) / 2;
  svgEl("text", { x: 12, y: mid, "text-anchor": "middle", class: "axis-title", transform: `rotate(-90 12 ${mid})` },
    svg, opts.yLabel);

  const path = (pts) => pts.map(([t, v]) => xmap(t).toFixed(1) + "," + ymap(v * scale).toFixed(1)).join(" ");
  for (const s of drawn) {
    const line = svgEl("polyline", { points: path(s.points), class: "series", stroke: s.color }, svg);
    if (s.smooth) {
      line.setAttribute("stroke-opacity", "0.28");
      line.setAttribute("stroke-width", "1");
      svgEl("polyline", { points: path(s.smooth), class: "series", stroke: s.color, "stroke-width": 2.2 }, svg);
    }
    svgEl("title", {}, line, s.label);
    const [lt, lv] = s.points[s.points.length - 1];
    svgEl("circle", { cx: xmap(lt).toFixed(1), cy: ymap(lv * scale).toFixed(1), r: 3, fill: s.color, class: "last-dot" }, svg);
  }
  if (opts.legend) { // above the frame, left to right
    drawn.forEach((s, i) => {
      const x = m.l + (i % LEGEND_COLS) * 66, y = 12 + Math.floor(i / LEGEND_COLS) * 14;
      svgEl("rect", { x, y: y - 5, width: 12, height: 3, fill: s.color, rx: 1 }, svg);
      svgEl("text", { x: x + 16, y: y, class: "legend" }, svg, s.label);
    });
  } else if (opts.smooth && drawn[0].smooth) {
    svgEl("text", { x: m.l, y: 12, class: "legend muted-text" }, svg, "faint: every evaluation · bold: moving average");
  }
  if (opts.now) { // the newest value, above the frame on the right
    const s = drawn[0];
    svgEl("text", { x: W - m.r, y: 12, "text-anchor": "end", class: "now" }, svg,
      opts.now(s.points[s.points.length - 1][1] * scale));
  }
}

function renderPlots() {
  const job = S.job;
  const ser = S.series;
  const ended = job && FINAL.has(job.state);
  const none = (what) => ended ? `no ${what} recorded` : job && job.state === "created" ? "not started"
    : `no ${what} recorded yet`;
  renderPlot($("#plot-cost"), [{ label: "cost", color: COLORS.cost, points: ser.cost || [] }], {
    yLabel: "cost (log scale)", log: true, empty: none("cost"),
    now: (v) => "now " + fmtNum(v, 3),
  });
  renderPlot($("#plot-accuracy"), [{ label: "accuracy", color: COLORS.accuracy, points: ser.accuracy || [] }], {
    yLabel: "accuracy (%)", yMin: 0, yMax: 100, scale: 100, // the API's accuracy is a fraction
    empty: none("accuracy"),
    now: (v) => "now " + v.toFixed(1) + " %",
  });
  const angleOn = job && job.options && job.options.angle;
  renderPlot($("#plot-angle"), [{ label: "angle", color: COLORS.angle, points: ser.angle || [] }], {
    yLabel: "angle (degrees)", yMin: 0, yFloorMax: 90, smooth: true,
    empty: angleOn ? none("angle") : "not recorded for this job",
    now: (v) => "now " + v.toFixed(1) + "°",
  });
  const shards = Object.keys(ser).filter((k) => k.startsWith("staleness."))
    .sort((a, b) => (Number(a.slice(10)) - Number(b.slice(10))) || a.localeCompare(b));
  renderPlot($("#plot-staleness"), shards.map((k, i) => ({
    label: "shard " + k.slice(10), color: PALETTE[i % PALETTE.length], points: ser[k],
  })), {
    yLabel: "staleness (ticks)", yMin: 0, yFloorMax: 1, legend: true,
    empty: job && job.engine === "local" ? "none: a local job runs in lock-step" : none("staleness"),
  });
}

// --- job list ---------------------------------------------------------------------------------

function taskOf(job) { return (job.config && job.config.task) || "?"; }

function renderJobs() {
  const body = $("#jobs tbody");
  const rows = S.jobs.slice().reverse(); // newest first
  $("#job-count").textContent = S.jobs.length ? `(${S.jobs.length})` : "";
  $("#jobs-empty").hidden = S.jobs.length > 0;
  body.innerHTML = rows.map((j) => `
    <tr data-id="${esc(j.id)}" class="${j.id === S.selected ? "selected" : ""}" title="${esc(j.id)}">
      <td class="id">${esc(j.id.slice(0, 8))}</td>
      <td><span class="badge ${esc(j.state)}">${esc(j.state)}</span></td>
      <td>${esc(j.engine)}</td>
      <td>${esc(taskOf(j))}</td>
      <td class="num">${fmtNum(j.tick || 0)}</td>
      <td>${fmtWhen(j.created)}</td>
    </tr>`).join("");
}

function select(id) {
  if (id === S.selected && S.job) return;
  S.selected = id;
  S.job = S.jobs.find((j) => j.id === id) || null;
  S.series = {}; S.lastTick = {}; S.since = -1; S.metricsDone = false;
  S.logSeq = 0; S.logLines = 0;
  $("#log").textContent = "";
  const url = new URL(location.href);
  url.searchParams.set("job", id);
  history.replaceState(null, "", url);
  renderJobs();
  renderJob();
  renderPlots();
  poll(); // at once, not at the next beat
}

// --- selected job -----------------------------------------------------------------------------

function latest(name) {
  const s = S.series[name];
  return s && s.length ? s[s.length - 1][1] : null;
}

function renderJob() {
  const job = S.job;
  $("#no-selection").hidden = !!job;
  $("#job-view").hidden = !job;
  if (!job) {
    $("#no-selection").textContent = S.selected && S.loaded ? `No job ${S.selected} on this API.`
      : S.loaded ? "Select a job on the left, or submit a new one." : "Loading…";
    return;
  }
  const c = job.config || {};
  $("#job-task").textContent = `${taskOf(job)} · ${(c.perturbation || "").toUpperCase()}`;
  const badge = $("#job-state");
  badge.textContent = job.state;
  badge.className = "badge " + job.state;
  $("#job-sub").textContent = `${job.id} · ${job.engine} engine · ${c.network || ""} · ${c.mode || ""}` +
    ` · created ${fmtWhen(job.created)}`;
  const maxTicks = c.max_ticks || 0;
  const done = job.state === "finished" ? 1 : maxTicks ? Math.min(1, (job.tick || 0) / maxTicks) : 0;
  $("#job-progress").style.width = (100 * done).toFixed(1) + "%";
  for (const b of document.querySelectorAll(".controls button")) {
    b.disabled = !ALLOWED[b.dataset.action].includes(job.state);
  }
  const err = $("#job-error");
  err.hidden = !job.error;
  err.textContent = job.error || "";

  const s = job.summary || {};
  const runs = s.runs || c.seeds || 1;
  const items = [];
  const add = (label, value, small, wide) => items.push([label, value, small, wide]);
  add("tick", fmtNum(job.tick || 0), maxTicks ? "of " + fmtNum(maxTicks) : "");
  if (job.summary) {
    add("converged", `${s.converged} / ${s.runs}`, "runs at target");
    if (s.diverged) {
      const first = Math.min(...s.diverged_at.filter(t => t >= 0));
      add("diverged", `${s.diverged} / ${s.runs}`, `cost or weights not finite · first at tick ${fmtNum(first)}`);
    }
    const med = s.ticks_to_solution_median;
    add("ticks to target", med === null || med === undefined ? "not reached" : fmtNum(med),
      med !== null && med !== undefined && s.runs > 1 ? `median · q1–q3 ${fmtNum(s.ticks_to_solution_q1)}–${fmtNum(s.ticks_to_solution_q3)}` : "");
    add("final cost", s.final_cost_median === null ? "—" : fmtNum(s.final_cost_median), runs > 1 ? "median" : "");
    add("final accuracy", s.final_accuracy_median == null ? "—" : (100 * s.final_accuracy_median).toFixed(1) + " %",
      runs > 1 ? "median" : "");
    if (s.wall_time_s !== undefined) add("wall time", fmtDuration(s.wall_time_s));
  } else {
    const solved = latest("solved");
    if (c.target_accuracy === null && c.target_cost === null) add("solved", "no target", "stopping rule off");
    else add("solved", solved === null ? "—" : `${fmtNum(solved)} / ${runs}`, "runs at target");
    add("cost", fmtNum(latest("cost"), 3), runs > 1 ? "median, latest" : "latest");
    const acc = latest("accuracy");
    add("accuracy", acc === null ? "—" : (100 * acc).toFixed(1) + " %", runs > 1 ? "median, latest" : "latest");
  }
  const tps = latest("ticks_per_second");
  if (tps !== null) add("speed", fmtNum(Math.round(tps)), "ticks / s");
  const ang = latest("angle");
  if (ang !== null) add("gradient angle", ang.toFixed(1) + "°", "latest");
  const dropped = latest("dropped");
  if (dropped !== null) add("dropped", fmtNum(dropped), "messages");
  add("config", `${c.seeds || 1} seed${(c.seeds || 1) > 1 ? "s" : ""}`,
    `η ${fmtNum(c.eta)} · A ${fmtNum(c.amplitude)} · τθ ${c.tau_theta} · τx ${c.tau_x}` +
    (c.timing && c.timing !== "sync" ? ` · ${c.timing}` : "") + (c.nodes > 1 ? ` · ${c.nodes} nodes` : ""), true);
  $("#summary").innerHTML = items.map(([l, v, sm, wide]) =>
    `<div${wide ? ' class="wide"' : ""}><dt>${esc(l)}</dt><dd>${esc(v)}${sm ? ` <small>${esc(sm)}</small>` : ""}</dd></div>`).join("");
}

function mergeMetrics(resp) {
  for (const [name, points] of Object.entries(resp.series || {})) {
    const have = S.series[name] || (S.series[name] = []);
    let last = S.lastTick[name] ?? -Infinity;
    for (const p of points) {
      if (p[0] > last) { have.push(p); last = p[0]; }
    }
    S.lastTick[name] = last;
    if (last > S.since) S.since = last;
  }
}

async function pollMetrics() {
  const job = S.job;
  if (!job || S.metricsDone || job.state === "created") return;
  const ended = FINAL.has(job.state);
  const resp = await api("GET", `/jobs/${encodeURIComponent(job.id)}/metrics?since=${S.since}`);
  if (job !== S.job) return; // another job was selected meanwhile
  mergeMetrics(resp);
  renderPlots();
  renderJob();
  if (ended) S.metricsDone = true; // read once more after it ended: nothing further comes
  if (!S.ready) {
    S.ready = true;
    document.body.dataset.ready = "1";
  }
}

async function pollLogs() {
  const job = S.job;
  if (!job) return;
  const resp = await api("GET", `/jobs/${encodeURIComponent(job.id)}/logs?since=${S.logSeq}`);
  if (job !== S.job || !resp.lines || !resp.lines.length) return;
  const box = $("#log");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 8;
  const frag = document.createDocumentFragment();
  for (const line of resp.lines) {
    if (line.seq <= S.logSeq) continue;
    S.logSeq = line.seq;
    S.logLines++;
    const t = document.createElement("span");
    t.className = "t";
    t.textContent = new Date(line.time * 1000).toLocaleTimeString("en-GB") + "  ";
    frag.appendChild(t);
    frag.appendChild(document.createTextNode(line.text + "\n"));
  }
  box.appendChild(frag);
  $("#log-count").textContent = `(${S.logLines} line${S.logLines === 1 ? "" : "s"})`;
  if (atBottom) box.scrollTop = box.scrollHeight;
}

async function pollJobs() {
  S.jobs = await api("GET", "/jobs");
  S.loaded = true;
  if (!S.selected && S.jobs.length) { // default: the newest running job, else the newest job
    const running = S.jobs.filter((j) => j.state === "running");
    S.selected = (running.length ? running[running.length - 1] : S.jobs[S.jobs.length - 1]).id;
  }
  const fresh = S.jobs.find((j) => j.id === S.selected) || null;
  if (fresh && S.job && fresh.state !== S.job.state && !FINAL.has(fresh.state)) S.metricsDone = false;
  S.job = fresh;
  renderJobs();
  renderJob();
}

async function pollCluster() {
  const pill = $("#cluster");
  try {
    const c = await api("GET", "/cluster");
    const nodes = Object.keys(c.nodes || {}).length;
    if (!c.broadcaster) {
      pill.className = "pill off";
      pill.textContent = "no cluster (local engine only)";
    } else {
      pill.className = "pill " + (c.reachable ? "ok" : "bad");
      pill.textContent = c.reachable ? `cluster ${c.state || "up"} · ${nodes} node${nodes === 1 ? "" : "s"}`
        : "cluster unreachable";
    }
    pill.title = c.broadcaster || "no broadcaster configured";
  } catch (e) {
    pill.className = "pill bad";
    pill.textContent = "cluster status unavailable";
  }
}

let polling = false;
async function poll() {
  if (polling) return;
  polling = true;
  try {
    await pollJobs();
    await pollMetrics();
    await pollLogs();
    if (S.polls % CLUSTER_EVERY === 0) await pollCluster();
  } catch (e) {
    toast(e instanceof HttpError ? `API: ${e.message}` : `cannot reach the API (${e.message})`);
  } finally {
    S.polls++;
    polling = false;
  }
}

// --- actions ----------------------------------------------------------------------------------

async function control(action) {
  const job = S.job;
  if (!job) return;
  try {
    if (action === "delete") {
      if (!confirm(`Delete job ${job.id} and all its metrics?`)) return;
      await api("DELETE", `/jobs/${encodeURIComponent(job.id)}`);
      S.selected = ""; S.job = null;
      history.replaceState(null, "", location.pathname);
      toast(`job ${job.id} deleted`, "info");
    } else {
      const updated = await api("POST", `/jobs/${encodeURIComponent(job.id)}/${action}`);
      S.job = updated;
      S.metricsDone = false;
      renderJob();
    }
  } catch (e) {
    toast(`${action}: ${e.message}`);
  }
  poll();
}

async function submitJob(ev) {
  ev.preventDefault();
  const f = ev.target;
  const msg = $("#form-msg");
  const config = {
    task: f.task.value.trim(),
    perturbation: f.perturbation.value,
    seeds: Number(f.seeds.value),
    max_ticks: Number(f.max_ticks.value),
  };
  if (config.perturbation === "fm") config.mode = "analog"; // FM is the analog perturbation
  msg.className = "form-msg";
  msg.textContent = "submitting…";
  try {
    const job = await api("POST", "/jobs", {
      config, engine: f.engine.value, start: f.start.checked, angle: f.angle.checked,
    });
    msg.textContent = `job ${job.id} ${job.state}`;
    S.jobs.push(job);
    select(job.id);
  } catch (e) {
    msg.className = "form-msg bad";
    msg.textContent = e.message;
  }
}

function init() {
  const token = $("#token");
  token.value = localStorage.getItem("pmgd.token") || "";
  token.addEventListener("input", () => localStorage.setItem("pmgd.token", token.value.trim()));
  $("#jobs tbody").addEventListener("click", (ev) => {
    const row = ev.target.closest("tr[data-id]");
    if (row) select(row.dataset.id);
  });
  for (const b of document.querySelectorAll(".controls button")) {
    b.addEventListener("click", () => control(b.dataset.action));
  }
  $("#new-job").addEventListener("submit", submitJob);
  const form = $("#new-job");
  form.engine.addEventListener("change", () => { // the API records the angle on the local engine only
    const cluster = form.engine.value === "cluster";
    form.angle.disabled = cluster;
    if (cluster) form.angle.checked = false;
  });
  renderJob();
  renderPlots();
  poll();
  setInterval(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", init);
