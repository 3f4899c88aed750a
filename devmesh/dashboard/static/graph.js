// The dependency graph as SVG: a small layered layout, callers on the left.
//
// Why our own: no library may come from the internet and there is no build step. The graphs
// are a project's services (tens, not thousands), so longest-path layering plus one pass of
// barycentre ordering reads well enough, and the route table below the graph says the same
// in text for anyone who cannot use the picture.

const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 190;
const NODE_H = 54;
const GAP_X = 230;
const GAP_Y = 90;
const PAD = 20;

function el(name, attrs, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

// Layer of each node: 0 for those nobody calls, else one more than their deepest caller.
function layers(nodes, edges) {
  const callers = new Map(nodes.map((n) => [n.id, []]));
  for (const e of edges) if (callers.has(e.to) && callers.has(e.from)) callers.get(e.to).push(e.from);
  const depth = new Map();
  const visiting = new Set();
  const visit = (id) => {
    if (depth.has(id)) return depth.get(id);
    if (visiting.has(id)) return 0; // a cycle: cut it here
    visiting.add(id);
    let d = 0;
    for (const c of callers.get(id) || []) d = Math.max(d, visit(c) + 1);
    visiting.delete(id);
    depth.set(id, d);
    return d;
  };
  for (const n of nodes) visit(n.id);
  return depth;
}

export function layout(nodes, edges) {
  const depth = layers(nodes, edges);
  const columns = [];
  for (const n of nodes) {
    const d = depth.get(n.id) || 0;
    (columns[d] ||= []).push(n);
  }
  for (const col of columns) if (col) col.sort((a, b) => a.id.localeCompare(b.id));
  // One barycentre pass: order each column by the mean row of its callers.
  const row = new Map();
  columns.forEach((col) => col && col.forEach((n, i) => row.set(n.id, i)));
  for (let c = 1; c < columns.length; c++) {
    const col = columns[c];
    if (!col) continue;
    const score = (n) => {
      const from = edges.filter((e) => e.to === n.id && row.has(e.from)).map((e) => row.get(e.from));
      return from.length ? from.reduce((a, b) => a + b, 0) / from.length : row.get(n.id);
    };
    col.sort((a, b) => score(a) - score(b) || a.id.localeCompare(b.id));
    col.forEach((n, i) => row.set(n.id, i));
  }
  const pos = new Map();
  columns.forEach((col, c) => {
    (col || []).forEach((n, i) => {
      pos.set(n.id, { x: PAD + c * (NODE_W + GAP_X), y: PAD + i * (NODE_H + GAP_Y) });
    });
  });
  const tallest = Math.max(1, ...columns.map((col) => (col ? col.length : 0)));
  return {
    pos,
    width: PAD * 2 + Math.max(1, columns.length) * NODE_W + Math.max(0, columns.length - 1) * GAP_X,
    height: PAD * 2 + tallest * NODE_H + (tallest - 1) * GAP_Y + 30,
  };
}

// nodes: [{id, title, lines: [str], level: "ok|busy|bad|off|ext"}]
// edges: [{from, to, kind: "local|peer|fallback|none", lines: [str], warn: bool}]
export function draw(container, nodes, edges) {
  container.replaceChildren();
  if (!nodes.length) {
    const p = document.createElement("p");
    p.textContent = "No services yet.";
    container.append(p);
    return;
  }
  const { pos, width, height } = layout(nodes, edges);
  const svg = el("svg", {
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": `Dependency graph: ${nodes.length} services, ${edges.length} calls`,
  });
  const defs = el("defs");
  for (const kind of ["local", "peer", "fallback", "none"]) {
    const marker = el("marker", {
      id: `arrow-${kind}`, viewBox: "0 0 10 10", refX: 10, refY: 5,
      markerWidth: 10, markerHeight: 10, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse",
    });
    marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", class: `arrowhead ${kind}` }));
    defs.append(marker);
  }
  svg.append(defs);
  const edgeLayer = el("g", { class: "edges" });
  const nodeLayer = el("g", { class: "nodes" });
  svg.append(edgeLayer, nodeLayer);

  // Each edge leaves and enters at its own port, spread along the node's side in the order
  // of the other end's position, so arrows (and their labels) between neighbours part.
  const ports = (key, other) => {
    const by = new Map();
    for (const e of edges) (by.get(e[key]) || by.set(e[key], []).get(e[key])).push(e);
    const at = new Map();
    for (const list of by.values()) {
      list.sort((p, q) => ((pos.get(p[other]) || {}).y || 0) - ((pos.get(q[other]) || {}).y || 0));
      list.forEach((e, i) => at.set(e, (NODE_H * (i + 1)) / (list.length + 1)));
    }
    return at;
  };
  const outPort = ports("from", "to");
  const inPort = ports("to", "from");
  for (const e of edges) {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + NODE_W, y1 = a.y + outPort.get(e);
    const x2 = b.x, y2 = b.y + inPort.get(e);
    const back = x2 <= x1;
    const mid = (x1 + x2) / 2;
    const d = back
      ? `M ${x1} ${y1} C ${x1 + 60} ${y1 - 80}, ${x2 - 60} ${y2 - 80}, ${x2} ${y2}`
      : `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`;
    const g = el("g", { class: `edge ${e.kind}${e.warn ? " warn" : ""}`, "data-edge": `${e.from}->${e.to}` });
    g.append(el("title", {}, `${e.from} calls ${e.to}: ${e.lines.join("; ")}`));
    g.append(el("path", { d, class: "edge-line", "marker-end": `url(#arrow-${e.kind})` }));
    const lx = back ? (x1 + x2) / 2 : mid;
    const ly = back ? Math.min(y1, y2) - 70 : (y1 + y2) / 2 - 6 - (e.lines.length - 1) * 14;
    e.lines.forEach((line, i) => {
      const t = el("text", { x: lx, y: ly + i * 14, class: "edge-label", "text-anchor": "middle" }, line);
      g.append(t);
    });
    edgeLayer.append(g);
  }
  for (const n of nodes) {
    const p = pos.get(n.id);
    const g = el("g", { class: `node ${n.level}`, transform: `translate(${p.x} ${p.y})`, "data-node": n.id });
    g.append(el("title", {}, [n.title, ...n.lines].join(" — ")));
    g.append(el("rect", { width: NODE_W, height: NODE_H, rx: 7, ry: 7 }));
    g.append(el("text", { x: 10, y: 20, class: "node-title" }, n.title));
    n.lines.slice(0, 2).forEach((line, i) => {
      g.append(el("text", { x: 10, y: 36 + i * 13, class: "node-line" }, line));
    });
    nodeLayer.append(g);
  }
  container.append(svg);
}
