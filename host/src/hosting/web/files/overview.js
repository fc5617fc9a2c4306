"use strict";
// The overview: the tenant's agents, filtered and paged by the server (it stays fast at
// thousands of agents), refreshed every two seconds without rebuilding rows.
const { $, api, el, say, bytes, spark } = Tether;
const PAGE = 50;
let offset = 0;
const rows = new Map(); // agent id -> { row, cells, spark }

function deviceText(a) {
  return a.device_connected === null ? "none" : a.device_connected ? "connected" : "disconnected";
}

function act(id, action) {
  api(`/api/agents/${encodeURIComponent(id)}/${action}`, { method: "POST" }).then(() => say(`${action}: ${id}`), (e) => say(e.message, true)).then(refresh);
}

function makeRow(a) {
  const cells = {
    status: el("td", { class: "status" }),
    device: el("td", { class: "device" }),
    spark: el("td"),
    memory: el("td", { class: "num" }),
    restarts: el("td", { class: "num" }),
    error: el("td", { class: "error-text" }),
  };
  const link = el("a", { href: `/agents/${encodeURIComponent(a.id)}` }, a.id);
  const actions = el("td", {}, ...["stop", "start", "restart"].map((action) => el("button", { onclick: () => act(a.id, action) }, action)));
  const row = el("tr", { "data-agent": a.id }, el("td", {}, link), cells.status, cells.device, cells.spark, cells.memory, cells.restarts, cells.error, actions);
  return { row, cells, spark: null };
}

function fill(entry, a) {
  const { row, cells } = entry;
  row.dataset.status = a.status;
  cells.status.textContent = a.status + (a.cause ? ` (${a.cause})` : "") + (a.slow_lane ? ", slow lane" : "");
  cells.status.className = "status " + a.status;
  cells.device.textContent = deviceText(a);
  cells.device.className = "device " + deviceText(a);
  cells.memory.textContent = bytes(a.memory_bytes);
  cells.restarts.textContent = a.restarts;
  cells.error.textContent = a.last_error || "";
  cells.error.title = a.last_error || "";
  const values = a.messages_per_s.length ? a.messages_per_s : [0];
  if (entry.spark) entry.spark.set(values);
  else entry.spark = spark(cells.spark, values);
}

async function refresh() {
  const query = new URLSearchParams({ q: $("filter").value, status: $("status").value, offset, limit: PAGE });
  let list;
  try {
    list = await api("/api/agents?" + query);
  } catch (e) {
    return say("Cannot list agents: " + e.message, true);
  }
  const body = $("agents").tBodies[0];
  const ids = list.agents.map((a) => a.id);
  for (const id of [...rows.keys()]) if (!ids.includes(id)) rows.delete(id);
  const ordered = list.agents.map((a) => {
    const entry = rows.get(a.id) || makeRow(a);
    rows.set(a.id, entry);
    fill(entry, a);
    return entry.row;
  });
  body.replaceChildren(...ordered);
  const last = Math.min(offset + PAGE, list.total);
  $("count").textContent = list.total ? `${offset + 1}–${last} of ${list.total}` : "no agents";
  $("prev").disabled = offset === 0;
  $("next").disabled = last >= list.total;
  // Rebuilt only when the agents shown change, so a choice being made is kept.
  const select = $("deploy-agent");
  if (ids.join() !== [...select.options].map((o) => o.value).join()) select.replaceChildren(...ids.map((id) => new Option(id, id)));
}

async function deploy(event) {
  event.preventDefault();
  const id = $("deploy-agent").value;
  const file = $("deploy-file").files[0];
  if (!file) return say("Choose a .wasm file first", true);
  say(`Deploying ${file.name} to ${id}...`);
  try {
    const result = await api(`/api/agents/${encodeURIComponent(id)}/deploy`, { method: "POST", body: await file.arrayBuffer() });
    say(`Deployed ${result.module.slice(0, 12)} to ${id}`);
  } catch (e) {
    say(`Deploy to ${id} refused: ${e.message}`, true);
  }
  refresh();
}

function showLog(line) {
  const logs = $("logs");
  logs.append(el("div", { class: line.level }, `[${line.agent ?? "host"}] ${line.text}`));
  while (logs.childElementCount > 1000) logs.firstChild.remove();
  logs.scrollTop = logs.scrollHeight;
}

function restart() {
  offset = 0;
  refresh();
}

Tether.session().then(() => {
  $("filter").oninput = restart;
  $("status").onchange = restart;
  $("prev").onclick = () => { offset = Math.max(0, offset - PAGE); refresh(); };
  $("next").onclick = () => { offset += PAGE; refresh(); };
  $("deploy").onsubmit = deploy;
  refresh();
  setInterval(refresh, 2000);
  Tether.follow("/api/logs", showLog);
}, (e) => say(e.message, true));
