// The service map: /map/data (nodes = identities and services, edges = aggregated flows) drawn with
// Cytoscape and refreshed every two seconds; /map/flows fills the table for the selected node or edge.
"use strict";
(function () {
  const status = document.getElementById("status");
  let errors = 0;
  function failed(what) {
    errors += 1;
    status.dataset.errors = String(errors);
    status.textContent = "error: " + what;
  }
  window.addEventListener("error", (e) => failed(e.message));
  window.addEventListener("unhandledrejection", (e) => failed(String(e.reason)));

  const colours = { forwarded: "#2e7d32", redirected: "#1565c0", mixed: "#ef6c00", dropped: "#c62828" };
  const cy = cytoscape({
    container: document.getElementById("graph"),
    style: [
      { selector: "node", style: { "label": "data(label)", "background-color": "#90a4ae", "shape": "round-rectangle",
          "width": (ele) => Math.max(60, 6.5 * String(ele.data("label")).length), "height": 26, "padding": "8px", "text-valign": "center", "font-size": 11,
          "border-width": 2, "border-color": "#546e7a" } },
      { selector: "node[kind = 'service']", style: { "shape": "hexagon", "background-color": "#b39ddb" } },
      { selector: "node[dropped > 0]", style: { "border-color": "#c62828", "border-width": 3 } },
      { selector: "edge", style: { "curve-style": "bezier", "target-arrow-shape": "triangle", "width": 2,
          "label": "data(label)", "font-size": 9, "text-wrap": "wrap", "text-background-color": "#fff",
          "text-background-opacity": 0.85, "line-color": "data(colour)", "target-arrow-color": "data(colour)" } },
      { selector: "edge[state = 'dropped']", style: { "line-style": "dashed", "width": 4 } },
      { selector: ":selected", style: { "overlay-opacity": 0.15, "overlay-color": "#000" } },
    ],
  });
  let selected = { node: "", edge: "" };
  let known = "";

  function draw(graph) {
    const ids = new Set();
    let added = false;
    for (const n of graph.nodes) {
      ids.add(n.id);
      const el = cy.getElementById(n.id);
      if (el.nonempty()) { el.data(n); } else { cy.add({ group: "nodes", data: n }); added = true; }
    }
    for (const e of graph.edges) {
      ids.add(e.id);
      const data = Object.assign({}, e, { colour: colours[e.state] || "#607d8b" });
      const el = cy.getElementById(e.id);
      if (el.nonempty()) { el.data(data); } else { cy.add({ group: "edges", data: data }); added = true; }
    }
    cy.elements().forEach((el) => { if (!ids.has(el.id())) { cy.remove(el); added = true; } });
    const shape = [...ids].sort().join(",");
    if (added || shape !== known) {
      known = shape;
      cy.layout({ name: "cose", animate: false, nodeDimensionsIncludeLabels: true, padding: 30 }).run();
    }
    status.dataset.nodes = String(graph.nodes.length);
    status.dataset.edges = String(graph.edges.length);
    status.dataset.updates = String(Number(status.dataset.updates) + 1);
    status.textContent = graph.nodes.length + " nodes, " + graph.edges.length + " edges, " + graph.flows +
      " flows (" + (graph.since || "all kept") + ")";
  }

  function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }

  function table(rows) {
    const body = document.getElementById("rows");
    body.replaceChildren();
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.className = r.verdict;
      for (const k of ["time", "source", "destination", "type", "verdict", "summary"]) { tr.appendChild(cell(r[k])); }
      body.appendChild(tr);
    }
  }

  async function refresh() {
    const data = await fetch("data" + location.search).then((r) => { if (!r.ok) throw new Error("data " + r.status); return r.json(); });
    draw(data);
    const q = new URLSearchParams(location.search);
    if (selected.node) q.set("node", selected.node);
    if (selected.edge) q.set("edge", selected.edge);
    const rows = await fetch("flows?" + q).then((r) => { if (!r.ok) throw new Error("flows " + r.status); return r.json(); });
    table(rows);
  }

  function choose(kind, id, text) {
    selected = { node: kind === "node" ? id : "", edge: kind === "edge" ? id : "" };
    document.getElementById("filter").textContent = id ? "Flows of " + text : "All flows (click a node or an edge to filter, the background to clear)";
    refresh().catch((e) => failed(String(e)));
  }
  cy.on("tap", "node", (e) => choose("node", e.target.id(), e.target.data("label")));
  cy.on("tap", "edge", (e) => choose("edge", e.target.id(), e.target.data("source") + " → " + e.target.data("target")));
  cy.on("tap", (e) => { if (e.target === cy) choose("", "", ""); });

  function loop() { refresh().catch((e) => failed(String(e))).finally(() => setTimeout(loop, 2000)); }
  loop();
})();
