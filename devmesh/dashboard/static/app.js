// The devmesh dashboard: one WebSocket to the agent, everything drawn from what it pushes.
//
// No polling and no reload: the agent sends the whole state document whenever it changes,
// the page redraws from it. When the agent goes away the page says so, keeps what it last
// saw, and reconnects by itself. The one action (restart) is a POST carrying the per-page
// CSRF token from the <meta> the agent filled in; the token cookie rides along by itself.

import { draw } from "./graph.js";

const $ = (sel) => document.querySelector(sel);
const csrf = document.querySelector('meta[name="devmesh-csrf"]').content;

const ICON = { healthy: "✓", starting: "…", failed: "✗", idle: "○", offline: "?", connecting: "?" };
const COLOUR = {
  healthy: "#1a7f37", starting: "#9a6700", failed: "#cf222e",
  idle: "#57606a", offline: "#57606a", connecting: "#57606a",
};
const STATE_CLASS = {
  running: "ok", external: "ext", starting: "busy", waiting: "busy", stopping: "busy",
  restarting: "bad", "crash-looping": "bad", failed: "bad", blocked: "bad", unhealthy: "bad",
  exited: "bad", healthy: "ok", alive: "ok", expired: "bad", refused: "bad", left: "off",
};

let state = null;
let socket = null;
let retryMs = 250;
let tap = { on: true, service: "", status: "" };
let followed = null; // {project, service}

// ---------------------------------------------------------------- helpers

function text(tag, value, cls) {
  const node = document.createElement(tag);
  node.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
  if (cls) node.className = cls;
  return node;
}

function badge(word) {
  const span = document.createElement("span");
  span.className = `badge ${STATE_CLASS[word] || "off"}`;
  span.dataset.state = word || "";
  span.textContent = word || "–";
  return span;
}

function cell(child) {
  const td = document.createElement("td");
  td.append(child);
  return td;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  if (n < 1024) return `${n} B`;
  if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1048576).toFixed(1)} MiB`;
}

function fixed(value, digits, suffix = "") {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(digits)}${suffix}`;
}

// Keep keyboard focus across a redraw: buttons carry stable ids.
function keepFocus(fn) {
  const id = document.activeElement && document.activeElement.id;
  fn();
  if (id && document.activeElement !== document.getElementById(id)) {
    const again = document.getElementById(id);
    if (again) again.focus();
  }
}

// ---------------------------------------------------------------- overall state

function favicon(level) {
  const colour = COLOUR[level] || COLOUR.idle;
  const mark = {
    healthy: '<path d="M9 17 l5 5 l10 -11" stroke="#fff" stroke-width="4" fill="none"/>',
    failed: '<path d="M10 10 L22 22 M22 10 L10 22" stroke="#fff" stroke-width="4"/>',
    starting: '<circle cx="9" cy="16" r="2.5" fill="#fff"/><circle cx="16" cy="16" r="2.5" fill="#fff"/><circle cx="23" cy="16" r="2.5" fill="#fff"/>',
  }[level] || '<circle cx="16" cy="16" r="5" fill="#fff"/>';
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><circle cx="16" cy="16" r="15" fill="${colour}"/>${mark}</svg>`;
  $("#favicon").href = `data:image/svg+xml,${encodeURIComponent(svg)}`;
}

function showOverall(level, words) {
  const node = $("#overall");
  node.dataset.level = level;
  node.textContent = `${ICON[level] || ""} ${words}`;
  document.title = `${ICON[level] || ""} devmesh: ${words}`;
  favicon(level);
}

// ---------------------------------------------------------------- services

function serviceRows(s) {
  const rows = [];
  for (const r of s.services) {
    rows.push({ ...r, where: r.state === "external" ? "elsewhere" : `here (${s.agent.node || s.agent.host})`, local: r.state !== "external" });
  }
  for (const p of s.peers) {
    if (p.state !== "alive") continue;
    for (const svc of p.services) {
      rows.push({
        project: svc.project, name: svc.name, version: svc.version, branch: svc.branch,
        state: "running", health: svc.health, where: `peer ${p.name}`, url: null,
        restarts: null, reason: null, started_at: null, local: false, peer: p.name,
      });
    }
  }
  return rows;
}

function renderServices(s) {
  const body = $("#service-table tbody");
  const rows = serviceRows(s);
  $("#no-services").hidden = rows.length > 0;
  keepFocus(() => {
    body.replaceChildren(
      ...rows.map((r) => {
        const tr = document.createElement("tr");
        const id = `${r.project}/${r.name}${r.peer ? `@${r.peer}` : ""}`;
        tr.dataset.service = id;
        tr.dataset.state = r.state;
        const name = document.createElement("th");
        name.scope = "row";
        name.textContent = r.name;
        tr.append(name, text("td", r.project));
        const st = cell(badge(r.state));
        st.className = "state";
        tr.append(st, cell(badge(r.health)), text("td", r.version), text("td", r.branch));
        tr.append(text("td", r.where, "where"));
        const url = document.createElement("td");
        if (r.url) {
          const a = document.createElement("a");
          a.href = r.url;
          a.textContent = r.url.replace(/^https?:\/\//, "");
          a.rel = "noreferrer";
          url.append(a);
        } else url.textContent = "–";
        tr.append(url, text("td", r.restarts, "restarts"));
        const up = text("td", r.started_at ? ago(Date.now() / 1000 - r.started_at) : "–", "uptime");
        if (r.started_at) up.dataset.since = r.started_at;
        tr.append(up);
        const reason = text("td", r.reason || (r.pid ? `pid ${r.pid}` : ""), "reason");
        if (r.pid) reason.dataset.pid = r.pid;
        tr.append(reason);
        const actions = document.createElement("td");
        actions.className = "actions";
        if (r.local) {
          const restart = document.createElement("button");
          restart.type = "button";
          restart.id = `restart-${r.project}-${r.name}`;
          restart.textContent = "Restart";
          restart.setAttribute("aria-label", `Restart ${r.name} of ${r.project}`);
          if (pending.has(restart.id)) restart.setAttribute("aria-disabled", "true");
          restart.addEventListener("click", () => doRestart(r.project, r.name, restart));
          const logs = document.createElement("button");
          logs.type = "button";
          logs.id = `logs-${r.project}-${r.name}`;
          logs.textContent = "Log";
          logs.setAttribute("aria-label", `Show the log of ${r.name} of ${r.project}`);
          logs.addEventListener("click", () => follow(r.project, r.name, true));
          actions.append(restart, " ", logs);
        }
        tr.append(actions);
        return tr;
      }),
    );
  });
}

// Restarts under way: their buttons say so (aria-disabled) but keep the keyboard focus,
// which a disabled button would lose.
const pending = new Set();

async function doRestart(project, service, button) {
  const out = $("#action-result");
  if (pending.has(button.id)) return;
  pending.add(button.id);
  button.setAttribute("aria-disabled", "true");
  out.textContent = `Restarting ${project}/${service}…`;
  try {
    const response = await fetch("/api/restart", {
      method: "POST",
      headers: { "content-type": "application/json", "x-devmesh-csrf": csrf },
      body: JSON.stringify({ project, service }),
      credentials: "same-origin",
    });
    const doc = await response.json().catch(() => ({}));
    if (response.ok) {
      out.textContent = `Restarted ${project}/${service}: pid ${doc.old_pid ?? "–"} → ${doc.pid ?? "none"}` +
        (doc.reason ? ` (${doc.reason})` : "");
    } else {
      out.textContent = `Restart of ${project}/${service} refused (${response.status}): ${doc.error || response.statusText}`;
    }
  } catch (err) {
    out.textContent = `Restart of ${project}/${service} failed: ${err}`;
  } finally {
    pending.delete(button.id);
    const again = document.getElementById(button.id);
    if (again) again.removeAttribute("aria-disabled");
  }
}

// ---------------------------------------------------------------- graph and routes

function graphEdge(s, r) {
  const g = s.graph;
  if (!g || !g.edges) return null;
  return g.edges.find((e) => e.project === r.project && e.caller === r.caller && e.service === r.service) || null;
}

function goesTo(r) {
  if (r.target === "local") return `here${r.node ? ` (${r.node})` : ""}`;
  if (r.target === "peer") return `peer ${r.node}`;
  if (r.target === "fallback") return "fallback";
  return "nowhere";
}

function hasTraffic(e) {
  return Boolean(e && e.requests);
}

function successText(e) {
  return hasTraffic(e) ? fixed((1 - e.error_rate) * 100, 1, "%") : "–";
}

function metricLines(e) {
  if (!hasTraffic(e)) return [];
  return [`${fixed(e.rps, 2)} rps · ${successText(e)} ok`, `p50 ${fixed(e.p50_ms, 1, "ms")} · p99 ${fixed(e.p99_ms, 1, "ms")}`];
}


function renderGraph(s) {
  const g = s.graph || { machines: [], nodes: [], edges: [] };
  const machines = new Map(g.machines.map((m) => [m.id, m]));
  const nodes = g.nodes.map((n) => {
    const m = machines.get(n.machine);
    const where = n.kind === "fallback" ? "fallback URL" : n.kind === "missing" ? "nowhere"
      : m ? (m.local ? `here (${m.name})` : `peer ${m.name}`) : n.kind;
    const level = n.kind === "fallback" ? "ext" : n.kind === "missing" ? "bad" : STATE_CLASS[n.state] || "off";
    return {
      id: n.id,
      title: `${n.name}${n.version ? ` ${n.version}` : ""}`,
      lines: [`${n.state || n.kind}${n.health && n.health !== "none" ? ` · ${n.health}` : ""}`, `${where} · ${n.project}`],
      level,
    };
  });
  const edges = g.edges.map((e) => ({
    from: e.from,
    to: e.to,
    kind: e.target || "none",
    warn: Boolean(e.mismatch || e.warning),
    lines: [`→ ${goesTo(e)}${e.mismatch ? " ⚠ version" : ""}${e.status ? ` (answers ${e.status})` : ""}`, ...metricLines(e)],
  }));
  // Calls teammates' nodes made into this machine's shared services.
  for (const i of g.inbound || []) {
    const id = `inbound:${i.node}`;
    if (!nodes.some((n) => n.id === id)) {
      nodes.push({ id, title: `calls from ${i.node}`, lines: ["a teammate's node", "through the peer listener"], level: "ext" });
    }
    edges.push({ from: id, to: i.to, kind: "peer", warn: false, lines: [`→ ${i.service}`, ...metricLines(i)] });
  }
  draw($("#graph-canvas"), nodes, edges);

  const body = $("#route-table tbody");
  body.replaceChildren(
    ...s.routes.map((r) => {
      const e = graphEdge(s, r) || {};
      const tr = document.createElement("tr");
      tr.dataset.edge = `${r.project}/${r.caller}->${r.service}`;
      tr.append(text("td", r.caller), text("td", r.service), text("td", r.range), text("td", goesTo(r), "goes-to"),
        text("td", r.version), text("td", hasTraffic(e) ? fixed(e.rps, 2) : "–"),
        text("td", successText(e)),
        text("td", hasTraffic(e) ? fixed(e.p50_ms, 1, " ms") : "–"),
        text("td", hasTraffic(e) ? fixed(e.p99_ms, 1, " ms") : "–"),
        text("td", r.warning ? `⚠ ${r.warning}` : r.reason));
      return tr;
    }),
  );
}

function renderWarnings(s) {
  const list = $("#warning-list");
  $("#warnings").hidden = !s.warnings.length;
  list.replaceChildren(
    ...s.warnings.map((w) => text("li", `⚠ ${w.project}: ${w.caller} → ${w.service}` +
      `${w.range ? ` (wants ${w.range})` : ""}: ${w.refused ? "refused: " : ""}${w.text}`)),
  );
}

// ---------------------------------------------------------------- peers and databases

function renderPeers(s) {
  const m = s.mesh;
  $("#mesh-info").textContent = m.running
    ? `Mesh ${m.mesh}: this machine is node ${m.name}, set by project ${m.project}.` +
      (m.discovery ? ` Discovery on UDP ${m.discovery.port}${m.discovery.interfaces && m.discovery.interfaces.length ? ` (${m.discovery.interfaces.join(", ")})` : ""}.` : "")
    : "No mesh: no applied project has a mesh: section, so no teammate is seen.";
  const now = Date.now() / 1000;
  $("#peer-table tbody").replaceChildren(
    ...s.peers.map((p) => {
      const tr = document.createElement("tr");
      tr.dataset.peer = p.name;
      tr.dataset.state = p.state;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = p.name;
      const st = cell(badge(p.state));
      st.className = "state";
      if (p.reason) st.append(` (${p.reason})`);
      tr.append(name, text("td", `${p.address}:${p.port}`), st, text("td", p.backends.join(", ")),
        text("td", p.last_seen_at ? `${ago(now - p.last_seen_at)} ago` : "–"),
        text("td", p.services.map((x) => `${x.name} ${x.version || ""}`.trim()).join(", ")));
      return tr;
    }),
  );
  const drops = Object.entries((m && m.drops) || {});
  $("#drops").textContent = drops.length
    ? `Dropped announcements: ${drops.map(([k, v]) => `${k} ${v}`).join(", ")}.`
    : m.running ? "No announcement dropped." : "";
}

function renderDatabases(s) {
  const rows = s.databases || [];
  $("#no-databases").hidden = rows.length > 0;
  $("#db-table tbody").replaceChildren(
    ...rows.map((d) => {
      const tr = document.createElement("tr");
      tr.dataset.db = `${d.project}/${d.service}`;
      const st = cell(badge(d.state));
      st.className = "state";
      tr.append(text("td", d.service), text("td", d.project), text("td", d.engine), text("td", d.provider),
        st, text("td", bytes(d.size_bytes)), text("td", d.snapshots),
        text("td", d.last_sync ? new Date(d.last_sync * 1000).toLocaleString() : "never"), text("td", d.error));
      return tr;
    }),
  );
}

// ---------------------------------------------------------------- selectors for tap and logs

function fillSelect(select, values, keep) {
  const current = select.value;
  const first = select.options[0];
  select.replaceChildren(first, ...values.map(([value, label]) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = label;
    return o;
  }));
  select.value = values.some(([v]) => v === current) ? current : keep ? current : "";
}

function renderSelectors(s) {
  const names = [...new Set([...s.services.map((r) => r.name), ...s.routes.map((r) => r.service)])].sort();
  fillSelect($("#tap-service"), names.map((n) => [n, n]), false);
  const local = s.services.filter((r) => r.state !== "external");
  fillSelect($("#log-service"), local.map((r) => [`${r.project}/${r.name}`, `${r.name} (${r.project})`]), true);
}

// ---------------------------------------------------------------- live request tail

function renderTap(msg) {
  if (!tap.on) return;
  const body = $("#tap-table tbody");
  const rows = msg.entries.map((e) => {
    const tr = document.createElement("tr");
    tr.dataset.status = e.status;
    tr.dataset.service = e.service;
    const stamp = new Date(e.time * 1000).toLocaleTimeString(undefined, { hour12: false });
    const status = text("td", e.status === 0 ? "none" : e.status, `status s${Math.floor(e.status / 100)}`);
    if (e.error) status.title = e.error;
    tr.append(text("td", stamp), text("td", e.service), text("td", e.method), text("td", e.path, "path"), status,
      text("td", fixed(e.duration_ms, 1)), text("td", e.node ? `peer ${e.node}` : e.route || "proxy"),
      text("td", e.caller), text("td", `${e.bytes_in}/${e.bytes_out}`));
    return tr;
  });
  body.prepend(...rows.reverse());
  while (body.rows.length > 300) body.deleteRow(-1);
  if (msg.dropped) $("#tap-note").textContent = `${msg.dropped} request(s) not shown: more than the tail shows per second`;
}

function sendTap() {
  tap.service = $("#tap-service").value;
  tap.status = $("#tap-status").value;
  send({ type: "tap", ...tap });
}

// ---------------------------------------------------------------- a service's log

function follow(project, service, scroll) {
  followed = project && service ? { project, service } : null;
  $("#log-service").value = followed ? `${project}/${service}` : "";
  $("#log-lines").textContent = "";
  $("#log-note").textContent = followed ? `Following ${project}/${service}` : "";
  send({ type: "log", project: project || null, service: service || null });
  if (scroll) $("#logs").scrollIntoView();
}

function renderLog(msg) {
  if (!followed || msg.service !== `${followed.project}/${followed.service}`) return;
  const pre = $("#log-lines");
  const lines = msg.lines.map((l) => l.line).join("\n");
  pre.append(document.createTextNode((pre.textContent ? "\n" : "") + lines));
  const all = pre.textContent.split("\n");
  if (all.length > 2000) pre.textContent = all.slice(-2000).join("\n");
  if ($("#log-follow").checked) pre.scrollTop = pre.scrollHeight;
}

// ---------------------------------------------------------------- the feed

function send(msg) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(msg));
}

function render(s) {
  state = s;
  showOverall(s.overall.level, s.overall.words);
  const node = s.agent.node ? `node ${s.agent.node}, ` : "";
  $("#agent-info").textContent = `agent ${s.agent.version} on ${s.agent.host} (${node}pid ${s.agent.pid})`;
  renderServices(s);
  renderWarnings(s);
  renderGraph(s);
  renderPeers(s);
  renderDatabases(s);
  renderSelectors(s);
}

function connected(yes, words) {
  const c = $("#connection");
  c.dataset.live = yes ? "yes" : "no";
  c.textContent = words;
  document.body.classList.toggle("offline", !yes);
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/feed`);
  socket.addEventListener("open", () => {
    retryMs = 250;
    connected(true, "live: updates as they happen");
    send({ type: "tap", ...tap });
    if (followed) send({ type: "log", ...followed });
  });
  socket.addEventListener("message", (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "state") render(msg.state);
    else if (msg.type === "tap") renderTap(msg);
    else if (msg.type === "log") renderLog(msg);
    else if (msg.type === "error") $("#action-result").textContent = msg.message;
  });
  socket.addEventListener("close", () => {
    socket = null;
    connected(false, `agent unreachable: reconnecting every ${Math.max(1, Math.round(retryMs / 1000))} s…`);
    showOverall("offline", "agent unreachable: showing what it last said");
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 2000);
  });
}

// ---------------------------------------------------------------- start

$("#tap-service").addEventListener("change", () => { $("#tap-table tbody").replaceChildren(); sendTap(); });
$("#tap-status").addEventListener("change", () => { $("#tap-table tbody").replaceChildren(); sendTap(); });
$("#tap-pause").addEventListener("click", (event) => {
  tap.on = !tap.on;
  event.target.setAttribute("aria-pressed", String(!tap.on));
  event.target.textContent = tap.on ? "Pause" : "Resume";
  sendTap();
});
$("#tap-clear").addEventListener("click", () => $("#tap-table tbody").replaceChildren());
$("#log-service").addEventListener("change", (event) => {
  const [project, service] = event.target.value.split("/");
  follow(project, service, false);
});
for (const form of document.querySelectorAll("form")) form.addEventListener("submit", (e) => e.preventDefault());
setInterval(() => {
  const now = Date.now() / 1000;
  for (const td of document.querySelectorAll("td.uptime[data-since]")) td.textContent = ago(now - Number(td.dataset.since));
}, 1000);
showOverall("connecting", "connecting to the agent");
connect();
