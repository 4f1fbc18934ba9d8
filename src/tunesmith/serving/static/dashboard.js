// tunesmith dashboard: jobs, live curves, evaluation, side-by-side runs and a chat box, over the server's /v1 API.
// No library and no CDN: plain DOM and <canvas>. The API key is kept in this tab's sessionStorage (or given once as
// /#key=KEY); every request sends it as `Authorization: Bearer KEY`, exactly as an API client would.
"use strict";

const FINAL = ["succeeded", "failed", "cancelled"];
const state = { key: "", jobs: [], selected: [], cache: {}, history: [], timer: null };

function params() {
  const out = {};
  for (const part of location.hash.replace(/^#/, "").split("&")) {
    const [k, v] = part.split("=");
    if (k) out[decodeURIComponent(k)] = decodeURIComponent(v || "");
  }
  return out;
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers["Authorization"] = "Bearer " + state.key;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return options.raw ? response : response.json();
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}

// ---- jobs list ----------------------------------------------------------------------------------------------------

async function refreshJobs() {
  try {
    const page = await api("/v1/fine_tuning/jobs?limit=100");
    state.jobs = page.data;
    document.getElementById("conn").textContent = "connected";
  } catch (e) {
    document.getElementById("conn").textContent = e.message;
    return;
  }
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren();
  for (const job of state.jobs) {
    const box = el("input", { type: "checkbox", "data-job": job.id });
    box.checked = state.selected.includes(job.id);
    box.addEventListener("click", (event) => { event.stopPropagation(); toggle(job.id, box.checked, true); });
    const row = el("tr", { "data-job": job.id, class: state.selected.includes(job.id) ? "selected" : "" },
      el("td", {}, box), el("td", {}, job.id), el("td", {}, el("span", { class: "status " + job.status }, job.status)),
      el("td", {}, job.model), el("td", {}, job.fine_tuned_model || ""), el("td", {}, when(job.created_at)));
    row.addEventListener("click", () => toggle(job.id, true, false));
    body.append(row);
  }
  document.getElementById("jobs-empty").hidden = state.jobs.length > 0;
}

function toggle(jobId, on, compare) {
  if (!compare) state.selected = [jobId];
  else if (on && !state.selected.includes(jobId)) state.selected = state.selected.concat(jobId).slice(-2);
  else if (!on) state.selected = state.selected.filter((id) => id !== jobId);
  refreshJobs();
  refreshPanels();
}

// ---- one panel per selected job -------------------------------------------------------------------------------------

async function refreshPanels() {
  const root = document.getElementById("panels");
  for (const panel of [...root.children]) {
    if (!state.selected.includes(panel.dataset.job)) panel.remove();
  }
  for (const jobId of state.selected) {
    let panel = root.querySelector(`[data-job="${jobId}"]`);
    if (!panel) {
      panel = document.getElementById("panel-template").content.firstElementChild.cloneNode(true);
      panel.dataset.job = jobId;
      root.append(panel);
    }
    const cached = state.cache[jobId];
    if (cached && cached.done) continue;  // a finished job does not change any more
    try {
      await fillPanel(panel, jobId);
    } catch (e) {
      panel.querySelector(".error").hidden = false;
      panel.querySelector(".error").textContent = e.message;
    }
  }
}

async function fillPanel(panel, jobId) {
  const job = await api(`/v1/fine_tuning/jobs/${jobId}`);
  const metrics = (await api(`/v1/fine_tuning/jobs/${jobId}/metrics`)).data;
  panel.querySelector(".job-id").textContent = job.id + (job.suffix ? ` (${job.suffix})` : "");
  const status = panel.querySelector(".status");
  status.textContent = job.status;
  status.className = "status " + job.status;
  const hp = job.hyperparameters;
  panel.querySelector(".meta").textContent =
    `base ${job.model} · epochs ${hp.n_epochs} · batch ${hp.batch_size} · lr multiplier ${hp.learning_rate_multiplier}` +
    (job.trained_tokens ? ` · ${job.trained_tokens} tokens trained` : "");
  if (job.error) {
    panel.querySelector(".error").hidden = false;
    panel.querySelector(".error").textContent = job.error.message;
  }
  const train = metrics.filter((m) => m.train_loss !== undefined);
  const valid = metrics.filter((m) => m.valid_loss !== undefined);
  drawChart(panel.querySelector("canvas.loss"), [
    { name: "train_loss", color: "#1a56db", points: train.map((m) => [m.step, m.train_loss]) },
    { name: "valid_loss", color: "#e8590c", points: valid.map((m) => [m.step, m.valid_loss]) },
  ]);
  drawChart(panel.querySelector("canvas.lr"), [
    { name: "learning_rate", color: "#0e7a3a", points: train.map((m) => [m.step, m.learning_rate]) },
  ]);
  const done = FINAL.includes(job.status);
  if (done && job.status === "succeeded") {
    await fillEval(panel, job);
    const link = el("a", { href: "#", class: "report", "data-job": job.id }, "report.html");
    link.addEventListener("click", (event) => { event.preventDefault(); openReport(job.id); });
    panel.querySelector(".links").replaceChildren(link, " · model ", el("code", {}, job.fine_tuned_model));
  }
  state.cache[jobId] = { done };
}

async function fillEval(panel, job) {
  const box = panel.querySelector(".eval");
  if (!job.result_files.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No evaluation: the job had no validation file."));
    return;
  }
  const response = await api(`/v1/files/${job.result_files[0]}/content`, { raw: true });
  const task = await response.json();
  const names = Object.keys(task.systems[0].metrics);
  const head = el("tr", {}, el("th", {}, "system"), ...names.map((n) => el("th", {}, n)));
  const rows = task.systems.map((s) => el("tr", { "data-system": s.key }, el("td", {}, s.name || s.key),
    ...names.map((n) => el("td", {}, typeof s.metrics[n] === "number" ? s.metrics[n].toFixed(4) : ""))));
  box.replaceChildren(el("h4", {}, `evaluation on the validation file (primary: ${task.primary})`),
    el("table", { class: "eval-table" }, el("thead", {}, head), el("tbody", {}, ...rows)));
}

async function openReport(jobId) {
  // a plain link cannot carry the API key: fetch the page with it and open it from memory
  const response = await api(`/v1/fine_tuning/jobs/${jobId}/report`, { raw: true });
  const url = URL.createObjectURL(new Blob([await response.text()], { type: "text/html" }));
  window.open(url, "_blank");
}

// ---- charts ---------------------------------------------------------------------------------------------------------

function tick(value, span) {
  // enough decimals that the four ticks differ: 10.72, 10.79, 10.86 rather than 10.7, 10.8, 10.8
  if (value !== 0 && Math.abs(value) < 1e-3) return value.toExponential(2);
  const digits = Math.min(8, Math.max(0, 1 - Math.floor(Math.log10(span / 3))));
  return value.toFixed(digits);
}

function drawChart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 64, R = 12, T = 10, B = 26;
  ctx.clearRect(0, 0, W, H);
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  canvas.dataset.points = JSON.stringify(Object.fromEntries(series.map((s) => [s.name, s.points.length])));
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7580";
  if (!all.length) {
    ctx.fillText("no points yet", L, H / 2);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const X = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = "#c9ced4";
  ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, H - B); ctx.lineTo(W - R, H - B); ctx.stroke();
  for (let i = 0; i <= 3; i++) {
    const y = y0 + (y1 - y0) * i / 3;
    ctx.fillText(tick(y, y1 - y0), 4, Y(y) + 4);
    const x = x0 + (x1 - x0) * i / 3;
    ctx.fillText(String(Math.round(x)), X(x) - 6, H - 8);
  }
  let legend = L + 8;
  for (const s of series) {
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    ctx.strokeStyle = ctx.fillStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
    ctx.stroke();
    if (pts.length === 1) ctx.fillRect(X(pts[0][0]) - 2, Y(pts[0][1]) - 2, 4, 4);
    ctx.fillText(s.name, legend, T + 10);
    legend += ctx.measureText(s.name).width + 16;
  }
  ctx.lineWidth = 1;
}

// ---- chat -----------------------------------------------------------------------------------------------------------

async function refreshModels() {
  const select = document.getElementById("chat-model");
  const current = select.value;
  const models = (await api("/v1/models")).data.map((m) => m.id);
  select.replaceChildren(...models.map((id) => el("option", { value: id }, id)));
  if (models.includes(current)) select.value = current;
}

async function sendChat(event) {
  event.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  if (!text) return;
  const model = document.getElementById("chat-model").value;
  const temperature = document.getElementById("chat-temperature");
  const log = document.getElementById("chat-log");
  input.value = "";
  state.history.push({ role: "user", content: text });
  log.append(el("div", { class: "msg user" }, el("b", {}, "you: "), text));
  try {
    const answer = await api("/v1/chat/completions", {
      method: "POST",
      json: { model, messages: state.history, max_tokens: 64, temperature: Number(temperature.value) },
    });
    const reply = answer.choices[0].message.content;
    state.history.push({ role: "assistant", content: reply });
    log.append(el("div", { class: "msg assistant", "data-model": model }, el("b", {}, model + ": "), reply));
  } catch (e) {
    state.history.pop();
    log.append(el("div", { class: "msg error" }, e.message));
  }
  log.scrollTop = log.scrollHeight;
}

// ---- start ----------------------------------------------------------------------------------------------------------

async function connect() {
  sessionStorage.setItem("tunesmith-key", state.key);
  await refreshJobs();
  try { await refreshModels(); } catch (e) { /* the jobs call said why */ }
  await refreshPanels();
  clearInterval(state.timer);
  state.timer = setInterval(async () => { await refreshJobs(); await refreshPanels(); }, 2000);
}

window.addEventListener("DOMContentLoaded", () => {
  const given = params();
  state.key = given.key !== undefined ? given.key : sessionStorage.getItem("tunesmith-key") || "";
  if (given.key !== undefined) history.replaceState(null, "", location.pathname + (given.jobs ? "#jobs=" + given.jobs : ""));
  if (given.jobs) state.selected = given.jobs.split(",").filter(Boolean).slice(0, 2);
  document.getElementById("key").value = state.key;
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = document.getElementById("key").value.trim();
    connect();
  });
  document.getElementById("chat-form").addEventListener("submit", sendChat);
  document.getElementById("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) sendChat(event);
  });
  connect();
});
