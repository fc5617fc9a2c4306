"use strict";
// One agent: its facts, device line, plots of the host's short history, its log (with
// history, level filter and search, live) and its deploys with rollback.
const { $, api, el, say, bytes, rate, when, plot } = Tether;
const id = decodeURIComponent(location.pathname.split("/").pop());
const base = `/api/agents/${encodeURIComponent(id)}`;
const MAX_LINES = 2000;
const lines = [];
let plots = null;

function fact(label, value, attrs = {}) {
  return el("div", attrs, el("b", {}, label), value);
}

async function refreshAgent() {
  let a;
  try {
    a = await api(base);
  } catch (e) {
    return say(e.message, true);
  }
  document.title = `Tether console: ${a.id}`;
  $("agent-id").textContent = a.id;
  const status = $("agent-status");
  status.textContent = a.status + (a.cause ? ` (${a.cause})` : "") + (a.slow_lane ? ", slow lane" : "");
  status.className = "status " + a.status;
  status.dataset.status = a.status;
  $("facts").replaceChildren(
    fact("URL", el("a", { href: a.url }, a.url)),
    fact("module", el("code", { title: a.module }, a.module.slice(0, 16))),
    fact("restarts", a.restarts),
    fact("events", a.events),
    fact("CPU", a.cpu_seconds.toFixed(3) + " s"),
    fact("memory", bytes(a.memory_bytes)),
    fact("store", bytes(a.store_bytes)),
    fact("MQTT messages", a.mqtt_messages),
    fact("HTTP requests", a.http_requests),
  );
  const d = a.device;
  $("device").replaceChildren(...(d
    ? [fact("link", d.connected ? "connected" : "disconnected", { class: d.connected ? "connected" : "disconnected", id: "device-link" }),
       fact("messages", a.device_messages), fact("frames in", d.frames_rx), fact("frames out", d.frames_tx),
       fact("round trip", d.rtt_ms ? d.rtt_ms + " ms" : "not measured yet"), fact("replugs", d.replugs),
       fact("CRC errors", d.crc_errors), fact("malformed", d.malformed), fact("unexpected", d.unexpected)]
    : [el("div", { class: "muted" }, "This agent has no device.")]));
}

function makePlots() {
  const percent = (v) => (v * 100).toFixed(v < 0.1 ? 2 : 0) + " %";
  const ms = (v) => (v * 1000).toFixed(v < 0.001 ? 2 : 1) + " ms";
  return {
    events: plot($("plot-events"), "events / s", ["events"]),
    messages: plot($("plot-messages"), "messages / s", ["MQTT", "device"]),
    http: plot($("plot-http"), "HTTP requests / s", ["outgoing"]),
    cpu: plot($("plot-cpu"), "CPU, share of one core", ["busy"], { format: percent }),
    memory: plot($("plot-memory"), "memory", ["linear memory"], { format: bytes }),
    latency: plot($("plot-latency"), "event time (bucket bound)", ["p50", "p99"], { format: ms }),
  };
}

let interval = 2000;
async function refreshHistory() {
  let h;
  try {
    h = await api(base + "/history");
  } catch (e) {
    return say(e.message, true);
  }
  plots = plots || makePlots();
  plots.events.set([h.t, h.events]);
  plots.messages.set([h.t, h.mqtt, h.device]);
  plots.http.set([h.t, h.http]);
  plots.cpu.set([h.t, h.cpu]);
  plots.memory.set([h.t, h.memory_bytes]);
  plots.latency.set([h.t, h.p50_s, h.p99_s]);
  $("history-note").textContent = h.t.length
    ? `One sample every ${h.interval_s} s, the last ${h.t.length} kept by the host.`
    : `The host takes a sample every ${h.interval_s} s; the plots fill from the second one.`;
  // For tests and scripts: how full the plots are.
  $("plots").dataset.samples = h.t.length;
  $("plots").dataset.eventsMax = Math.max(0, ...h.events);
  interval = Math.max(1000, h.interval_s * 1000);
}

// The timeline: device, agent and broker, interleaved. Asking for it keeps the host
// recording the agent's traffic for the next minute.
async function refreshTimeline() {
  let t;
  try {
    t = await api(base + "/timeline");
  } catch (e) {
    return say(e.message, true);
  }
  const box = $("timeline");
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  const arrow = { device: { in: "device → agent", out: "agent → device" }, broker: { in: "broker → agent", out: "agent → broker" } };
  box.replaceChildren(...t.entries.slice(-300).map((e) => el("div", { class: `${e.edge} ${e.direction}`, "data-edge": e.edge },
    el("span", { class: "time" }, new Date(e.at_ms).toLocaleTimeString() + "." + String(e.at_ms % 1000).padStart(3, "0") + " "),
    `${e.edge === "agent" ? "agent log" : arrow[e.edge][e.direction]}  ${e.what === "log" ? "" : e.what + "  "}${e.detail}`)));
  if (atEnd) box.scrollTop = box.scrollHeight;
}

function showLogs() {
  const level = $("log-level").value;
  const needle = $("log-search").value.toLowerCase();
  const shown = lines.filter((l) => (!level || l.level === level) && (!needle || l.text.toLowerCase().includes(needle)));
  const logs = $("logs");
  const atEnd = logs.scrollTop + logs.clientHeight >= logs.scrollHeight - 4;
  logs.replaceChildren(...shown.map((l) => el("div", { class: l.level }, el("span", { class: "time" }, new Date(l.at_ms).toLocaleTimeString() + " "), l.text)));
  $("log-count").textContent = `${shown.length} of ${lines.length} lines`;
  if (atEnd) logs.scrollTop = logs.scrollHeight;
}

let pending = false;
function addLog(line) {
  lines.push(line);
  if (lines.length > MAX_LINES) lines.splice(0, lines.length - MAX_LINES);
  // One redraw per frame, however many lines arrive.
  if (!pending) {
    pending = true;
    requestAnimationFrame(() => { pending = false; showLogs(); });
  }
}

async function refreshDeploys() {
  let d;
  try {
    d = await api(base + "/deploys");
  } catch (e) {
    return say(e.message, true);
  }
  const row = (module, at, by, via, canRollBack) => {
    const running = module === d.running;
    const button = el("button", { disabled: !canRollBack, onclick: () => rollback(module) }, running ? "running" : "roll back");
    return el("tr", { "data-module": module, "data-via": via }, el("td", {}, el("code", { title: module }, module.slice(0, 16))), el("td", {}, at ? when(at) : ""), el("td", {}, by), el("td", {}, via), el("td", {}, button));
  };
  const rows = d.history.map((r) => row(r.module, r.at, r.by, r.via, r.can_roll_back));
  if (d.manifest) rows.push(row(d.manifest.module, null, "", "the manifest's module", d.manifest.can_roll_back));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colSpan: 5, class: "muted" }, "Running the manifest's module; no deploys through the API yet.")));
  $("deploys").tBodies[0].replaceChildren(...rows);
}

async function rollback(module) {
  say(`Rolling back to ${module.slice(0, 12)}...`);
  try {
    await api(base + "/rollback", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ module }) });
    say(`Rolled back to ${module.slice(0, 12)}`);
  } catch (e) {
    say(`Rollback refused: ${e.message}`, true);
  }
  refreshDeploys();
  refreshAgent();
}

async function deploy(event) {
  event.preventDefault();
  const file = $("deploy-file").files[0];
  if (!file) return say("Choose a .wasm file first", true);
  say(`Deploying ${file.name}...`);
  try {
    const result = await api(base + "/deploy", { method: "POST", body: await file.arrayBuffer() });
    say(`Deployed ${result.module.slice(0, 12)}`);
  } catch (e) {
    say(`Deploy refused: ${e.message}`, true);
  }
  refreshDeploys();
  refreshAgent();
}

async function historyLoop() {
  await refreshHistory();
  setTimeout(historyLoop, interval);
}

Tether.session().then(() => {
  for (const action of ["stop", "start", "restart"]) {
    $(action).onclick = () => api(`${base}/${action}`, { method: "POST" }).then(() => say(`${action}: ${id}`), (e) => say(e.message, true)).then(refreshAgent);
  }
  $("log-level").onchange = showLogs;
  $("log-search").oninput = showLogs;
  $("deploy").onsubmit = deploy;
  refreshAgent();
  refreshDeploys();
  historyLoop();
  refreshTimeline();
  setInterval(refreshAgent, 2000);
  setInterval(refreshTimeline, 2000);
  Tether.follow(base + "/logs", addLog);
}, (e) => say(e.message, true));
