// persona playground: a client of persona's public HTTP API only (/v1/models, /v1/vectors,
// /v1/chat/completions with SSE). No dependencies; served by `persona serve` at `/`.
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg"; // the SVG namespace: a name, never fetched
const COLORS = ["#2f5bd3", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5f3dc4", "#e67700"];
const state = {
  vectors: [],       // from GET /v1/vectors
  steer: {},         // name -> {enabled, op, layers, coeff, scale, positions}
  monitor: {},       // name -> {enabled, layers, threshold}
  colorBy: "",
  history: [],       // the conversation (user and the first arm's assistant messages)
  exchanges: [],     // every exchange, with its tokens and projections (for export and the chart)
  controllers: [],
  views: [],         // {view, res} of every answer on the page (to recolour)
  chat: 0,           // bumped by "New chat": a stream of an older chat does not enter the history
  model: "",
};

// ---- API ---------------------------------------------------------------------------------------

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function apiError(r) {
  let msg = `${r.status} ${r.statusText}`;
  try {
    const j = await r.json();
    if (j && j.error) msg = `${r.status}: ${j.error.message}` + (j.error.param ? ` (${j.error.param})` : "");
  } catch (_) { /* not JSON: keep the status line */ }
  return new Error(msg);
}

async function api(path, opts = {}) {
  const r = await fetch(path, Object.assign({}, opts, { headers: Object.assign(headers(!opts.raw), opts.headers || {}) }));
  if (!r.ok) throw await apiError(r);
  return r.json();
}

function showError(e) {
  const box = $("error");
  box.textContent = String((e && e.message) || e);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- vectors, steering and monitor rows ---------------------------------------------------------

function defaultLayer(v) {
  const l = parseInt((v.metadata || {})["persona.layer"], 10);
  return Number.isFinite(l) ? l : v.max_norm_layer;
}

function baselineAt(name, layer) {
  const v = state.vectors.find((x) => x.name === name);
  try {
    const b = JSON.parse(((v && v.metadata) || {})["persona.baseline"] || "null");
    return Array.isArray(b) && Number.isFinite(b[layer]) ? b[layer] : 0;
  } catch (_) {
    return 0;
  }
}

// Slider range and usable window per op and unit.
function range(op, scale) {
  if (scale === "relative") return op === "add" ? { min: -0.5, max: 0.5, step: 0.01, win: [0.1, 0.3] } : { min: -1, max: 1, step: 0.01, win: null };
  return op === "add" ? { min: -12, max: 12, step: 0.1, win: null } : { min: -60, max: 60, step: 0.5, win: null };
}

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids) e.append(k);
  return e;
}

function option(value, label, selected) {
  const o = el("option", { value, text: label });
  if (selected) o.selected = true;
  return o;
}

function renderRows() {
  const sBox = $("steer-rows");
  const mBox = $("monitor-rows");
  sBox.textContent = "";
  mBox.textContent = "";
  if (!state.vectors.length) {
    sBox.append(el("p", { class: "muted", text: "No vectors are registered: start the server with --vectors DIR, or upload one below." }));
  }
  for (const v of state.vectors) {
    const L = defaultLayer(v);
    const trait = (v.metadata || {})["persona.trait"] || v.name;
    const s = (state.steer[v.name] = Object.assign({ enabled: false, op: "add", layers: String(L), coeff: 0, scale: "raw", positions: "all" }, state.steer[v.name]));
    const m = (state.monitor[v.name] = Object.assign({ enabled: false, layers: String(L), threshold: "" }, state.monitor[v.name]));

    const en = el("input", { type: "checkbox", class: "en", "data-testid": `steer-${v.name}`, "aria-label": `steer with ${v.name}` });
    en.checked = s.enabled;
    const op = el("select", { class: "op", "aria-label": `operation of ${v.name}` },
      option("add", "add", s.op === "add"), option("ablate", "ablate", s.op === "ablate"), option("clamp", "clamp to", s.op === "clamp"),
      option("cap", "cap above", s.op === "cap"), option("floor", "floor below", s.op === "floor"));
    const layers = el("input", { type: "text", class: "layers", value: s.layers, "aria-label": `layers of ${v.name}`, title: "12, 10-14, 3+7 or all" });
    const scale = el("select", { class: "scale", "aria-label": `units of ${v.name}` }, option("raw", "raw", s.scale === "raw"), option("relative", "× |h|", s.scale === "relative"));
    const pos = el("select", { class: "positions", "aria-label": `positions of ${v.name}` },
      option("all", "all tokens", s.positions === "all"), option("prompt", "prompt", s.positions === "prompt"), option("response", "response", s.positions === "response"));
    const slider = el("input", { type: "range", class: "coeff", "data-testid": `coeff-${v.name}`, "aria-label": `coefficient of ${v.name}` });
    const band1 = el("div", { class: "band" });
    const band2 = el("div", { class: "band" });
    const num = el("input", { type: "number", class: "coeff-num", step: "any", "data-testid": `coeff-num-${v.name}`, "aria-label": `coefficient of ${v.name} (number)` });
    const row = el("div", { class: "row" + (s.enabled ? "" : " off"), "data-vector": v.name },
      el("div", { class: "head" }, el("label", {}, en, " ", el("b", { text: v.name })), el("span", { class: "muted small", text: `${trait} · default layer ${L} of ${v.n_layers}` })),
      el("div", { class: "opts" }, el("label", {}, "op ", op), el("label", {}, "layers ", layers), el("label", {}, "units ", scale), el("label", {}, "on ", pos),
        el("div", { class: "slider" }, band1, band2, slider), num));
    sBox.append(row);

    const sync = () => {
      if (s.op === "cap" || s.op === "floor") s.scale = "raw"; // their `when` thresholds are raw projections
      scale.value = s.scale;
      scale.disabled = s.op === "cap" || s.op === "floor" || s.op === "ablate";
      const r = range(s.op, s.scale);
      Object.assign(slider, { min: r.min, max: r.max, step: r.step });
      s.coeff = Math.min(r.max, Math.max(r.min, Number(s.coeff) || 0));
      slider.value = s.coeff;
      num.value = s.coeff;
      slider.disabled = num.disabled = s.op === "ablate";
      for (const [b, w] of [[band1, r.win && [r.win[0], r.win[1]]], [band2, r.win && [-r.win[1], -r.win[0]]]]) {
        b.hidden = !w;
        if (w) {
          b.style.left = `${((w[0] - r.min) / (r.max - r.min)) * 100}%`;
          b.style.width = `${((w[1] - w[0]) / (r.max - r.min)) * 100}%`;
        }
      }
      row.classList.toggle("off", !s.enabled);
      en.checked = s.enabled;
      saveHash();
    };
    en.addEventListener("change", () => { s.enabled = en.checked; sync(); });
    op.addEventListener("change", () => { s.op = op.value; sync(); });
    layers.addEventListener("change", () => { s.layers = layers.value.trim(); saveHash(); });
    scale.addEventListener("change", () => { s.scale = scale.value; s.coeff = 0; sync(); });
    pos.addEventListener("change", () => { s.positions = pos.value; saveHash(); });
    const setCoeff = (x) => { s.coeff = Number(x); if (s.coeff !== 0) s.enabled = true; sync(); };
    slider.addEventListener("input", () => setCoeff(slider.value));
    num.addEventListener("change", () => setCoeff(num.value));
    sync();

    const men = el("input", { type: "checkbox", "data-testid": `monitor-${v.name}`, "aria-label": `monitor ${v.name}` });
    men.checked = m.enabled;
    const mlayers = el("input", { type: "text", class: "layers", value: m.layers, "aria-label": `monitor layers of ${v.name}` });
    const thr = el("input", { type: "number", step: "any", class: "coeff-num", value: m.threshold, placeholder: "none", "aria-label": `threshold of ${v.name}` });
    mBox.append(el("div", { class: "row" }, el("div", { class: "opts" },
      el("label", {}, men, " ", el("b", { text: v.name })), el("label", {}, "layers ", mlayers), el("label", {}, "flag above ", thr))));
    men.addEventListener("change", () => { m.enabled = men.checked; renderColorBy(); saveHash(); });
    mlayers.addEventListener("change", () => { m.layers = mlayers.value.trim(); saveHash(); });
    thr.addEventListener("change", () => { m.threshold = thr.value; saveHash(); });
  }
  renderColorBy();
}

function monitored() {
  return state.vectors.map((v) => v.name).filter((n) => state.monitor[n] && state.monitor[n].enabled);
}

function renderColorBy() {
  const sel = $("color-by");
  const names = monitored();
  if (state.vectors.length && !names.includes(state.colorBy)) state.colorBy = names[0] || "";
  sel.textContent = "";
  if (!names.length) sel.append(option("", "(enable a monitor)", true));
  for (const n of names) sel.append(option(n, n, n === state.colorBy));
}

function steeringOps() {
  const ops = [];
  for (const v of state.vectors) {
    const s = state.steer[v.name];
    if (!s || !s.enabled) continue;
    const o = { vector: v.name, layers: s.layers || String(defaultLayer(v)), positions: s.positions };
    if (s.op === "ablate") o.op = "ablate";
    else if (s.op === "cap" || s.op === "floor") Object.assign(o, { op: "clamp", coeff: s.coeff, when: `self:${s.op === "cap" ? "gt" : "lt"}:${s.coeff}` });
    else Object.assign(o, { op: s.op, coeff: s.coeff, scale: s.scale });
    ops.push(o);
  }
  return ops;
}

function monitorItems() {
  return monitored().map((n) => {
    const m = state.monitor[n];
    const o = { vector: n, name: n, layers: m.layers || "all" };
    if (m.threshold !== "" && Number.isFinite(Number(m.threshold))) o.threshold = Number(m.threshold);
    return o;
  });
}

// ---- the URL holds the whole state ---------------------------------------------------------------

function snapshot() {
  return {
    system: $("system").value, prompt: $("prompt").value, max_tokens: $("max-tokens").value, temperature: $("temperature").value,
    top_p: $("top-p").value, seed: $("seed").value, compare: $("compare").checked, colorBy: state.colorBy, steer: state.steer, monitor: state.monitor,
  };
}

let hashReady = false;
let hashTimer = 0;
function writeHash() {
  clearTimeout(hashTimer);
  if (hashReady) history.replaceState(null, "", "#s=" + encodeURIComponent(JSON.stringify(snapshot())));
}
// Debounced: a dragged slider would otherwise rewrite the URL on every step (browsers limit that).
function saveHash() {
  clearTimeout(hashTimer);
  hashTimer = setTimeout(writeHash, 250);
}

function applyHash() {
  const m = location.hash.match(/^#s=(.*)$/);
  if (m) {
    try {
      const s = JSON.parse(decodeURIComponent(m[1]));
      for (const [id, k] of [["system", "system"], ["prompt", "prompt"], ["max-tokens", "max_tokens"], ["temperature", "temperature"], ["top-p", "top_p"], ["seed", "seed"]]) {
        if (typeof s[k] === "string") $(id).value = s[k];
      }
      $("compare").checked = !!s.compare;
      const ok = {
        steer: (r) => ["add", "ablate", "clamp", "cap", "floor"].includes(r.op) && ["raw", "relative"].includes(r.scale) &&
          ["all", "prompt", "response"].includes(r.positions) && Number.isFinite(Number(r.coeff)) && typeof r.layers === "string",
        monitor: (r) => typeof r.layers === "string" && (r.threshold === "" || Number.isFinite(Number(r.threshold))),
      };
      for (const k of ["steer", "monitor"]) {
        for (const [name, row] of Object.entries(s[k] || {})) {
          if (name === "__proto__" || !row || typeof row !== "object" || !ok[k](row)) continue;
          state[k][name] = { ...row, enabled: !!row.enabled };
        }
      }
      if (typeof s.colorBy === "string") state.colorBy = s.colorBy;
    } catch (e) {
      showError("the link's state could not be read: " + e.message);
    }
  }
  hashReady = true;
  renderRows();
  if (state.colorBy) $("color-by").value = state.colorBy;
  saveHash();
}

// ---- streaming a chat completion ---------------------------------------------------------------

function setStreaming(on) {
  document.body.dataset.state = on ? "streaming" : "idle";
  const hadFocus = document.activeElement;
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("new-chat").disabled = on;
  $("conversation").setAttribute("aria-busy", on ? "true" : "false");
  if (on && hadFocus === $("send")) $("stop").focus();
  if (!on && hadFocus === $("stop")) $("prompt").focus();
}

function displayLayer(name, labels) {
  const layers = labels.filter((l) => l.startsWith(name + "@")).map((l) => parseInt(l.slice(name.length + 1), 10));
  if (!layers.length) return null;
  const v = state.vectors.find((x) => x.name === name);
  const d = v ? defaultLayer(v) : null;
  return layers.includes(d) ? d : Math.min(...layers);
}

// `{name: value}` at each monitor's displayed layer, from a chunk's `persona.projections` (`name@L` keys).
function atDisplayLayer(proj) {
  const labels = Object.keys(proj || {});
  const out = {};
  for (const n of new Set(labels.map((l) => l.slice(0, l.lastIndexOf("@"))))) {
    const L = displayLayer(n, labels);
    if (L !== null) out[n] = proj[`${n}@${L}`];
  }
  return out;
}

// Stream one request into `res` (the exchange's record of it) and `view` (its place on the page).
async function streamArm(arm, view, res) {
  const ctl = new AbortController();
  state.controllers.push(ctl);
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(arm.body), signal: ctl.signal });
    if (!r.ok) throw await apiError(r);
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true }).replace(/\r/g, "");
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i);
        buf = buf.slice(i + 2);
        // One event's `data:` lines joined (the SSE rule); comments (`:` keep-alives) skipped.
        const data = ev.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n").trim();
        if (!data || data === "[DONE]") continue;
        onChunk(JSON.parse(data), res, view);
      }
    }
    if (!res.finish) throw new Error("the stream ended before the answer finished (no finish_reason)");
  } catch (e) {
    if (e.name !== "AbortError") {
      res.error = e.message;
      showError(e);
    } else {
      res.finish = res.finish || "stopped";
    }
  }
  finishView(res, view);
  return res;
}

function onChunk(j, res, view) {
  if (j.error) throw new Error(j.error.message || JSON.stringify(j.error));
  const c = (j.choices || [])[0];
  if (!c) return;
  const text = (c.delta && c.delta.content) || "";
  if (c.token_ids && c.token_ids.length) {
    const p = (j.persona && j.persona.projections) || {};
    const t = { id: c.token_ids[0], text, projections: p, over: (j.persona && j.persona.over_threshold) || [] };
    res.tokens.push(t);
    res.text += text;
    addToken(view, t, res);
  } else if (text) {
    // Text held back (an incomplete character or a possible stop string) arrives with no token.
    res.text += text;
    const last = view.text.lastElementChild;
    if (last) last.textContent += text;
    else view.text.append(text);
  }
  if (c.finish_reason) {
    res.finish = c.finish_reason;
    if (j.persona) res.summary = j.persona;
  }
  scheduleRedraw(view.ex);
}

// Token colours, scores and the chart are redrawn at most once per frame, not per chunk.
let redrawPending = null;
function scheduleRedraw(ex) {
  if (redrawPending) return;
  redrawPending = requestAnimationFrame(() => {
    redrawPending = null;
    if (ex) recolor(ex);
    renderScores();
    drawChart();
  });
}

function color(value, center, extent) {
  if (!Number.isFinite(value)) return "transparent";
  const x = Math.max(-1, Math.min(1, (value - center) / (extent || 1)));
  const a = Math.abs(x) * 0.75;
  return x >= 0 ? `rgba(214, 48, 49, ${a.toFixed(3)})` : `rgba(47, 91, 211, ${a.toFixed(3)})`;
}

// Colour every answer of `ex` on one scale (so compared answers can be read against each other):
// diverging around the colour-by trait's baseline projection, red above it, blue below.
function recolor(ex) {
  const n = state.colorBy;
  const views = state.views.filter((v) => v.ex === ex);
  const valsOf = (res) => res.tokens.map((t) => atDisplayLayer(t.projections)[n]);
  let center = 0;
  for (const { res } of views) {
    const labels = Object.keys((res.tokens[0] || {}).projections || {});
    if (labels.length) center = baselineAt(n, displayLayer(n, labels));
  }
  const extent = Math.max(1e-6, ...views.flatMap(({ res }) => valsOf(res).filter(Number.isFinite).map((v) => Math.abs(v - center))));
  for (const { view, res } of views) {
    const vals = valsOf(res);
    view.text.querySelectorAll(".tok").forEach((s, i) => (s.style.background = n ? color(vals[i], center, extent) : ""));
  }
}

function addToken(view, t, res) {
  const shown = atDisplayLayer(t.projections);
  const span = el("span", { class: "tok", tabindex: view.text.childElementCount ? "-1" : "0", "aria-describedby": "tooltip", "data-testid": "token", "data-projection": JSON.stringify(shown), text: t.text });
  const tip = () => {
    const lines = Object.entries(t.projections).map(([k, v]) => `${k}: ${fmt(v)}`);
    if (t.over.length) lines.push("over threshold: " + t.over.join(", "));
    return `token ${t.id}` + (lines.length ? "\n" + lines.join("\n") : "");
  };
  span.addEventListener("mouseenter", (e) => showTip(tip(), e.clientX, e.clientY));
  span.addEventListener("mousemove", (e) => moveTip(e.clientX, e.clientY));
  span.addEventListener("mouseleave", hideTip);
  span.addEventListener("focus", () => { const r = span.getBoundingClientRect(); showTip(tip(), r.left, r.bottom); });
  span.addEventListener("blur", hideTip);
  view.text.append(span);
}

function fmt(v, digits = 3) {
  return Number.isFinite(v) ? Number(v).toFixed(digits) : "n/a";
}

function fmtThr(v) {
  return Number.isFinite(v) ? String(Number(Number(v).toPrecision(6))) : "none";
}

function showTip(text, x, y) {
  const t = $("tooltip");
  t.textContent = text;
  t.hidden = false;
  moveTip(x, y);
}
function moveTip(x, y) {
  const t = $("tooltip");
  t.style.left = Math.min(window.innerWidth - 330, x + 12) + "px";
  t.style.top = y + 14 + "px";
}
function hideTip() {
  $("tooltip").hidden = true;
}

function finishView(res, view) {
  view.label.textContent = `${res.label} · ${res.tokens.length} tokens` + (res.finish ? ` · ${res.finish}` : "") + (res.error ? " · error" : "");
  recolor(view.ex);
}

// "Predicted": the projection at the last prompt token (the first streamed token's producing
// position); "expressed": the mean over the answer (the server's summary once it is done).
function renderScores() {
  const box = $("scores");
  box.textContent = "";
  const ex = state.exchanges[state.exchanges.length - 1];
  if (!ex) return;
  for (const res of ex.arms) {
    for (const n of monitored()) {
      const vals = res.tokens.map((t) => atDisplayLayer(t.projections)[n]).filter(Number.isFinite);
      if (!vals.length) continue;
      const labels = Object.keys(res.tokens[0].projections);
      const L = displayLayer(n, labels);
      const probe = res.summary && (res.summary.probes || []).find((p) => p.name === n && p.layer === L);
      const predicted = probe && Number.isFinite(probe.last_prompt) ? probe.last_prompt : vals[0];
      const expressed = probe && Number.isFinite(probe.response_mean) ? probe.response_mean : vals.reduce((a, b) => a + b, 0) / vals.length;
      const thr = probe ? probe.threshold : null;
      const flag = Number.isFinite(thr) && (predicted > thr || expressed > thr);
      const item = el("span", { class: flag ? "flag" : "", "data-testid": "score" },
        `${ex.arms.length > 1 ? res.label + " · " : ""}${n}@${L}: predicted ${fmt(predicted, 2)}, expressed ${fmt(expressed, 2)}${probe ? "" : " (so far)"}` +
        (Number.isFinite(thr) ? ` · threshold ${fmtThr(thr)}` : "") + (flag ? " · flagged" : ""));
      box.append(item);
    }
  }
}

// ---- the chart ---------------------------------------------------------------------------------

function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function drawChart() {
  const c = $("chart");
  c.textContent = "";
  $("legend").textContent = "";
  const ex = state.exchanges[state.exchanges.length - 1];
  if (!ex) return;
  const names = monitored();
  const series = [];
  ex.arms.forEach((res, a) => {
    for (const n of names) {
      const labels = Object.keys((res.tokens[0] || {}).projections || {});
      const L = displayLayer(n, labels);
      if (L === null) continue;
      const probe = res.summary && (res.summary.probes || []).find((p) => p.name === n && p.layer === L);
      const m = state.monitor[n];
      const thr = probe && probe.threshold !== null ? probe.threshold : m && m.threshold !== "" ? Number(m.threshold) : null;
      series.push({ arm: a, label: res.label, name: n, layer: L, thr, values: res.tokens.map((t) => atDisplayLayer(t.projections)[n]), over: res.tokens.map((t) => t.over.includes(`${n}@${L}`)) });
    }
  });
  const W = 640, H = 220, left = 46, right = 8, top = 8, bottom = 22;
  const all = series.flatMap((s) => s.values.filter(Number.isFinite).concat(Number.isFinite(s.thr) ? [s.thr] : []));
  const n = Math.max(1, ...series.map((s) => s.values.length));
  let lo = all.length ? Math.min(...all) : -1, hi = all.length ? Math.max(...all) : 1;
  if (hi - lo < 1e-6) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08;
  lo -= pad; hi += pad;
  const x = (i) => left + (n === 1 ? 0 : (i / (n - 1)) * (W - left - right));
  const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (H - top - bottom);
  c.append(svg("rect", { x: 0, y: 0, width: W, height: H, fill: "#ffffff" }));
  c.append(svg("line", { x1: left, y1: top, x2: left, y2: H - bottom, stroke: "#98a2b3" }));
  c.append(svg("line", { x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: "#98a2b3" }));
  for (const v of [lo + pad, (lo + hi) / 2, hi - pad]) {
    const t = svg("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#667085" });
    t.textContent = v.toFixed(1);
    c.append(t);
  }
  const xl = svg("text", { x: W - right, y: H - 6, "text-anchor": "end", "font-size": 11, fill: "#667085" });
  xl.textContent = `token (${n})`;
  c.append(xl);
  const legend = $("legend");
  series.forEach((s) => {
    const col = COLORS[names.indexOf(s.name) % COLORS.length];
    const dash = s.arm === 0 ? "" : "5 4";
    if (Number.isFinite(s.thr)) c.append(svg("line", { x1: left, x2: W - right, y1: y(s.thr), y2: y(s.thr), stroke: "#b42318", "stroke-dasharray": "6 4" }));
    const pts = s.values.map((v, i) => (Number.isFinite(v) ? `${x(i).toFixed(1)},${y(v).toFixed(1)}` : null)).filter(Boolean);
    if (pts.length) c.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: col, "stroke-width": 1.6, "stroke-dasharray": dash }));
    s.values.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      const attrs = { cx: x(i).toFixed(1), cy: y(v).toFixed(1), r: s.over[i] ? 4 : 2.6, fill: s.over[i] ? "#ffffff" : col, stroke: s.over[i] ? "#b42318" : col, "stroke-width": s.over[i] ? 2 : 1 };
      // One testable point per streamed token: the series of the trait the tokens are coloured by.
      if (s.name === state.colorBy) attrs["data-testid"] = "chart-point";
      const p = svg("circle", attrs);
      const title = svg("title", {});
      title.textContent = `${s.label} · ${s.name}@${s.layer} · token ${i}: ${v.toFixed(3)}${s.over[i] ? " (over threshold)" : ""}`;
      p.append(title);
      c.append(p);
    });
    const item = el("span", {}, el("i", {}), `${ex.arms.length > 1 ? s.label + " · " : ""}${s.name}@${s.layer}` + (Number.isFinite(s.thr) ? ` (threshold ${fmtThr(s.thr)})` : ""));
    item.firstChild.style.background = col;
    if (dash) item.firstChild.style.opacity = "0.6";
    legend.append(item);
  });
}

// ---- sending -----------------------------------------------------------------------------------

function num(id, parse = Number) {
  const v = parse($(id).value);
  if (!Number.isFinite(v)) throw new Error(`${$(id).closest("label").textContent.trim()}: not a number`);
  return v;
}

async function send() {
  const text = $("prompt").value.trim();
  if (!text || document.body.dataset.state === "streaming") return;
  clearError();
  let base;
  try {
    base = { max_tokens: num("max-tokens", (v) => parseInt(v, 10)), temperature: num("temperature"), top_p: num("top-p"), seed: num("seed", (v) => parseInt(v, 10)), stream: true };
  } catch (e) {
    showError(e);
    return;
  }
  const msgs = [];
  const system = $("system").value.trim();
  if (system) msgs.push({ role: "system", content: system });
  msgs.push(...state.history, { role: "user", content: text });
  base.messages = msgs;
  const steering = steeringOps();
  const monitor = monitorItems();
  // Keys left out when empty: the server's default steering and monitors then apply (and a
  // server that refuses overrides accepts the request).
  const ext = (st) => Object.assign({}, base, st.length ? { steering: st } : {}, monitor.length ? { monitor } : {});
  const arms = [{ label: steering.length ? "steered" : "answer", body: ext(steering) }];
  // "Unsteered" is explicit: no steering at all, the server's default included.
  if ($("compare").checked) arms.push({ label: "unsteered", body: Object.assign(ext([]), { steering: [] }) });
  const chat = state.chat;

  const conv = $("conversation");
  conv.append(el("div", { class: "msg user", text }));
  const pair = el("div", { class: "pair" + (arms.length > 1 ? " compare" : "") });
  conv.append(pair);
  const exchange = { prompt: text, arms: arms.map((a) => ({ label: a.label, request: a.body, text: "", tokens: [], summary: null, finish: null, error: null })) };
  state.exchanges.push(exchange);
  const views = arms.map((a, i) => {
    const label = el("div", { class: "label", text: a.label + " · streaming…" });
    const body = el("div", { class: "text" });
    body.addEventListener("keydown", rovingFocus);
    pair.append(el("div", { class: "msg answer", "data-testid": "answer", "data-arm": a.label }, label, body));
    const view = { label, text: body, ex: exchange };
    state.views.push({ view, res: exchange.arms[i], ex: exchange });
    return view;
  });
  setStreaming(true);
  try {
    // Both arms at once: the server batches them.
    const results = await Promise.all(arms.map((a, i) => streamArm(a, views[i], exchange.arms[i])));
    if (!results[0].error && chat === state.chat) {
      state.history.push({ role: "user", content: text }, { role: "assistant", content: results[0].text });
      $("prompt").value = "";
    }
  } finally {
    state.controllers = [];
    setStreaming(false);
    renderScores();
    drawChart();
    saveHash();
  }
}

// One tab stop per answer: the arrow keys (Home, End) move between its tokens.
function rovingFocus(e) {
  const toks = [...e.currentTarget.querySelectorAll(".tok")];
  const i = toks.indexOf(document.activeElement);
  if (i < 0) return;
  const j = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: toks.length - 1 }[e.key];
  if (j === undefined || j < 0 || j >= toks.length) return;
  e.preventDefault();
  toks[i].tabIndex = -1;
  toks[j].tabIndex = 0;
  toks[j].focus();
}

// ---- exports -----------------------------------------------------------------------------------

function download(name, blob) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function chartSvgText() {
  const c = $("chart").cloneNode(true);
  c.setAttribute("xmlns", SVGNS);
  c.setAttribute("width", "1280");
  c.setAttribute("height", "440");
  return new XMLSerializer().serializeToString(c);
}

function exportJson() {
  const doc = { model: state.model, exported: new Date().toISOString(), state: snapshot(), exchanges: state.exchanges };
  download("persona-exchange.json", new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" }));
}

function exportSvg() {
  download("persona-chart.svg", new Blob([chartSvgText()], { type: "image/svg+xml" }));
}

function exportPng() {
  const img = new Image();
  img.onload = () => {
    const cv = el("canvas", { width: 1280, height: 440 });
    const g = cv.getContext("2d");
    g.fillStyle = "#fff";
    g.fillRect(0, 0, 1280, 440);
    g.drawImage(img, 0, 0, 1280, 440);
    cv.toBlob((b) => (b ? download("persona-chart.png", b) : showError("the PNG could not be drawn")), "image/png");
  };
  img.onerror = () => showError("the chart could not be rendered to PNG");
  img.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(chartSvgText());
}

// ---- upload ------------------------------------------------------------------------------------

async function upload(ev) {
  ev.preventDefault();
  clearError();
  const f = $("upload-file").files[0];
  if (!f) return showError("choose a vector file (.safetensors or .gguf) first");
  const name = $("upload-name").value.trim() || f.name.replace(/\.(safetensors|gguf)$/, "");
  try {
    const body = await f.arrayBuffer();
    await api(`/v1/vectors?name=${encodeURIComponent(name)}`, { method: "POST", body, raw: true, headers: { "Content-Type": "application/octet-stream" } });
    await loadVectors();
    $("upload-file").value = "";
  } catch (e) {
    showError(e);
  }
}

// ---- start -------------------------------------------------------------------------------------

async function loadVectors() {
  const v = await api("/v1/vectors");
  state.vectors = v.data || [];
  renderRows();
}

async function connect() {
  try {
    const m = await api("/v1/models");
    const d = (m.data || [])[0] || {};
    state.model = d.id || "";
    $("model").textContent = `${d.id || "model"} · context ${d.max_model_len || "?"}`;
    await loadVectors();
    clearError();
  } catch (e) {
    $("model").textContent = "not connected";
    showError(e);
  }
  if (!hashReady) applyHash();
}

function init() {
  $("api-key").value = sessionStorage.getItem("persona.key") || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem("persona.key", $("api-key").value); connect(); });
  $("ask").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); send(); } });
  $("stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
  $("new-chat").addEventListener("click", () => {
    state.chat += 1;
    state.controllers.forEach((c) => c.abort());
    state.history = [];
    state.exchanges = [];
    state.views = [];
    $("conversation").textContent = "";
    renderScores();
    drawChart();
  });
  $("share").addEventListener("click", async () => {
    writeHash();
    try { await navigator.clipboard.writeText(location.href); $("share").textContent = "Link copied"; }
    catch (_) { $("share").textContent = "Link in the address bar"; }
    setTimeout(() => ($("share").textContent = "Share link"), 2000);
  });
  $("export-json").addEventListener("click", exportJson);
  $("export-svg").addEventListener("click", exportSvg);
  $("export-png").addEventListener("click", exportPng);
  $("upload").addEventListener("submit", upload);
  $("color-by").addEventListener("change", () => {
    state.colorBy = $("color-by").value;
    state.exchanges.forEach(recolor);
    drawChart();
    saveHash();
  });
  for (const id of ["system", "prompt", "max-tokens", "temperature", "top-p", "seed", "compare"]) $(id).addEventListener("change", saveHash);
  setStreaming(false);
  connect();
}

document.addEventListener("DOMContentLoaded", init);
