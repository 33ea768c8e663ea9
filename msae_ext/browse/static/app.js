// The concept browser's front end: one file, no build step. The same code runs against the local
// server (`msae serve`: data from /api/...) and as a static site (`msae dashboard`: data from
// data/*.js scripts, since browsers refuse fetch() of local files).
"use strict";

const STATIC = !!window.MSAE_STATIC;
const view = document.getElementById("view");
let INFO = null;
let LATENTS = null;  // the whole list, filtered and sorted here

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmt(x, digits = 3) { return x == null ? "–" : Number(x).toPrecision(digits); }
function pct(x) { return (100 * x).toFixed(x < 0.001 ? 3 : 2) + "%"; }
function name(e) { return e.label ? esc(e.label) : "<i>unnamed</i>"; }
function link(e) {
  return `<a href="#/latent/${e.index}">#${e.index} ${name(e)}</a>` + (e.valid ? ' <span class="valid" title="passes every validation">✓</span>' : "");
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// data: /api/PATH from the server, or the script data/PATH.js registering MSAE_DATA[PATH]
function load(path) {
  if (!STATIC) {
    return fetch("api/" + path).then(r => r.json().then(body => r.ok ? body : Promise.reject(new Error(body.error))));
  }
  if (path in window.MSAE_DATA) return Promise.resolve(window.MSAE_DATA[path]);
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = "data/" + path + ".js";
    s.onload = () => path in window.MSAE_DATA ? resolve(window.MSAE_DATA[path]) : reject(new Error(path + ": not in this export"));
    s.onerror = () => reject(new Error(`${path}: not in this export (msae dashboard --max-latents left it out)`));
    document.head.appendChild(s);
  });
}
function post(path, body, type = "application/json") {
  return fetch("api/" + path, {method: "POST", body, headers: {"Content-Type": type}})
    .then(r => r.json().then(out => r.ok ? out : Promise.reject(new Error(out.error))));
}
function imageUrl(row) { return STATIC ? `img/${row}.jpg` : `api/image/${row}`; }

function example(e, value) {
  const img = e.has_image ? `<img src="${imageUrl(e.row)}" alt="row ${e.row}" loading="lazy">` : "";
  const text = e.caption ?? e.text ?? e.image ?? `row ${e.row}`;
  return `<div class="example" data-row="${e.row ?? ""}"><span class="value">${value}</span>${img}<span>${esc(text)}` +
         (e.id != null && e.row != null ? ` <small>(row ${e.row})</small>` : "") + `</span></div>`;
}

// ---- the latent list ----------------------------------------------------------------------------
const SORTS = {
  frequency: (a, b) => b.frequency - a.frequency,
  max: (a, b) => b.max - a.max,
  nesting: (a, b) => (a.nesting_level || Infinity) - (b.nesting_level || Infinity) || b.frequency - a.frequency,
};

function renderList(params) {
  const q = params.get("q") || "", sort = params.get("sort") || "frequency", validOnly = params.get("valid") === "1";
  view.innerHTML = `
    <div class="controls">
      <input id="search" type="search" placeholder="search concept name or #index" value="${esc(q)}" size="32">
      <label>sort by <select id="sort">
        <option value="frequency">firing frequency</option><option value="max">maximum activation</option>
        <option value="nesting">nesting level (coarsest first)</option></select></label>
      <label><input id="valid-only" type="checkbox" ${validOnly ? "checked" : ""} ${INFO.has_concepts ? "" : "disabled"}>
        validated concepts only</label>
      <span id="count"></span>
    </div>
    ${INFO.has_concepts ? "" : '<p class="note">No concept names: give --concepts concepts.json (from msae concepts).</p>'}
    <table id="latents"><thead><tr><th>latent</th><th class="num">frequency</th><th class="num">max</th>
      <th class="num">mean when active</th><th class="num">nesting level k</th></tr></thead><tbody></tbody></table>`;
  document.getElementById("sort").value = sort;
  const update = () => {
    const p = new URLSearchParams();
    const qv = document.getElementById("search").value.trim();
    if (qv) p.set("q", qv);
    p.set("sort", document.getElementById("sort").value);
    if (document.getElementById("valid-only").checked) p.set("valid", "1");
    history.replaceState(null, "", "#/?" + p.toString());
    fillList(qv, p.get("sort"), p.get("valid") === "1");
  };
  document.getElementById("search").addEventListener("input", update);
  document.getElementById("sort").addEventListener("change", update);
  document.getElementById("valid-only").addEventListener("change", update);
  fillList(q, sort, validOnly);
}

function fillList(q, sort, validOnly) {
  const needle = q.trim().toLowerCase();
  let rows = LATENTS.filter(e => !validOnly || e.valid);
  if (/^#\d+$/.test(needle)) rows = rows.filter(e => e.index === Number(needle.slice(1)));
  else if (needle) rows = rows.filter(e => (e.label || "").toLowerCase().includes(needle));
  rows = rows.slice().sort(SORTS[sort] || SORTS.frequency);
  document.getElementById("count").textContent = `${rows.length} of ${LATENTS.length} latents` + (rows.length > 300 ? " (first 300 shown)" : "");
  document.querySelector("#latents tbody").innerHTML = rows.slice(0, 300).map(e => `
    <tr><td>${link(e)}</td><td class="num">${pct(e.frequency)}</td><td class="num">${fmt(e.max)}</td>
    <td class="num">${fmt(e.mean_active)}</td><td class="num">${e.nesting_level || "–"}</td></tr>`).join("");
}

// ---- a latent's page ----------------------------------------------------------------------------
function histogram(bins) {
  if (!bins.length) return "<p>never active on this data</p>";
  const w = 320, h = 110, n = bins.length, top = Math.max(...bins.map(b => b.count));
  const bw = (w - 10) / n;
  const bars = bins.map((b, i) => {
    const bh = Math.max(1, (h - 25) * b.count / top);
    return `<rect x="${5 + i * bw}" y="${h - 15 - bh}" width="${Math.max(1, bw - 1)}" height="${bh}">` +
           `<title>${fmt(b.low)} – ${b.high == null ? "∞" : fmt(b.high)}: ${b.count}</title></rect>`;
  }).join("");
  return `<svg class="hist" width="${w}" height="${h}" role="img" aria-label="activation histogram">${bars}` +
         `<text x="5" y="${h - 2}">${fmt(bins[0].low, 2)}</text>` +
         `<text x="${w - 5}" y="${h - 2}" text-anchor="end">${bins[n - 1].high == null ? "∞" : fmt(bins[n - 1].high, 2)}</text></svg>` +
         `<p><small>non-zero activations, log-spaced bins (hover a bar for its range and count)</small></p>`;
}

function latentList(items, extra) {
  return items.length ? `<ul>${items.map(e => `<li>${link(e)} ${extra(e)}</li>`).join("")}</ul>` : "<p>none</p>";
}

function renderLatent(j) {
  view.innerHTML = "<p>loading…</p>";
  return load("latent/" + j).then(p => {
    const concepts = p.concepts ? `<table id="concepts"><tr><th>vocabulary concept</th><th class="num">cosine</th></tr>` +
      p.concepts.map(c => `<tr><td>${esc(c.word)}</td><td class="num">${fmt(c.similarity)}</td></tr>`).join("") + `</table>
      <p>validations passed: <span id="validations">${p.validations.length ? p.validations.map(esc).join(", ") : "none"}</span>
      (best/second-best ratio ${fmt(p.ratio)})</p>` : "<p>no concept names (give --concepts)</p>";
    const levels = Object.entries(p.level_counts).filter(([, c]) => c > 0).map(([k, c]) => `k=${k}: ${c}`).join(", ");
    view.innerHTML = `
      <h2 id="latent-title">#${p.index} ${name(p)} ${p.valid ? '<span class="valid">✓ validated</span>' : ""}</h2>
      <p id="latent-stats">fires on ${pct(p.frequency)} of ${INFO.n_rows} rows · max ${fmt(p.max)} · mean when active
        ${fmt(p.mean_active)} · nesting level k = ${p.nesting_level || "–"} ${levels ? `<small>(entries by level: ${levels})</small>` : ""}</p>
      <div class="grid">
        <section><h3>Concepts</h3>${concepts}</section>
        <section id="histogram"><h3>Activation histogram</h3>${histogram(p.histogram)}</section>
        <section id="top-examples"><h3>Top-activating examples</h3>${p.top.map(e => example(e, fmt(e.value))).join("") || "<p>none</p>"}</section>
        <section id="bands"><h3>A sample from each activation band</h3>${p.bands.slice().reverse().map(e => example(e, `${fmt(e.low, 2)}+`)).join("") || "<p>none</p>"}</section>
        <section id="cofiring"><h3>Co-firing latents on its top examples</h3>
          <h4>coarser levels (k ≤ ${p.nesting_level || "–"})</h4>${latentList(p.cofiring.coarser, e => `<small>mean ${fmt(e.mean_activation)}, k=${e.nesting_level || "–"}</small>`)}
          <h4>finer levels</h4>${latentList(p.cofiring.finer, e => `<small>mean ${fmt(e.mean_activation)}, k=${e.nesting_level || "–"}</small>`)}</section>
        <section id="neighbours"><h3>Nearest latents by decoder direction</h3>${latentList(p.decoder_neighbours, e => `<small>cos ${fmt(e.cosine)}</small>`)}</section>
      </div>`;
  });
}

// ---- query and steering -------------------------------------------------------------------------
let QUERY = null;  // {text} or {row}: what the steering panel edits
let QUERY_TOP = 1;  // the query's largest activation: the scale of the steering sliders

function renderQuery(params) {
  if (STATIC) {
    view.innerHTML = `<p class="note" id="static-note">Query and steering need a model and a search over the data, so they
      run in the local app only: <code>${esc(INFO.serve_command)}</code></p>`;
    return;
  }
  const textHint = INFO.query_text ? "a text" : "a vocabulary word (no text encoder loaded: msae serve --clip ...)";
  view.innerHTML = `
    <form id="query-form" class="controls">
      <input id="query-text" placeholder="${esc(textHint)}" size="40">
      <span>or row</span><input id="query-row" type="number" min="0" max="${INFO.n_rows - 1}" style="width:7em">
      ${INFO.query_image ? '<span>or image</span><input id="query-image" type="file" accept="image/*">' : ""}
      <button id="query-go">show active latents</button>
    </form>
    <div class="grid">
      <section><h3>Active latents</h3><div id="query-result"><p>give a query</p></div></section>
      <section id="steer"><h3>Steering</h3><div id="steer-controls"><p>the query's strongest latents appear here</p></div>
        <p><input id="steer-add" placeholder="add a concept or #index" size="22"> <button id="steer-add-go" type="button">add</button></p></section>
      <section><h3>Nearest rows</h3><div id="neighbours-list"></div></section>
      <section><h3>After steering</h3><div id="steered-list"><p>move a slider</p></div></section>
    </div>`;
  document.getElementById("query-form").addEventListener("submit", ev => { ev.preventDefault(); runQuery(); });
  document.getElementById("steer-add-go").addEventListener("click", addSteer);
  if (params.get("text")) { document.getElementById("query-text").value = params.get("text"); runQuery(); }
  else if (params.get("row")) { document.getElementById("query-row").value = params.get("row"); runQuery(); }
}

function runQuery() {
  const text = document.getElementById("query-text").value.trim();
  const row = document.getElementById("query-row").value;
  const file = document.getElementById("query-image")?.files[0];
  let request;
  if (file) { QUERY = null; request = post("query", file, file.type || "application/octet-stream"); }
  else if (text) { QUERY = {text}; request = load("query?text=" + encodeURIComponent(text)); }
  else if (row !== "") { QUERY = {row: Number(row)}; request = load("query?row=" + row); }
  else { showError("give a text, a row or an image"); return; }
  request.then(r => {
    showError("");
    const top = Math.max(...r.latents.map(e => e.value), 1e-9);
    QUERY_TOP = top;
    document.getElementById("query-result").innerHTML = `<p>${r.l0} active latents; the strongest:</p>
      <table id="query-latents">${r.latents.map(e => `<tr><td>${link(e)}</td><td class="num">${fmt(e.value)}</td>
      <td><span class="bar" style="width:${Math.round(120 * e.value / top)}px"></span></td><td><small>k=${e.nesting_level || "–"}</small></td></tr>`).join("")}</table>`;
    const controls = document.getElementById("steer-controls");
    controls.innerHTML = QUERY ? "" : "<p>steering works on a text or row query</p>";
    if (QUERY) r.latents.slice(0, 6).forEach(e => addSlider(e.index, e.label, e.value));
    if (QUERY) steer();
  }).catch(e => showError(e.message));
}

function addSlider(index, label, value) {
  // up to well past what the query or the latent ever reach: steering works by overshooting (figure 7)
  const max = Math.max(4 * QUERY_TOP, 2 * value, ...LATENTS.filter(e => e.index === index).map(e => 2 * e.max));
  const div = document.createElement("div");
  div.className = "steer-row";
  div.innerHTML = `<label>#${index} ${label ? esc(label) : "<i>unnamed</i>"}</label>
    <input type="range" min="0" max="${max}" step="any" value="${value}" data-latent="${index}" data-original="${value}">
    <output>${fmt(value)}</output>`;
  const input = div.querySelector("input");
  input.dataset.original = input.value;  // as the control holds it (it rounds): unchanged means no edit
  input.addEventListener("input", () => { div.querySelector("output").textContent = fmt(input.value); });
  input.addEventListener("change", steer);
  document.getElementById("steer-controls").appendChild(div);
}

function addSteer() {
  const name = document.getElementById("steer-add").value.trim();
  if (!name || !QUERY) return;
  const byIndex = /^#?\d+$/.test(name) ? LATENTS.find(e => e.index === Number(name.replace("#", ""))) : null;
  const found = byIndex || LATENTS.find(e => (e.label || "").toLowerCase() === name.toLowerCase());
  if (!found) { showError(`${name}: no latent with this index or concept name`); return; }
  addSlider(found.index, found.label, 0);
}

function steer() {
  const edits = [...document.querySelectorAll("#steer-controls input[type=range]")]
    .filter(s => Number(s.value) !== Number(s.dataset.original))
    .map(s => ({latent: Number(s.dataset.latent), value: Number(s.value), mode: "set"}));
  return post("steer", JSON.stringify({...QUERY, edits})).then(r => {
    showError("");
    const before = new Set(r.neighbours.map(h => h.row));
    document.getElementById("neighbours-list").innerHTML = r.neighbours.map(h => example(h, fmt(h.distance))).join("");
    document.getElementById("steered-list").innerHTML = r.steered ?
      `<p>moved ${fmt(r.distance_from_query)} (cosine distance) from the query</p>` +
      r.steered.map(h => example(h, fmt(h.distance)).replace('class="example"', `class="example${before.has(h.row) ? "" : " changed"}"`)).join("")
      : "<p>move a slider</p>";
  }).catch(e => showError(e.message));
}

// ---- routing ------------------------------------------------------------------------------------
function route() {
  showError("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const m = path.match(/^\/latent\/(\d+)$/);
  const done = m ? renderLatent(Number(m[1])) : path === "/query" ? renderQuery(params) : renderList(params);
  Promise.resolve(done).catch(e => { view.innerHTML = ""; showError(e.message); });
}

Promise.all([load("info"), load("latents")]).then(([info, latents]) => {
  INFO = info;
  LATENTS = latents;
  document.getElementById("sae-name").textContent =
    `${info.name} · ${info.architecture} (${info.protocol === "native" ? "its own activation" : "ReLU only"}) · ${info.d_sae} latents · ${info.n_rows} ${info.modality} rows of ${info.data}`;
  window.addEventListener("hashchange", route);
  route();
}).catch(e => showError("cannot load the SAE's index: " + e.message));
