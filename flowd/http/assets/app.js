// The flowd web console: reads /v1/flows, /v1/sources, /v1/moves, /v1/daemons and /v1/graph
// every POLL_MS and draws them; the changing buttons POST, and the dead letters (message data)
// are read, with the token kept in sessionStorage. Plain JavaScript, no library, no build step: every text
// shown is set with textContent.
"use strict";

const POLL_MS = 2000;
const GRAPH_EVERY = 5; // polls between two reads of the graph
const HISTORY = 150; // throughput samples kept per flow (5 minutes at POLL_MS)
const TOKEN_KEY = "flowd.console.token";
const SVG = "http://www.w3.org/2000/svg";

const state = {
  flows: [],
  history: new Map(), // flow name -> [{t, rate}]
  polls: 0,
  dlqFlow: null,
  dlqLength: null,
  dlqAsked: 0,
  dlqShown: [],
  graphShape: "",
};

// -- small helpers ----------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function formatIdle(ms) {
  // As `flowd status` writes it.
  const seconds = ms / 1000;
  if (seconds < 60) return seconds.toFixed(1) + "s";
  let minutes = Math.floor(seconds / 60);
  const sec = Math.floor(seconds) % 60;
  if (minutes < 60) return `${minutes}m${String(sec).padStart(2, "0")}s`;
  let hours = Math.floor(minutes / 60);
  minutes %= 60;
  if (hours < 24) return `${hours}h${String(minutes).padStart(2, "0")}m`;
  const days = Math.floor(hours / 24);
  hours %= 24;
  return `${days}d${String(hours).padStart(2, "0")}h`;
}

function ago(seconds) {
  if (!seconds) return "-";
  const passed = Math.max(0, Date.now() / 1000 - seconds);
  if (passed < 120) return `${passed.toFixed(0)}s ago`;
  if (passed < 7200) return `${(passed / 60).toFixed(0)}m ago`;
  return `${(passed / 3600).toFixed(1)}h ago`;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
}

// -- the API ----------------------------------------------------------------------------

async function getJson(path, withToken = false) {
  // Only a route that needs it gets the token: the figures are open to anyone.
  const headers = {Accept: "application/json"};
  if (withToken && token()) headers.Authorization = "Bearer " + token();
  const response = await fetch(path, {headers, cache: "no-store"});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function post(path, body, what) {
  const headers = {"Content-Type": "application/json"};
  if (token()) headers.Authorization = "Bearer " + token();
  let response;
  try {
    response = await fetch(path, {method: "POST", headers, cache: "no-store",
                                  body: body === undefined ? "{}" : JSON.stringify(body)});
  } catch (error) {
    showMessage(`${what}: the daemon did not answer (${error.message})`, "error");
    return null;
  }
  const answer = await response.json().catch(() => ({}));
  const box = $("message");
  box.dataset.status = String(response.status);
  if (!response.ok) {
    const hint = response.status === 401 ? " Enter a control token above." : "";
    showMessage(`${what}: refused, ${response.status}: ${answer.error || response.statusText}.`
                + hint, "error");
    return null;
  }
  return answer;
}

// -- flows ------------------------------------------------------------------------------

function keyedRows(body, fresh, key, refill) {
  // Rows kept in place by their key: a button is never replaced under a click. With
  // `refill`, a kept row takes the fresh row's cells, all but its buttons.
  const existing = new Map([...body.rows].map((row) => [row.dataset[key], row]));
  const rows = fresh.map((row) => {
    const old = existing.get(row.dataset[key]);
    if (!old || old.cells.length !== row.cells.length) return row;
    if (refill) {
      [...row.cells].forEach((cell, i) => {
        if (!cell.classList.contains("actions")) old.cells[i].replaceWith(cell);
      });
    }
    return old;
  });
  if (rows.length !== body.rows.length || rows.some((row, i) => body.rows[i] !== row)) {
    body.replaceChildren(...rows);
  }
}

function cell(key, value, text, cls) {
  return el("td", {"data-key": key, "data-value": value === null ? "null" : String(value),
                   class: cls}, text);
}

function stateText(flow) {
  if (flow.state === "draining" && flow.pending === 0) return "drained";
  return flow.state;
}

function stateCell(flow) {
  const td = cell("state", flow.state, null, "state-" + flow.state);
  td.append(el("span", {class: "state-word", text: stateText(flow)}));
  const daemons = flow.daemons || [];
  if (daemons.length) {
    const following = daemons.filter((d) => d.state === flow.state).length;
    td.append(el("span", {class: "muted small",
                          text: ` ${following}/${daemons.length} daemon(s)`}));
  }
  if (flow.desired && flow.desired.by) {
    td.title = `asked by ${flow.desired.by}` +
      (flow.desired.at_ms ? ` at ${new Date(flow.desired.at_ms).toLocaleString()}` : "");
  }
  return td;
}

function actionButtons(flow) {
  const td = el("td", {class: "actions"});
  for (const [action, label] of [["pause", "pause"], ["resume", "resume"], ["drain", "drain"]]) {
    td.append(el("button", {type: "button", "data-action": action, text: label,
                            onclick: () => steer(flow.flow, action)}));
  }
  return td;
}

function flowRow(flow) {
  const row = el("tr", {"data-flow": flow.flow});
  row.append(el("td", {class: "name"}, el("strong", {text: flow.flow}),
                el("div", {class: "muted small",
                           text: `${flow.stream} · group ${flow.group} · ${flow.server}`})));
  if (flow.error) {
    row.append(el("td", {colspan: 10, class: "error-text", "data-key": "error",
                         text: flow.error}));
    return row;
  }
  row.append(stateCell(flow));
  row.append(cell("length", flow.length, flow.length, "num"));
  const lag = !flow.group_exists ? "no group" : flow.lag === null ? "?" : flow.lag;
  row.append(cell("lag", flow.lag, lag, "num"));
  row.append(cell("pending", flow.pending, flow.pending, "num"));
  const idle = flow.pending === 0 ? "-" :
    (flow.idle_scanned_all ? "" : ">=") + formatIdle(flow.oldest_pending_idle_ms);
  row.append(cell("oldest_pending_idle_ms", flow.oldest_pending_idle_ms, idle, "num"));
  row.append(cell("consumers", flow.consumers, flow.consumers, "num"));
  const dead = cell("dead_letter_length", flow.dead_letter_length, null, "num");
  if (flow.dead_letter_length === null) dead.textContent = "-";
  else dead.append(el("button", {type: "button", class: "link", text: flow.dead_letter_length,
                                 title: `show the dead letters in ${flow.dead_letter}`,
                                 onclick: () => chooseDeadLetters(flow.flow)}));
  row.append(dead);
  row.append(cell("rate", flow.rate, flow.rate === null ? "?" : flow.rate.toFixed(1), "num"));
  row.append(el("td", {class: "chart"}, chart(state.history.get(flow.flow) || [])));
  row.append(actionButtons(flow));
  return row;
}

function remember(flows, now) {
  for (const flow of flows) {
    const samples = state.history.get(flow.flow) || [];
    samples.push({t: now, rate: typeof flow.rate === "number" ? flow.rate : null});
    // By age: the seeded samples (flowd.rates) are further apart than the page's polls.
    while (samples.length > HISTORY || samples[0].t < now - HISTORY * POLL_MS) samples.shift();
    state.history.set(flow.flow, samples);
  }
}

function drawFlows(answer) {
  const flows = answer.flows;
  state.flows = flows;
  remember(flows, Date.now());
  keyedRows($("flows").tBodies[0], flows.map(flowRow), "flow", true);
  const problem = $("registry-error");
  problem.hidden = !answer.registry_error;
  problem.textContent = answer.registry_error ? `registry: ${answer.registry_error}` : "";
  fillDeadLetterChoice(flows);
  const chosen = flows.find((f) => f.flow === state.dlqFlow);
  if (chosen && chosen.dead_letter_length !== state.dlqLength) loadDeadLetters();
}

// -- sources -----------------------------------------------------------------------------

function whenText(ms, now) {
  // A Redis time (ms) as a distance from `now` (the Redis time of the read).
  if (!ms) return "-";
  return ms <= now ? `${formatIdle(now - ms)} ago` : `in ${formatIdle(ms - now)}`;
}

function lastRunCell(source) {
  const run = source.last_run || {};
  const td = cell("last_run", run.outcome ?? null, null, "outcome-" + (run.outcome || "none"));
  if (!run.outcome) {
    td.textContent = "never";
    return td;
  }
  const when = run.outcome === "running" ? whenText(run.start_ms, source.now_ms) :
    whenText(run.end_ms, source.now_ms);
  const rows = run.rows === undefined ? "" : ` · ${run.rows} rows`;
  td.append(el("span", {class: "outcome-word", text: run.outcome}),
            el("span", {class: "muted small", text: ` ${when}${rows}`}));
  if (run.error) {
    td.append(el("div", {class: "error-text small", text: run.error.split("Stack trace:")[0]}));
  }
  return td;
}

function sourceRow(source) {
  const row = el("tr", {"data-source": source.source});
  row.append(el("td", {class: "name"}, el("strong", {text: source.source}),
                el("div", {class: "muted small", text: source.schedule || ""})));
  if (source.error && !source.state) {
    row.append(el("td", {colspan: 8, class: "error-text", "data-key": "error",
                         text: source.error}));
    return row;
  }
  const state = cell("state", source.state, null, "state-" + source.state);
  state.append(el("span", {class: "state-word", text: source.state}));
  if (source.running_on) {
    state.append(el("span", {class: "muted small", text: ` run on ${source.running_on}`}));
  }
  row.append(state);
  row.append(cell("lag_s", source.lag_s,
                  source.lag_s === null ? "-" : formatIdle(source.lag_s * 1000), "num"));
  row.append(lastRunCell(source));
  row.append(cell("next_ms", source.next_ms, whenText(source.next_ms, source.now_ms)));
  row.append(cell("rows", source.rows, source.rows, "num"));
  row.append(cell("held", source.held, source.held || "-"));
  row.append(cell("cursor", source.cursor && source.cursor.join(", "),
                  source.cursor ? source.cursor.join(", ") : "-", "small"));
  const actions = el("td", {class: "actions"});
  for (const action of ["pause", "resume", "drain"]) {
    actions.append(el("button", {
      type: "button", "data-action": action, text: action,
      onclick: () => steerScheduled("source", source.source, action)}));
  }
  row.append(actions);
  return row;
}

function drawSources(answer) {
  const sources = answer.sources || [];
  $("sources-section").hidden = sources.length === 0;
  keyedRows($("sources").tBodies[0], sources.map(sourceRow), "source", true);
}

async function steerScheduled(kind, name, action) {
  // kind: "source" or "move"; the same token rules as a flow's buttons.
  const answer = await post(`/v1/${kind}s/${encodeURIComponent(name)}/${action}`, undefined,
                            `${action} ${name}`);
  if (answer) showMessage(`${kind} ${name}: ${answer.state}, asked by ${answer.by}`, "ok");
  await refresh();
}

// -- moves -------------------------------------------------------------------------------

function moveRow(move) {
  const row = el("tr", {"data-move": move.move});
  row.append(el("td", {class: "name"}, el("strong", {text: move.move}),
                el("div", {class: "muted small", text: move.schedule || ""})));
  if (move.error && !move.state) {
    row.append(el("td", {colspan: 8, class: "error-text", "data-key": "error",
                         text: move.error}));
    return row;
  }
  const state = cell("state", move.state, null, "state-" + move.state);
  state.append(el("span", {class: "state-word", text: move.state}));
  if (move.running_on) {
    state.append(el("span", {class: "muted small", text: ` run on ${move.running_on}`}));
  }
  row.append(state);
  row.append(cell("partitions_moved", move.partitions_moved, move.partitions_moved, "num"));
  row.append(cell("rows_moved", move.rows_moved, move.rows_moved, "num"));
  const parts = move.partitions || [];
  const inHand = parts.filter((p) => p.phase !== "stuck")
    .map((p) => `${p.partition}:${p.phase} ${p.sent}/${p.rows}`).join(", ");
  row.append(cell("in_hand", inHand, inHand || "-", "small"));
  const stuck = parts.filter((p) => p.phase === "stuck")
    .map((p) => `${p.partition}: ${(p.error || "").split("Stack trace:")[0]}`).join("; ");
  row.append(cell("stuck", stuck, stuck || "-", stuck ? "error-text small" : "small"));
  row.append(lastRunCell(move));  // a move's last run has no rows: none shown
  row.append(cell("next_ms", move.next_ms, whenText(move.next_ms, move.now_ms)));
  const actions = el("td", {class: "actions"});
  for (const action of ["pause", "resume", "drain"]) {
    actions.append(el("button", {
      type: "button", "data-action": action, text: action,
      onclick: () => steerScheduled("move", move.move, action)}));
  }
  row.append(actions);
  return row;
}

function drawMoves(answer) {
  const moves = answer.moves || [];
  $("moves-section").hidden = moves.length === 0;
  keyedRows($("moves").tBodies[0], moves.map(moveRow), "move", true);
}

// -- the throughput chart -----------------------------------------------------------------

function chart(samples) {
  const width = 220, height = 44, pad = 3;
  const box = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, class: "spark",
                          role: "img"});
  const known = samples.filter((s) => s.rate !== null);
  const top = Math.max(1, ...known.map((s) => s.rate));
  box.append(svg("rect", {x: 0, y: 0, width, height, class: "spark-bg"}));
  if (known.length >= 2) {
    const span = HISTORY * POLL_MS;
    const end = samples[samples.length - 1].t;
    const x = (t) => width - pad - ((end - t) / span) * (width - 2 * pad);
    const y = (rate) => height - pad - (rate / top) * (height - 2 * pad - 10);
    const points = known.map((s) => `${x(s.t).toFixed(1)},${y(s.rate).toFixed(1)}`);
    const first = x(known[0].t).toFixed(1), last = x(known[known.length - 1].t).toFixed(1);
    box.append(svg("path", {class: "spark-area",
                            d: `M${first},${height - pad} L${points.join(" L")} ` +
                               `L${last},${height - pad} Z`}));
    box.append(svg("polyline", {class: "spark-line", points: points.join(" ")}));
  }
  const now = known.length ? known[known.length - 1].rate : null;
  box.append(svg("text", {x: pad + 2, y: 11, class: "spark-label",
                          text: `max ${top.toFixed(1)}/s` +
                                (now === null ? "" : ` · now ${now.toFixed(1)}/s`)}));
  box.append(svg("title", {text: "entries acked per second, by the live daemons"}));
  return box;
}

// -- daemons ------------------------------------------------------------------------------

function drawDaemons(answer) {
  const rows = answer.daemons.map((daemon) => {
    const flows = Object.entries(daemon.flows || {});
    const last = Math.max(0, ...flows.map(([, f]) => f.last_commit_at || 0));
    const rate = flows.reduce((sum, [, f]) => sum + (f.acked_per_s || 0), 0);
    const names = flows.map(([name, f]) => (f.state && f.state !== "running" ?
      `${name} (${f.state})` : name)).join(", ") || "-";
    return el("tr", {"data-daemon": daemon.id, class: "daemon-" + daemon.state},
      el("td", {text: daemon.id}), el("td", {text: daemon.host || "?"}),
      el("td", {class: "num", text: daemon.pid ?? "?"}),
      el("td", {class: "state-" + daemon.state, text: daemon.state}),
      el("td", {text: daemon.version || "?"}), el("td", {text: names}),
      el("td", {text: ago(daemon.started_at)}), el("td", {text: ago(daemon.refreshed_at)}),
      el("td", {text: ago(last)}),
      el("td", {class: "num", text: daemon.state === "live" ? rate.toFixed(1) : "-"}));
  });
  $("daemons").tBodies[0].replaceChildren(...rows);
  $("daemons-empty").hidden = rows.length > 0;
}

// -- the data-flow graph -------------------------------------------------------------------

function ranks(graph) {
  // Longest path from a node nothing points to: sources left, outputs right. Bounded, so a
  // cycle (a flow writing what it reads) cannot loop.
  const rank = new Map(graph.nodes.map((n) => [n.key, 0]));
  const limit = graph.nodes.length;
  for (let round = 0; round < limit; round++) {
    let moved = false;
    for (const edge of graph.edges) {
      const next = Math.min(limit, rank.get(edge.source) + 1);
      if (edge.source !== edge.target && rank.get(edge.target) < next) {
        rank.set(edge.target, next);
        moved = true;
      }
    }
    if (!moved) break;
  }
  return rank;
}

function columns(graph, rank) {
  const byRank = new Map();
  for (const node of graph.nodes) {
    const r = rank.get(node.key);
    if (!byRank.has(r)) byRank.set(r, []);
    byRank.get(r).push(node);
  }
  const order = new Map();
  const result = [...byRank.keys()].sort((a, b) => a - b).map((r) => byRank.get(r));
  result.forEach((column, index) => {
    // Each node next to what feeds it (the mean place of its sources), ties by server.
    const weight = (node) => {
      const places = graph.edges.filter((e) => e.target === node.key && order.has(e.source))
        .map((e) => order.get(e.source));
      return places.length ? places.reduce((a, b) => a + b, 0) / places.length : -1;
    };
    if (index > 0) column.sort((a, b) => weight(a) - weight(b) || a.group.localeCompare(b.group));
    else column.sort((a, b) => a.group.localeCompare(b.group) || a.key.localeCompare(b.key));
    column.forEach((node, place) => order.set(node.key, place));
  });
  return result;
}

const NODE_W = 200, LINE_H = 15, COL_GAP = 170, ROW_GAP = 26, MARGIN = 20;

function layout(graph) {
  const rank = ranks(graph);
  const cols = columns(graph, rank);
  const boxes = new Map();
  let height = 0;
  cols.forEach((column, index) => {
    let y = MARGIN;
    for (const node of column) {
      const h = 14 + LINE_H * (node.lines.length + (node.group ? 1 : 0));
      boxes.set(node.key, {node, x: MARGIN + index * (NODE_W + COL_GAP), y, w: NODE_W, h});
      y += h + ROW_GAP;
    }
    height = Math.max(height, y);
  });
  return {boxes, width: MARGIN * 2 + cols.length * NODE_W + (cols.length - 1) * COL_GAP,
          height: height + MARGIN};
}

function groupNames(graph) {
  const names = new Map();
  graph.groups.forEach((group, index) => names.set(group.key, {group, index}));
  return names;
}

function drawNode(box, groups) {
  const node = box.node;
  const g = svg("g", {class: `node node-${node.kind}`, "data-node": node.key,
                      transform: `translate(${box.x},${box.y})`});
  g.append(svg("rect", {width: box.w, height: box.h, rx: node.kind === "flow" ? 4 : 10}));
  const found = groups.get(node.group);
  if (found) {
    g.append(svg("rect", {class: `band band-${found.group.kind} band-${found.index % 6}`,
                          width: 6, height: box.h, rx: 3}));
  }
  node.lines.forEach((line, i) => {
    g.append(svg("text", {x: 14, y: 20 + i * LINE_H, class: i === 0 ? "title" : "",
                          text: line}));
  });
  if (found) {
    g.append(svg("text", {x: 14, y: 20 + node.lines.length * LINE_H, class: "where",
                          text: `on ${found.group.lines[0]}`}));
  }
  g.append(svg("title", {text: [...node.lines, found ? found.group.lines.join(" ") : ""]
                                 .join("\n").trim()}));
  return g;
}

function drawEdge(edge, boxes) {
  const from = boxes.get(edge.source), to = boxes.get(edge.target);
  if (!from || !to) return null;
  const x1 = from.x + from.w, y1 = from.y + from.h / 2;
  const x2 = to.x, y2 = to.y + to.h / 2;
  let d;
  if (x2 > x1) {
    const bend = (x2 - x1) / 2;
    d = `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}`;
  } else { // back to an earlier column: around, below
    const low = Math.max(from.y + from.h, to.y + to.h) + 30;
    d = `M${x1},${y1} C${x1 + 60},${low} ${x2 - 60},${low} ${x2},${y2}`;
  }
  const g = svg("g", {class: `edge edge-${edge.kind}`, "data-edge": edge.source + ">" +
                                                                  edge.target});
  g.append(svg("path", {d, "marker-end": `url(#arrow-${edge.kind})`}));
  if (edge.lines.length) g.append(edgeLabel(edge.lines, x1, y1, x2, y2, from, to));
  return g;
}

function edgeLabel(lines, x1, y1, x2, y2, from, to) {
  // Off the line: the curve runs between y1 and y2, so a label on the far side of its end
  // from its start never touches it. Forward: just before the arrow, below the end when
  // the curve comes down to it, above when it comes up; around: below its lowest point.
  const width = Math.max(...lines.map((l) => l.length)) * 6.2 + 8;
  const height = lines.length * 12 + 4;
  let left, top;
  if (x2 > x1) {
    left = Math.max(x1 + 4, x2 - 14 - width);
    top = y1 < y2 ? y2 + 6 : y2 - 6 - height;
  } else {
    left = (x1 + x2) / 2 - width / 2;
    top = Math.max(from.y + from.h, to.y + to.h) + 30 + 4;
  }
  const label = svg("g", {class: "edge-text"});
  label.append(svg("rect", {class: "edge-label-bg", x: left, y: top, width, height, rx: 3}));
  lines.forEach((line, i) => {
    label.append(svg("text", {x: left + width / 2, y: top + 12 + i * 12, class: "edge-label",
                              text: line}));
  });
  return label;
}

function markers() {
  const defs = svg("defs");
  for (const kind of ["read", "write", "dead_letter"]) {
    defs.append(svg("marker", {id: `arrow-${kind}`, viewBox: "0 0 10 10", refX: 10, refY: 5,
                               markerWidth: 8, markerHeight: 8, orient: "auto-start-reverse",
                               class: `arrow arrow-${kind}`},
                    svg("path", {d: "M0,0 L10,5 L0,10 z"})));
  }
  return defs;
}

function drawGraph(graph) {
  const place = $("graph");
  if (!graph.nodes.length) {
    place.replaceChildren(el("p", {class: "muted", text: "No flows in the config."}));
    return;
  }
  const {boxes, width, height} = layout(graph);
  const groups = groupNames(graph);
  // Its width follows its box (style.css), its height the drawing's proportions.
  const picture = svg("svg", {viewBox: `0 0 ${width} ${height + 40}`,
                              role: "img", "aria-label": "the data-flow graph",
                              id: "graph-svg"});
  picture.style.maxWidth = `${width}px`;
  picture.append(markers());
  for (const edge of graph.edges) picture.append(drawEdge(edge, boxes));
  for (const box of boxes.values()) picture.append(drawNode(box, groups));
  place.replaceChildren(picture);
  const legend = [...groups.values()].map(({group, index}) =>
    el("span", {class: "legend-item"},
       el("span", {class: `swatch band-${group.kind} band-${index % 6}`}),
       `${group.lines[0]} (${group.lines.slice(1).join(" ")})`));
  legend.push(el("span", {class: "legend-item muted",
                          text: graph.live ? "edges: live lag and pending" :
                                             "no Redis answered: no live figures"}));
  $("graph-legend").replaceChildren(...legend);
}

// -- dead letters --------------------------------------------------------------------------

function fillDeadLetterChoice(flows) {
  const select = $("dlq-flow");
  const names = flows.filter((f) => f.dead_letter).map((f) => f.flow);
  const shown = [...select.options].map((o) => o.value);
  if (names.join("\n") !== shown.join("\n")) {
    select.replaceChildren(...names.map((name) => el("option", {value: name, text: name})));
  }
  if (!names.length) {
    state.dlqFlow = null;
    $("dlq-summary").textContent = "no flow has a dead-letter stream";
    return;
  }
  if (!names.includes(state.dlqFlow)) chooseDeadLetters(names[0], false);
  select.value = state.dlqFlow;
}

function chooseDeadLetters(name, scroll = true) {
  state.dlqFlow = name;
  state.dlqLength = null;
  $("dlq-flow").value = name;
  loadDeadLetters();
  if (scroll) $("dlq-section").scrollIntoView({behavior: "smooth"});
}

function letterRow(flow, letter) {
  const fields = el("dl", {class: "fields"});
  for (const [key, value] of Object.entries(letter.fields)) {
    fields.append(el("dt", {text: key}), el("dd", {text: value}));
  }
  const details = el("details", {}, el("summary", {
    text: `${Object.keys(letter.fields).length} field(s)` +
          (letter.truncated.length ? " (long values cut)" : "")}), fields);
  const actions = el("td", {class: "actions"},
    el("button", {type: "button", "data-action": "replay", text: "replay",
                  onclick: () => moveLetters(flow, [letter.id], "replay")}),
    el("button", {type: "button", "data-action": "purge", class: "danger", text: "purge",
                  onclick: () => moveLetters(flow, [letter.id], "purge")}));
  return el("tr", {"data-letter": letter.id},
    el("td", {class: "mono", text: letter.id}),
    el("td", {class: "mono", text: letter.source_id || "-"}),
    el("td", {class: "num", text: letter.deliveries ?? "?"}),
    el("td", {class: "reason", text: letter.reason || "-"}),
    el("td", {}, details), actions);
}

async function loadDeadLetters() {
  const flow = state.dlqFlow;
  if (!flow) return;
  const asked = ++state.dlqAsked;
  let answer;
  try {
    answer = await getJson(`/v1/flows/${encodeURIComponent(flow)}/dead-letters?count=100`,
                           true);
  } catch (error) {
    if (flow === state.dlqFlow && asked === state.dlqAsked) deadLettersFailed(flow, error);
    return;
  }
  if (flow !== state.dlqFlow || asked !== state.dlqAsked) return; // a later list is coming
  const summary = $("dlq-summary");
  summary.className = "muted";
  delete summary.dataset.status;
  state.dlqLength = answer.length;
  state.dlqShown = answer.letters.map((l) => l.id);
  const body = $("dead-letters").tBodies[0];
  if (body.dataset.flow !== flow) body.replaceChildren();
  body.dataset.flow = flow;
  keyedRows(body, answer.letters.map((l) => letterRow(flow, l)), "letter", false);
  $("dlq-empty").hidden = answer.letters.length > 0;
  $("dlq-summary").textContent = `${answer.letters.length} shown of ${answer.length} in ` +
    `${answer.dead_letter}; replay sends them back to ${answer.stream}`;
}

function deadLettersFailed(flow, error) {
  const summary = $("dlq-summary");
  summary.className = "error-text";
  summary.dataset.status = String(error.status || "");
  if (error.status !== 401 && error.status !== 403) {
    summary.textContent = `cannot list the dead letters: ${error.message}`;
    return;
  }
  // Dead letters hold message data: the server shows them to a token allowed to read them
  // only. Nothing of them stays on the page, and they are asked for again when their
  // number changes or another token is entered, not on every poll.
  $("dead-letters").tBodies[0].replaceChildren();
  $("dlq-empty").hidden = true;
  state.dlqShown = [];
  const known = state.flows.find((f) => f.flow === flow);
  state.dlqLength = known ? known.dead_letter_length : null;
  const what = error.status === 401 ?
    "enter a token with read = true or control = true above to see them" :
    "this token may not read them (it needs read = true or control = true)";
  summary.textContent = `dead letters not shown, refused ${error.status}: ${what}.`;
}

async function moveLetters(flow, ids, action) {
  if (!ids.length) return;
  if (action === "purge" &&
      !window.confirm(`Delete ${ids.length} dead letter(s) of ${flow} for good?`)) return;
  const answer = await post(`/v1/flows/${encodeURIComponent(flow)}/dead-letters/${action}`,
                            {ids}, `${action} of ${ids.length} dead letter(s) of ${flow}`);
  if (answer) {
    const done = action === "replay" ? answer.replayed : answer.purged;
    const kept = answer.kept && answer.kept.length ?
      ` (${answer.kept.length} kept: no original fields to send back)` : "";
    showMessage(`${action === "replay" ? "replayed" : "purged"} ${done} dead letter(s) of ` +
                `${flow}${kept}`, "ok");
  }
  await loadDeadLetters();
  await refresh();
}

async function steer(flow, action) {
  const answer = await post(`/v1/flows/${encodeURIComponent(flow)}/${action}`, undefined,
                            `${action} ${flow}`);
  if (answer) showMessage(`flow ${flow}: ${answer.state}, asked by ${answer.by}`, "ok");
  await refresh();
}

// -- the token --------------------------------------------------------------------------------

function showMode() {
  const mode = $("mode");
  mode.textContent = token() ? "token set" : "no token";
  mode.className = "badge " + (token() ? "control" : "readonly");
}

function tokenChanged() {
  showMode();
  state.dlqLength = null;
  loadDeadLetters(); // what the new token may read
}

function setupToken() {
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    tokenChanged();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    tokenChanged();
  });
  showMode();
}

// -- the loop ------------------------------------------------------------------------------------

async function refresh() {
  const reads = [getJson("/v1/flows").then(drawFlows),
                 getJson("/v1/sources").then(drawSources),
                 getJson("/v1/moves").then(drawMoves),
                 getJson("/v1/daemons").then(drawDaemons)];
  if (state.polls % GRAPH_EVERY === 0) reads.push(getJson("/v1/graph").then(drawGraph));
  state.polls += 1;
  const results = await Promise.allSettled(reads);
  const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  const stamp = $("refreshed");
  stamp.textContent = failed.length ? `not refreshed: ${failed[0]}` :
    `refreshed ${new Date().toLocaleTimeString()}`;
  stamp.className = failed.length ? "error-text" : "muted";
  document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
}

async function seedRates() {
  // The minutes before the page opened, as the serving daemon sampled them.
  try {
    const answer = await getJson("/v1/rates");
    for (const [flow, samples] of Object.entries(answer.flows)) {
      state.history.set(flow, samples.slice(-HISTORY).map(([t, rate]) => ({t: t * 1000, rate})));
    }
  } catch (error) {
    // An older daemon, or none answering: the chart starts now.
  }
}

async function poll() {
  try {
    await refresh();
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupToken();
  $("dlq-flow").addEventListener("change", (event) => chooseDeadLetters(event.target.value,
                                                                         false));
  $("dlq-refresh").addEventListener("click", () => loadDeadLetters());
  $("dlq-replay-shown").addEventListener("click", () => {
    const ids = state.dlqShown || [];
    if (state.dlqFlow && ids.length &&
        window.confirm(`Send ${ids.length} dead letter(s) of ${state.dlqFlow} back?`)) {
      moveLetters(state.dlqFlow, ids, "replay");
    }
  });
  seedRates().finally(poll);
});
