// flybox pick: the page. Plain ES module, no build step. The server renders the images and
// learns; this file draws, edits and saves (every edit is saved at once, with If-Match).

const API = document.querySelector('meta[name="flybox-api"]').content;
const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);

const state = {
  micrographs: [], summary: null, name: null, record: null, etag: null,
  items: [],            // picks: {x, y, origin, score}; auto picks below the threshold are hidden
  discarded: [],
  undo: [], redo: [],
  image: null, binning: 1, view: { scale: 1, x: 0, y: 0 },
  conflict: false, readOnly: false, saving: Promise.resolve(),
  threshold: 0.5, lowpass: null, contrast: 3,
};

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(API + path, { ...options, headers });
  return response;
}

async function apiJson(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), { status: response.status });
  return body;
}

function say(text, kind = "info", action = null) {
  const box = $("message");
  box.hidden = !text;
  box.className = kind;
  box.textContent = text || "";
  if (action) {
    const button = document.createElement("button");
    button.textContent = action.label;
    button.onclick = action.run;
    box.append(button);
  }
}

// ---- summary and list ------------------------------------------------------------------

function renderSummary() {
  const s = state.summary;
  if (!s) return;
  const labels = s.model_source === "service"
    ? `<span class="ok">autopick with the service's model</span>`
    : s.enough_labels
    ? `<span class="ok">enough labels to autopick</span>`
    : `<span class="need">${s.labels_needed} more manual picks to autopick</span>`;
  $("summary").innerHTML =
    `<span>particle <b>${s.particle_size}</b> px</span>` +
    `<span>manual <b id="sum-manual">${s.manual}</b></span>` +
    `<span>automatic kept <b id="sum-auto">${s.automatic}</b></span>` +
    `<span>discarded <b id="sum-discarded">${s.discarded}</b></span>` +
    `<span>autopick <b>${s.autopick_used ? "used" : "not used"}</b></span>` +
    `<span>model <b>v${s.model_version}</b></span>` +
    `<span>last <b>${s.last_micrograph ?? "—"}</b></span>${labels}`;
  $("autopick").disabled = !s.enough_labels || !state.name || state.readOnly;
  $("autopick-all").disabled = !s.enough_labels;
  // In the service the particle size is its model's (the server refuses another).
  $("particle-size").disabled = s.model_source === "service";
  $("particle-size").title = s.model_source === "service"
    ? "the service model's particle size ([picking] particle_size)" : "";
}

function renderList() {
  const list = $("micrographs");
  list.replaceChildren();
  $("mic-count").textContent = `(${state.micrographs.length})`;
  for (const m of state.micrographs) {
    const li = document.createElement("li");
    li.dataset.name = m.name;
    if (m.name === state.name) li.className = "current";
    const label = m.state.replace("_", " ");
    li.innerHTML = `<span class="name"></span><span class="n">${m.picks}</span>` +
      `<span class="state ${m.state}">${label}</span><span class="n">${m.discarded} ✕</span>`;
    li.querySelector(".name").textContent = m.name;
    if (m.error) {
      const error = document.createElement("span");
      error.className = "error";
      error.textContent = m.error;
      li.append(error);
    }
    li.onclick = () => openMicrograph(m.name);
    list.append(li);
  }
  list.querySelector(".current")?.scrollIntoView({ block: "nearest" });
}

async function refresh() {
  [state.micrographs, state.summary] = await Promise.all([
    apiJson("/micrographs"), apiJson("/summary"),
  ]);
  renderList();
  renderSummary();
}

// ---- the micrograph ----------------------------------------------------------------------

const size = () => state.summary?.particle_size ?? 100;
const visible = (p) => p.origin === "manual" || p.score == null || p.score >= state.threshold;
const kept = () => state.items.filter(visible);

async function loadImage() {
  const name = state.name;
  const lowpass = state.lowpass ?? Math.round(size() / 12);
  const query = `lowpass=${lowpass}&highpass=${Math.round(size() * 3)}&contrast=${state.contrast}`;
  const response = await api(`/micrographs/${encodeURIComponent(name)}/image?${query}`);
  if (name !== state.name) return;
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    state.image = null;
    say(`Cannot show ${name}: ${body.error || response.statusText}`, "error");
    draw();
    return;
  }
  const bitmap = await createImageBitmap(await response.blob());
  if (name !== state.name) return;
  const first = !state.image || state.image.width !== bitmap.width;
  state.image = bitmap;
  state.binning = Number(response.headers.get("X-Binning") || 1);
  if (first) fit();
  draw();
}

async function openMicrograph(name) {
  if (!name) return;
  await state.saving;
  state.name = name;
  state.undo = []; state.redo = [];
  state.conflict = false;
  say("");
  $("current-name").textContent = name;
  const response = await api(`/micrographs/${encodeURIComponent(name)}/picks`);
  const record = await response.json();
  if (!response.ok) { say(record.error || response.statusText, "error"); return; }
  loadRecord(record, response.headers.get("ETag"));
  apiJson("/session", { method: "PUT", json: { last_micrograph: name } })
    .then((s) => { state.summary = s; renderSummary(); }).catch(() => {});
  renderList();
  loadImage();
}

function loadRecord(record, etag) {
  state.record = record;
  state.items = record.picks.map((p) => ({ ...p }));
  state.discarded = record.discarded.map((p) => ({ ...p }));
  state.readOnly = Boolean(record.picks_error);
  if (record.picks_error) say(record.picks_error, "error");
  else if (record.error) say(record.error, "error");
  state.etag = etag;
  updateCounts();
  draw();
}

function updateCounts() {
  $("count-picks").textContent = kept().length;
  $("count-discarded").textContent = state.discarded.length;
  $("undo").disabled = !state.undo.length;
  $("redo").disabled = !state.redo.length;
}

// ---- saving ------------------------------------------------------------------------------

function save(extra = {}) {
  const name = state.name;
  const body = { picks: kept(), discarded: state.discarded, ...extra };
  state.saving = state.saving.then(async () => {
    if (state.conflict || state.readOnly || name !== state.name) return;
    const response = await api(`/micrographs/${encodeURIComponent(name)}/picks`, {
      method: "PUT", json: body, headers: { "If-Match": state.etag },
    });
    const answer = await response.json().catch(() => ({}));
    if (response.status === 409) {
      state.conflict = true;
      say(`Not saved: ${answer.error}. Your last change is only on this page.`, "error",
        { label: "Reload this micrograph", run: () => openMicrograph(name) });
      return;
    }
    if (!response.ok) { say(`Not saved: ${answer.error || response.statusText}`, "error"); return; }
    state.etag = response.headers.get("ETag");
    const m = state.micrographs.find((x) => x.name === name);
    if (m) Object.assign(m, { picks: answer.picks.length, discarded: answer.discarded.length, state: answer.state });
    renderList();
    state.summary = await apiJson("/summary");
    renderSummary();
  }).catch((error) => say(`Not saved: ${error.message}`, "error"));
  return state.saving;
}

function edit(change) {
  if (state.readOnly || state.conflict || !state.name) return;
  state.undo.push(snapshot());
  state.redo = [];
  change();
  updateCounts();
  draw();
  save();
}

const snapshot = () => JSON.stringify([state.items, state.discarded]);
function restore(text) { [state.items, state.discarded] = JSON.parse(text); }

function undo() {
  if (!state.undo.length || state.conflict) return;
  state.redo.push(snapshot()); restore(state.undo.pop());
  updateCounts(); draw(); save();
}
function redo() {
  if (!state.redo.length || state.conflict) return;
  state.undo.push(snapshot()); restore(state.redo.pop());
  updateCounts(); draw(); save();
}

// ---- drawing -----------------------------------------------------------------------------

const canvas = $("canvas");
const context = canvas.getContext("2d");

function toScreen(x, y) {
  const v = state.view;
  return [v.x + (x / state.binning) * v.scale, v.y + (y / state.binning) * v.scale];
}
function toMicrograph(sx, sy) {
  const v = state.view;
  return [((sx - v.x) / v.scale) * state.binning, ((sy - v.y) / v.scale) * state.binning];
}

function fit() {
  if (!state.image) return;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  const scale = Math.min(w / state.image.width, h / state.image.height);
  state.view = { scale, x: (w - state.image.width * scale) / 2, y: (h - state.image.height * scale) / 2 };
  state.fitted = true;
  draw();
}

function scoreColour(score) {
  // low → blue-violet, high → yellow (perceptually ordered, readable on grey)
  const t = Math.max(0, Math.min(1, (score - 0.2) / 0.8));
  const hue = 260 - 205 * t;
  return `hsl(${hue}, 95%, ${55 + 10 * t}%)`;
}

function draw() {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
  }
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.fillStyle = "#0d0f12";
  context.fillRect(0, 0, w, h);
  if (!state.image) return;
  const v = state.view;
  context.imageSmoothingEnabled = v.scale < 2;
  context.drawImage(state.image, v.x, v.y, state.image.width * v.scale, state.image.height * v.scale);
  const radius = (size() / 2 / state.binning) * v.scale;
  context.lineWidth = Math.max(1.5, Math.min(3, radius / 12));
  for (const p of state.discarded) {
    const [sx, sy] = toScreen(p.x, p.y);
    const r = Math.max(3, radius * 0.25);
    context.strokeStyle = "rgba(255, 93, 93, 0.75)";
    context.beginPath();
    context.moveTo(sx - r, sy - r); context.lineTo(sx + r, sy + r);
    context.moveTo(sx + r, sy - r); context.lineTo(sx - r, sy + r);
    context.stroke();
  }
  for (const p of state.items) {
    if (!visible(p)) continue;
    const [sx, sy] = toScreen(p.x, p.y);
    context.strokeStyle = p.origin === "manual" ? "#38e07b" : scoreColour(p.score ?? 1);
    context.setLineDash(p.origin === "manual" ? [] : [6, 3]);
    context.beginPath();
    context.arc(sx, sy, radius, 0, 2 * Math.PI);
    context.stroke();
    if (p === drag.item) {
      context.fillStyle = "rgba(255,255,255,0.15)";
      context.fill();
    }
  }
  context.setLineDash([]);
}

// ---- mouse and keyboard ------------------------------------------------------------------

const drag = { active: false, item: null, panning: false, moved: false, startX: 0, startY: 0, view: null };

function hit(sx, sy) {
  const radius = (size() / 2 / state.binning) * state.view.scale;
  let best = null, bestDistance = Infinity;
  for (const p of state.items) {
    if (!visible(p)) continue;
    const [px, py] = toScreen(p.x, p.y);
    const d = Math.hypot(px - sx, py - sy);
    if (d <= radius && d < bestDistance) { best = p; bestDistance = d; }
  }
  return best;
}

function inside(x, y) {
  const shape = state.record?.shape;
  return !shape || (x >= 0 && y >= 0 && x <= shape[1] && y <= shape[0]);
}

canvas.addEventListener("pointerdown", (event) => {
  if (!state.image) return;
  canvas.focus();
  canvas.setPointerCapture(event.pointerId);
  const rect = canvas.getBoundingClientRect();
  const sx = event.clientX - rect.left, sy = event.clientY - rect.top;
  Object.assign(drag, {
    active: true, moved: false, startX: sx, startY: sy, item: hit(sx, sy),
    view: { ...state.view }, before: snapshot(),
  });
  drag.panning = !drag.item;
});

canvas.addEventListener("pointermove", (event) => {
  if (!drag.active) return;
  const rect = canvas.getBoundingClientRect();
  const sx = event.clientX - rect.left, sy = event.clientY - rect.top;
  if (!drag.moved && Math.hypot(sx - drag.startX, sy - drag.startY) < 4) return;
  drag.moved = true;
  if (drag.panning) {
    state.fitted = false;
    state.view.x = drag.view.x + sx - drag.startX;
    state.view.y = drag.view.y + sy - drag.startY;
  } else if (!state.readOnly && !state.conflict) {
    const [x, y] = toMicrograph(sx, sy);
    if (inside(x, y)) { drag.item.x = x; drag.item.y = y; }
  }
  draw();
});

canvas.addEventListener("pointerup", (event) => {
  if (!drag.active) return;
  drag.active = false;
  const rect = canvas.getBoundingClientRect();
  const sx = event.clientX - rect.left, sy = event.clientY - rect.top;
  const item = drag.item;
  drag.item = null;
  if (drag.moved && item) {
    if (state.readOnly || state.conflict) return;
    // The move already happened on screen: record it as one undoable edit.
    state.undo.push(drag.before); state.redo = [];
    item.x = Math.round(item.x * 10) / 10; item.y = Math.round(item.y * 10) / 10;
    updateCounts(); draw(); save();
    return;
  }
  if (drag.moved) return;
  if (item) {
    edit(() => {
      state.items = state.items.filter((p) => p !== item);
      state.discarded.push({ x: item.x, y: item.y, origin: item.origin, score: item.score ?? null });
    });
    return;
  }
  const [x, y] = toMicrograph(sx, sy);
  if (!inside(x, y)) return;
  edit(() => state.items.push({ x: Math.round(x * 10) / 10, y: Math.round(y * 10) / 10, origin: "manual", score: null }));
});

canvas.addEventListener("wheel", (event) => {
  event.preventDefault();
  zoom(Math.exp(-event.deltaY * 0.0015), event.offsetX, event.offsetY);
}, { passive: false });

function zoom(factor, cx = canvas.clientWidth / 2, cy = canvas.clientHeight / 2) {
  const v = state.view;
  state.fitted = false;
  const scale = Math.max(0.05, Math.min(16, v.scale * factor));
  v.x = cx - ((cx - v.x) * scale) / v.scale;
  v.y = cy - ((cy - v.y) * scale) / v.scale;
  v.scale = scale;
  draw();
}

function step(offset) {
  const names = state.micrographs.map((m) => m.name);
  const index = names.indexOf(state.name);
  const next = names[index + offset];
  if (next) return openMicrograph(next);
  return null;
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement && event.target.type === "number") return;
  const key = event.key.toLowerCase();
  const command = event.ctrlKey || event.metaKey;
  if (command && key === "z" && !event.shiftKey) { event.preventDefault(); undo(); }
  else if (command && (key === "y" || (key === "z" && event.shiftKey))) { event.preventDefault(); redo(); }
  else if (command) return;
  else if (key === "n" || key === "arrowright") step(1);
  else if (key === "p" || key === "arrowleft") step(-1);
  else if (key === "a") autopick();
  else if (key === "c") correctAndNext();
  else if (key === "f") fit();
  else if (key === "+" || key === "=") zoom(1.25);
  else if (key === "-") zoom(0.8);
});

// ---- learning ----------------------------------------------------------------------------

async function autopick() {
  if (!state.name || $("autopick").disabled) return;
  const name = state.name;
  $("autopick").disabled = true;
  say(`Autopicking ${name}…`);
  try {
    await state.saving;
    const answer = await apiJson(`/micrographs/${encodeURIComponent(name)}/autopick?min_score=0.2`, { method: "POST" });
    if (name !== state.name) return;
    const shown = answer.picks.filter((p) => p.score >= state.threshold).length;
    say(`${answer.picks.length} proposals (${shown} above the threshold) from model v${answer.model_version}: click a wrong one to discard it, click to add a missed particle.`);
    edit(() => state.items.push(...answer.picks));
  } catch (error) {
    say(`Autopick failed: ${error.message}`, "error");
  } finally {
    // The summary changed (autopick used; in the service, the model version proposing).
    state.summary = await apiJson("/summary").catch(() => state.summary);
    renderSummary();
  }
}

async function correctAndNext() {
  if (!state.name || state.readOnly || state.conflict) return;
  await save({ state: "corrected" });
  if (state.conflict) return;
  const names = state.micrographs.map((m) => m.name);
  const next = names[names.indexOf(state.name) + 1];
  if (!next) { say("Corrected. That was the last micrograph."); return; }
  await openMicrograph(next);
  if (state.summary?.enough_labels && state.items.length === 0 && !state.record?.error) await autopick();
}

async function autopickAll() {
  const threshold = state.threshold;
  try {
    await apiJson(`/autopick-all?threshold=${threshold}`, { method: "POST" });
  } catch (error) { say(`Autopick all failed: ${error.message}`, "error"); return; }
  const bar = $("all-progress");
  bar.hidden = false;
  $("autopick-all").disabled = true;
  for (;;) {
    const job = await apiJson("/autopick-all");
    bar.max = Math.max(job.total, 1); bar.value = job.done;
    say(`Autopick all: ${job.done} of ${job.total} micrographs${job.current ? ` (${job.current})` : ""}`);
    if (!job.running) {
      say(job.error ? `Autopick all stopped: ${job.error}` : `Autopick all: proposals on ${job.total} micrographs not visited yet.`, job.error ? "error" : "info");
      break;
    }
    await new Promise((resolve) => setTimeout(resolve, 400));
  }
  bar.hidden = true;
  await refresh();
}

// ---- controls ----------------------------------------------------------------------------

let imageTimer = null;
function reloadImageSoon() { clearTimeout(imageTimer); imageTimer = setTimeout(loadImage, 200); }
let sessionTimer = null;

function bindControls() {
  $("prev").onclick = () => step(-1);
  $("next").onclick = () => step(1);
  $("undo").onclick = undo;
  $("redo").onclick = redo;
  $("fit").onclick = fit;
  $("autopick").onclick = autopick;
  $("correct").onclick = correctAndNext;
  $("autopick-all").onclick = autopickAll;
  $("lowpass").oninput = (e) => { state.lowpass = Number(e.target.value); reloadImageSoon(); };
  $("contrast").oninput = (e) => { state.contrast = Number(e.target.value); reloadImageSoon(); };
  $("threshold").oninput = (e) => {
    state.threshold = Number(e.target.value);
    $("threshold-value").textContent = state.threshold.toFixed(2);
    updateCounts(); draw();
    clearTimeout(sessionTimer);
    sessionTimer = setTimeout(() => {
      apiJson("/session", { method: "PUT", json: { threshold: state.threshold } }).catch(() => {});
      if (state.items.some((p) => p.origin === "auto")) save();
    }, 400);
  };
  $("particle-size").onchange = async (e) => {
    const value = Number(e.target.value);
    if (!(value > 0)) return;
    try {
      state.summary = await apiJson("/session", { method: "PUT", json: { particle_size: value } });
      renderSummary(); draw();
    } catch (error) { say(`Particle size not saved: ${error.message}`, "error"); }
  };
  // Keep the micrograph fitted while the layout settles (messages, wrapping toolbar), until
  // the user zooms or pans.
  new ResizeObserver(() => (state.fitted ? fit() : draw())).observe(canvas);
}

async function start() {
  bindControls();
  await refresh();
  state.threshold = state.summary.threshold ?? 0.5;
  $("threshold").value = state.threshold;
  $("threshold-value").textContent = state.threshold.toFixed(2);
  $("particle-size").value = state.summary.particle_size;
  $("lowpass").value = Math.round(state.summary.particle_size / 12);
  $("contrast").value = state.contrast;
  const names = state.micrographs.map((m) => m.name);
  const first = names.includes(state.summary.last_micrograph) ? state.summary.last_micrograph : names[0];
  await openMicrograph(first);
  document.body.dataset.ready = "true";
}

// For tests and scripting: where a micrograph position is on the canvas.
window.flyboxPick = { state, toScreen, toMicrograph };

start().catch((error) => say(`The picker could not start: ${error.message}`, "error"));
