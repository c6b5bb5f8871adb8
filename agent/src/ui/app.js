// steer's live page: polls /ui/state and draws the releases table and the chains of versions;
// the explain box asks /ui/explain. Plain DOM and SVG, nothing loaded from elsewhere.
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const PRIMARY = "#8a8f98";
const NAMED = {
  red: "#d62728", green: "#2ca02c", blue: "#1f77b4", orange: "#ff7f0e", purple: "#9467bd",
  yellow: "#d4b000", pink: "#e377c2", teal: "#17becf", brown: "#8c564b", cyan: "#17becf",
  magenta: "#c2185b", violet: "#7e57c2", gold: "#c9a400", black: "#333333",
};
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];

let state = null;
let explained = null; // the last explain answer, highlighted in the chains

function colour(release) {
  if (!release) return PRIMARY;
  const named = NAMED[release.toLowerCase()];
  if (named) return named;
  const index = state ? state.releases.findIndex((r) => r.name === release) : -1;
  if (index >= 0) return PALETTE[index % PALETTE.length];
  let hash = 0;
  for (const c of release) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[hash % PALETTE.length];
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    // Through the CSSOM: the page's content security policy forbids inline style attributes.
    if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function rate(value) {
  if (value === 0) return "0";
  if (value < 0.1) return value.toFixed(2);
  if (value < 10) return value.toFixed(1);
  return Math.round(value).toString();
}

// ---- releases ----

function matcherText(m) {
  const op = { exact: "=", prefix: "starts with", regex: "~" }[m.kind] || m.kind;
  return el("code", {}, `${m.header} ${op} ${m.value}`);
}

function renderReleases() {
  const body = document.querySelector("#releases tbody");
  body.replaceChildren();
  for (const r of state.releases) {
    const matches = el("td", {});
    r.matchers.forEach((m, i) => {
      if (i > 0) matches.append(" and ");
      matches.append(matcherText(m));
    });
    const share = r.percent !== null && r.percent !== undefined
      ? el("td", {}, `${r.percent}%`, r.hashBy ? " by " : "", r.hashBy ? el("code", {}, r.hashBy) : "")
      : el("td", { class: "note" }, "all");
    if (r.rollout) share.append(el("div", { class: "note rollout" }, `rollout: ${r.rollout}`));
    const targets = el("td", {});
    Object.entries(r.targets).forEach(([service, version], i) => {
      if (i > 0) targets.append(", ");
      targets.append(`${service} → `, el("code", {}, version));
    });
    const verdict = el("td", { class: "verdict-cell" });
    verdict.append(el("span", { class: `verdict ${r.verdict}` }, r.verdict));
    if (r.verdict === "conflict" || r.verdict === "invalid") {
      verdict.append(r.shadowedBy.length ? ` with ${r.shadowedBy.join(", ")}` : "",
        el("div", { class: "note" }, r.shadowExample || ""));
    } else if (r.verdict === "shadowed") {
      verdict.append(` by ${r.shadowedBy.join(", ")}`,
        el("div", { class: "note" }, `e.g. ${r.shadowExample || "any request"}`));
    }
    for (const o of r.overlaps) {
      const text = o.winner === r.name
        ? `overlaps ${o.with}; wins, e.g. ${o.example}`
        : `overlaps ${o.with}; ${o.winner} wins, e.g. ${o.example}`;
      verdict.append(el("div", { class: "note" }, text));
    }
    body.append(el("tr", { "data-release": r.name, "data-verdict": r.verdict },
      el("td", { class: "num" }, r.priority === null ? "–" : String(r.priority)),
      el("td", {}, el("span", { class: "swatch", style: `background:${colour(r.name)}` }), el("strong", {}, r.name)),
      matches, share, targets, verdict,
      el("td", { class: "num rate", "data-rate": String(r.rate) }, rate(r.rate))));
  }
  body.append(el("tr", { "data-release": "" },
    el("td", {}), el("td", {}, el("span", { class: "swatch", style: `background:${PRIMARY}` }), "none"),
    el("td", { class: "note", colspan: "4" }, "requests from outside the mesh that no release matches: primary versions on every hop"),
    el("td", { class: "num rate", "data-rate": String(state.unreleasedRate) }, rate(state.unreleasedRate))));
  const warnings = document.getElementById("warnings");
  warnings.replaceChildren(...state.warnings.map((w) => el("li", {}, w)));
  const rejected = document.getElementById("rejected");
  rejected.hidden = !state.rejected;
  if (state.rejected) {
    const r = state.rejected;
    rejected.replaceChildren(
      el("h3", {}, `The latest configuration (${r.origin}) was rejected; the releases above keep serving`),
      el("ul", {},
        ...r.shadowed.map((s) => el("li", { class: "shadowed", "data-release": s.release, "data-by": s.by.join(",") },
          el("strong", {}, s.release), ` is shadowed by ${s.by.join(", ")}: a request such as `,
          el("code", {}, s.example), ` matches it but goes to ${s.by[0]}`)),
        ...r.errors.filter((e) => !r.shadowed.some((s) => e.includes(`\`${s.release}\``)))
          .map((e) => el("li", {}, e))));
  }
}

// ---- chains ----

// Services left to right in call order (from the edges seen), the configuration's order
// otherwise.
function columns() {
  const names = state.services.map((s) => s.name);
  const depth = Object.fromEntries(names.map((n) => [n, 0]));
  for (let round = 0; round < names.length; round++) {
    for (const e of state.edges) {
      if (e.fromService && e.fromService !== e.service && e.service in depth && e.fromService in depth) {
        depth[e.service] = Math.max(depth[e.service], Math.min(depth[e.fromService] + 1, names.length));
      }
    }
  }
  return state.services
    .map((s, i) => ({ s, i }))
    .sort((a, b) => depth[a.s.name] - depth[b.s.name] || a.i - b.i)
    .map(({ s }) => s);
}

const BOX_W = 138, BOX_H = 42, COL_W = 230, ROW_H = 64, TOP = 34, LEFT = 12;

function renderChains() {
  const graph = document.getElementById("graph");
  graph.replaceChildren();
  const cols = columns();
  const outside = state.edges.some((e) => !e.fromService);
  const boxes = {}; // "service/version" -> {x, y}
  const offset = outside ? 1 : 0;
  let rows = 1;
  if (outside) {
    boxes["outside"] = { x: LEFT, y: TOP };
    graph.append(svg("text", { x: LEFT, y: 18, class: "column-title" }, "entry"));
    const g = svg("g", { class: "version outside", "data-id": "outside" });
    g.append(svg("rect", { x: LEFT, y: TOP, width: BOX_W, height: BOX_H, rx: 6, fill: "#f1f3f6", stroke: "#b8c0cc", "stroke-dasharray": "4 3" }));
    g.append(svg("text", { x: LEFT + 10, y: TOP + 18, class: "name" }, "gateway / outside"));
    g.append(svg("text", { x: LEFT + 10, y: TOP + 33, class: "owner" }, "not a mesh version"));
    graph.append(g);
  }
  const onPath = new Set((explained || []).map((h) => `${h.service}/${h.version}`));
  cols.forEach((service, c) => {
    const x = LEFT + (c + offset) * COL_W;
    graph.append(svg("text", { x, y: 18, class: "column-title" }, service.name));
    rows = Math.max(rows, service.versions.length);
    service.versions.forEach((version, r) => {
      const y = TOP + r * ROW_H;
      const id = `${service.name}/${version.name}`;
      boxes[id] = { x, y };
      const owner = version.release;
      const stroke = owner ? colour(owner) : (version.primary ? PRIMARY : "#c7ccd3");
      const classes = ["version"];
      if (onPath.has(id)) classes.push("on-path");
      const g = svg("g", { class: classes.join(" "), "data-id": id, "data-release": owner || "" });
      g.append(svg("rect", {
        x, y, width: BOX_W, height: BOX_H, rx: 6, stroke, "stroke-width": 2,
        fill: owner ? `${colour(owner)}22` : (version.primary ? "#eef0f3" : "#fff"),
        "stroke-dasharray": !owner && !version.primary ? "4 3" : "",
      }));
      g.append(svg("text", { x: x + 10, y: y + 18, class: "name" }, version.name));
      const role = owner ? `release ${owner}` : (version.primary ? "primary" : "no release");
      const pods = `${version.endpoints} pod${version.endpoints === 1 ? "" : "s"}`;
      g.append(svg("text", { x: x + 10, y: y + 33, class: "owner" }, `${role} · ${pods}`));
      graph.append(g);
    });
  });
  // Edges under the boxes: drawn first in their own group.
  const edges = svg("g", { class: "edges" });
  const groups = {};
  for (const e of state.edges) {
    const from = e.fromService ? `${e.fromService}/${e.fromVersion}` : "outside";
    const to = `${e.service}/${e.version}`;
    if (!boxes[from] || !boxes[to] || from === to) continue;
    (groups[`${from}|${to}`] ||= []).push({ e, from, to });
  }
  for (const list of Object.values(groups)) {
    list.forEach(({ e, from, to }, k) => {
      const spread = (k - (list.length - 1) / 2) * 8;
      const a = boxes[from], b = boxes[to];
      const x1 = a.x + BOX_W, y1 = a.y + BOX_H / 2 + spread;
      const x2 = b.x, y2 = b.y + BOX_H / 2 + spread;
      const dx = Math.max(40, (x2 - x1) / 2);
      const width = e.rate > 0 ? Math.min(10, 1.5 + 2 * Math.log2(1 + e.rate)) : 1;
      const c = colour(e.release);
      const g = svg("g", {
        class: "edge", "data-from": from, "data-to": to, "data-release": e.release,
        "data-rate": String(e.rate), "data-error-rate": String(e.errorRate),
      });
      const title = `${from} → ${to}, release ${e.release || "none"}: ${rate(e.rate)} req/s, ` +
        `${rate(e.errorRate)} 5xx/s (${e.requests} requests, ${e.errors} 5xx since start)`;
      g.append(svg("title", {}, title));
      g.append(svg("path", {
        d: `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`,
        fill: "none", stroke: c, "stroke-width": width, "stroke-opacity": e.rate > 0 ? 0.85 : 0.35,
        "stroke-dasharray": e.rate > 0 ? "" : "3 3",
      }));
      let label = `${rate(e.rate)}/s`;
      if (e.errorRate > 0) label += ` · ${Math.round((100 * e.errorRate) / Math.max(e.rate, 1e-9))}% 5xx`;
      const lx = (x1 + x2) / 2, ly = (y1 + y2) / 2 - 4 + k * 12 - ((list.length - 1) * 6);
      g.append(svg("text", { x: lx, y: ly, class: "edge-label", "text-anchor": "middle", fill: e.errorRate > 0 ? "#b00020" : c }, label));
      edges.append(g);
    });
  }
  graph.prepend(edges);
  const width = LEFT * 2 + (cols.length + offset) * COL_W - (COL_W - BOX_W);
  graph.setAttribute("width", width);
  graph.setAttribute("height", TOP + rows * ROW_H);
  const legend = document.getElementById("legend");
  legend.replaceChildren(
    ...state.releases.map((r) => el("span", {}, el("span", { class: "swatch", style: `background:${colour(r.name)}` }), r.name)),
    el("span", {}, el("span", { class: "swatch", style: `background:${PRIMARY}` }), "no release"),
    el("span", {}, "dashed edge: no requests in the window"));
  document.getElementById("window").textContent = Math.round(state.windowSeconds);
}

// ---- polling ----

async function poll() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/ui/state", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status}`);
    state = await response.json();
    renderReleases();
    renderChains();
    status.textContent = `updated ${new Date().toLocaleTimeString()}`;
    status.className = "status";
    document.body.dataset.loaded = "true";
  } catch (err) {
    status.textContent = `agent unreachable (${err.message}); retrying`;
    status.className = "status error";
  }
  setTimeout(poll, POLL_MS);
}

// ---- explain ----

function headerLines() {
  return document.getElementById("explain-headers").value
    .split("\n").map((l) => l.trim()).filter((l) => l.length > 0);
}

async function explain() {
  const result = document.getElementById("explain-result");
  const lines = headerLines();
  const query = lines.map((l) => `header=${encodeURIComponent(l)}`).join("&");
  const url = new URL(window.location.href);
  url.search = query ? `?${query}` : "";
  history.replaceState(null, "", url);
  try {
    const response = await fetch(`/ui/explain?${query}`, { cache: "no-store" });
    const text = await response.text();
    if (!response.ok) throw new Error(text.trim());
    const hops = JSON.parse(text);
    const order = state ? columns().map((s) => s.name) : hops.map((h) => h.service);
    hops.sort((a, b) => order.indexOf(a.service) - order.indexOf(b.service));
    explained = hops;
    const path = el("div", { class: "path" });
    hops.forEach((h, i) => {
      if (i > 0) path.append(" → ");
      const c = colour(h.release);
      path.append(el("span", {
        class: "hop", style: `border-color:${c}`, "data-service": h.service,
        "data-version": h.version, "data-release": h.release || "",
      }, `${h.service} `, el("strong", {}, h.version)));
    });
    const release = hops.length && hops[0].release;
    const summary = el("p", { class: "summary" }, release
      ? `Scheduled to release ${release} (stamped on the first hop and kept on every later one).`
      : "No release matches: primary versions on every hop.");
    const reasons = el("table", { class: "reasons" },
      el("thead", {}, el("tr", {}, el("th", {}, "service"), el("th", {}, "version"), el("th", {}, "release"), el("th", {}, "why"))),
      el("tbody", {}, ...hops.map((h) => el("tr", { "data-service": h.service },
        el("td", {}, h.service), el("td", {}, el("code", {}, h.version)),
        el("td", {}, h.release || "none"), el("td", { class: "reason" }, h.reason)))));
    result.replaceChildren(path, summary, reasons);
    result.dataset.answered = "true";
    if (state) renderChains();
  } catch (err) {
    result.replaceChildren(el("p", { class: "error" }, err.message));
  }
}

function start() {
  const params = new URLSearchParams(window.location.search);
  const lines = params.getAll("header");
  document.getElementById("explain-headers").value = lines.join("\n");
  document.getElementById("explain-form").addEventListener("submit", (event) => {
    event.preventDefault();
    explain();
  });
  poll().then(() => { if (lines.length > 0) explain(); });
}

start();
