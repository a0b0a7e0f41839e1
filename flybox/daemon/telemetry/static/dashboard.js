// flybox live dashboard: history once (/api/dashboard/history), then Server-Sent Events
// (/api/dashboard/events). Plots are plain SVG drawn here: no library, no network access.
const TOKEN = new URLSearchParams(location.search).get("token");
const THUMBS = 8;
const state = {
  status: null, micrographs: [], statusHistory: [], incidents: [], alerts: new Map(),
  models: [], stream: null, diameter: null, picking: false, updates: 0, lastUpdate: null,
  connected: false,
};
window.flyboxDashboard = state;

const $ = (id) => document.getElementById(id);
const withToken = (url) => (TOKEN ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN) : url);

async function getJSON(url) {
  const headers = TOKEN ? { Authorization: "Bearer " + TOKEN } : {};
  const response = await fetch(url, { headers });
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return response.json();
}

const fmt = (n) => (n >= 1e6 ? (n / 1e6).toFixed(2) + " M" : n >= 1e4 ? (n / 1e3).toFixed(1) + " k" : String(Math.round(n)));
function duration(s) {
  if (s === null || s === undefined) return "never at this rate";
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

// ------------------------------------------------------------------------------ plots
const SVGNS = "http://www.w3.org/2000/svg";
function el(name, attrs, text) {
  const node = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function niceTicks(lo, hi, count) {
  if (!(hi > lo)) { hi = lo + 1; }
  const step0 = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(+v.toFixed(10));
  return ticks;
}
// points: [{x, y, cls}]; x in seconds (epoch), drawn as a line plus dots.
function plot(svg, points, { line = true, dots = true, digits = 0 } = {}) {
  const w = svg.clientWidth || 400, h = svg.clientHeight || 150;
  const m = { l: 44, r: 8, t: 8, b: 20 };
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const pts = points.filter((p) => p.y !== null && p.y !== undefined && isFinite(p.y));
  if (!pts.length) {
    svg.append(el("text", { x: w / 2, y: h / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
    return;
  }
  let x0 = Math.min(...pts.map((p) => p.x)), x1 = Math.max(...pts.map((p) => p.x));
  if (x1 - x0 < 60) { x0 -= 30; x1 += 30; }
  let y0 = Math.min(0, ...pts.map((p) => p.y)), y1 = Math.max(...pts.map((p) => p.y));
  if (y1 <= y0) y1 = y0 + 1;
  y1 += (y1 - y0) * 0.08;
  const X = (x) => m.l + ((x - x0) / (x1 - x0)) * (w - m.l - m.r);
  const Y = (y) => h - m.b - ((y - y0) / (y1 - y0)) * (h - m.t - m.b);
  for (const t of niceTicks(y0, y1, 4)) {
    svg.append(el("line", { x1: m.l, x2: w - m.r, y1: Y(t), y2: Y(t), class: "axis" }));
    svg.append(el("text", { x: m.l - 4, y: Y(t) + 3, "text-anchor": "end", class: "tick" }, t.toFixed(digits)));
  }
  for (const [t, anchor] of [[x0, "start"], [(x0 + x1) / 2, "middle"], [x1, "end"]]) {
    svg.append(el("text", { x: X(t), y: h - 5, "text-anchor": anchor, class: "tick" }, clock(t)));
  }
  if (line && pts.length > 1) {
    svg.append(el("polyline", { class: "series", points: pts.map((p) => `${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`).join(" ") }));
  }
  if (dots) {
    for (const p of pts.slice(-400)) svg.append(el("circle", { cx: X(p.x), cy: Y(p.y), r: 2.4, class: "dot " + (p.cls || "") }));
  }
}

function drawPlots() {
  const mics = state.micrographs, hist = state.statusHistory;
  const cls = (m) => (m.version > 1 ? "v2" : "");
  plot($("p-throughput"), hist.map((s) => ({ x: s.t, y: s.mph })), { dots: false, digits: 0 });
  plot($("p-latency"), mics.map((m) => ({ x: m.t, y: m.latency, cls: cls(m) })), { line: false, digits: 1 });
  plot($("p-particles"), mics.map((m) => ({ x: m.t, y: m.particles, cls: cls(m) })), { line: false });
  plot($("p-defocus"), mics.map((m) => ({ x: m.t, y: m.defocus === null ? null : m.defocus / 1e4 })), { line: false, digits: 2 });
  plot($("p-score"), mics.map((m) => ({ x: m.t, y: m.score, cls: cls(m) })), { line: false, digits: 2 });
  plot($("p-backlog"), hist.map((s) => ({ x: s.t, y: s.backlog })), { dots: false });
}

// ------------------------------------------------------------------------------ cards, lists
function drawStatus() {
  const s = state.status;
  if (!s) return;
  const c = s.counts;
  $("c-done").textContent = fmt(c.done);
  $("c-queue").textContent = `${c.queued} · ${c.running}`;
  $("c-waiting").textContent = fmt(c.waiting);
  $("c-failed").textContent = `${c.failed} · ${c.quarantined}`;
  // Red only when something failed or was quarantined.
  $("card-failed").classList.toggle("warn", c.failed + c.quarantined > 0);
  // The main stream's count (the chain's first output) large; the other sets small beside it.
  const counts = s.particles || {};
  const names = Object.keys(counts);
  const main = names.includes(state.stream) ? state.stream : names[0];
  if (main !== undefined) {
    $("c-particles").textContent = fmt(counts[main]);
    $("c-particles-label").textContent = main === "particles" ? "particles" : `particles · ${main}`;
    $("c-particles-more").textContent = names.filter((n) => n !== main)
      .map((n) => `${n} ${fmt(counts[n])}`).join(" · ");
  }
  $("c-rate").textContent = (s.rates ? s.rates.micrographs_per_hour : s.mph || 0).toFixed(0);
  const backlog = s.backlog && typeof s.backlog === "object" ? s.backlog : { micrographs: s.backlog, catch_up_seconds: s.catch_up };
  $("c-backlog").textContent = fmt(backlog.micrographs || 0);
  $("c-catchup").textContent = backlog.micrographs ? "backlog · catch-up " + duration(backlog.catch_up_seconds) : "backlog";
  const badge = $("state");
  badge.textContent = s.state;
  badge.className = "badge " + s.state;
}

function drawLists() {
  const alerts = $("alerts");
  alerts.replaceChildren();
  for (const a of state.alerts.values()) {
    const li = document.createElement("li");
    li.className = "alert";
    li.textContent = `${a.rule}: ${a.message}`;
    alerts.append(li);
  }
  if (!state.alerts.size) alerts.innerHTML = '<li class="none">none</li>';
  const incidents = $("incidents");
  incidents.replaceChildren();
  for (const i of state.incidents.slice(0, 30)) {
    const li = document.createElement("li");
    li.textContent = `${clock(i.t)} ${i.type}: ${i.path.split("/").pop()}: ${i.reason}`;
    li.title = i.path;
    incidents.append(li);
  }
  if (!state.incidents.length) incidents.innerHTML = '<li class="none">none</li>';
  const model = state.models.length ? state.models[state.models.length - 1].version : null;
  if (model !== null || state.picking) {
    $("card-model").hidden = false;
    $("c-model").textContent = model === null ? "v1" : "v" + model;
  }
}

// ------------------------------------------------------------------------------ thumbnails
async function addThumb(m) {
  const box = $("thumbs");
  const old = box.querySelector(`[data-name="${CSS.escape(m.name)}"]`);
  if (old) old.remove();
  const card = document.createElement("div");
  card.className = "thumb";
  card.dataset.name = m.name;
  card.dataset.version = m.version;
  const origins = Object.entries(m.origins || {}).map(([k, v]) => `${v} ${k}`).join(", ");
  card.innerHTML = `<div class="img"><img alt=""><svg preserveAspectRatio="none"></svg></div>
    <div class="cap"><b></b><span></span></div>`;
  card.querySelector("b").textContent = m.name + (m.version > 1 ? ` (v${m.version})` : "");
  card.querySelector("b").title = m.name;
  card.querySelector(".cap span").textContent = `${m.particles} particles` + (origins ? ` · ${origins}` : "");
  box.prepend(card);
  while (box.children.length > THUMBS) box.lastChild.remove();
  const base = "/api/dashboard/micrographs/" + encodeURIComponent(m.name);
  const img = card.querySelector("img");
  const loaded = new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; });
  img.src = withToken(base + "/thumbnail.png?v=" + m.version);
  try {
    const picks = await getJSON(base + "/picks");
    const svg = card.querySelector("svg");
    if (picks.shape) {
      const [ny, nx] = picks.shape;
      svg.setAttribute("viewBox", `0 0 ${nx} ${ny}`);
      const r = (state.diameter || nx / 40) / 2;
      for (const [x, y, origin] of picks.picks) {
        svg.append(el("circle", { cx: x, cy: y, r, class: origin, "vector-effect": "non-scaling-stroke" }));
      }
      card.dataset.picks = picks.picks.length;
    }
  } catch (error) {
    card.dataset.error = String(error);
  }
  await loaded;
  card.dataset.loaded = "true";
}

// ------------------------------------------------------------------------------ live
let pending = false;
function redraw() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => { pending = false; drawStatus(); drawPlots(); drawLists(); });
}

function connect() {
  const source = new EventSource(withToken("/api/dashboard/events"));
  source.onopen = () => { state.connected = true; $("live").textContent = "● live"; $("live").className = "live on"; };
  source.onerror = () => { state.connected = false; $("live").textContent = "○ reconnecting"; $("live").className = "live"; };
  source.addEventListener("micrograph", (e) => {
    const m = JSON.parse(e.data);
    state.micrographs.push(m);
    if (state.micrographs.length > 2000) state.micrographs.shift();
    state.updates += 1;
    state.lastUpdate = { name: m.name, version: m.version, receivedAt: Date.now() };
    addThumb(m);
    redraw();
  });
  source.addEventListener("status", (e) => {
    const s = JSON.parse(e.data);
    state.statusHistory.push(s);
    if (state.statusHistory.length > 2000) state.statusHistory.shift();
    state.status = { ...state.status, state: s.state, counts: s.counts, particles: s.particles,
      rates: { micrographs_per_hour: s.mph, particles_per_hour: s.pph },
      backlog: { micrographs: s.backlog, catch_up_seconds: s.catch_up } };
    redraw();
  });
  source.addEventListener("incident", (e) => { state.incidents.unshift(JSON.parse(e.data)); redraw(); });
  source.addEventListener("alert", (e) => {
    const a = JSON.parse(e.data);
    if (a.active) state.alerts.set(a.rule, a); else state.alerts.delete(a.rule);
    redraw();
  });
  source.addEventListener("model", (e) => { state.models.push(JSON.parse(e.data)); redraw(); });
}

async function start() {
  const history = await getJSON("/api/dashboard/history");
  state.status = history.status;
  state.micrographs = history.micrographs;
  state.statusHistory = history.status_history;
  state.incidents = history.incidents;
  state.models = history.models;
  state.stream = history.stream;
  state.diameter = history.particle_diameter;
  state.picking = history.picking;
  for (const a of history.status.alerts) state.alerts.set(a.rule, { rule: a.rule, message: a.message, active: true });
  $("session").textContent = history.status.session;
  document.title = "flybox · " + history.status.session;
  if (history.picking) { $("pick-link").hidden = false; $("pick-link").href = withToken("/pick/"); }
  connect();
  drawStatus(); drawPlots(); drawLists();
  const seen = new Set();
  const recent = [];
  for (const m of [...state.micrographs].reverse()) {
    if (seen.has(m.name)) continue;
    seen.add(m.name);
    recent.push(m);
    if (recent.length >= THUMBS) break;
  }
  await Promise.all(recent.reverse().map(addThumb));
  window.addEventListener("resize", redraw);
  document.body.dataset.ready = "true";
}

start().catch((error) => {
  document.body.dataset.ready = "error";
  $("state").textContent = "error: " + error.message;
});
