"use strict";
// The hub page: devices, the selected device's twin, methods, C2D and faults, and the
// emulator's events live. Everything devices or the hub supply is shown as text.
const { $, api, el, say } = Tether;
let selected = null;
const MAX_LINES = 500;

function post(path, body, method = "POST") {
  return api(path, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function devicePath(id, rest = "") {
  return `/api/devices/${encodeURIComponent(id)}${rest}`;
}

async function refreshDevices() {
  let list;
  try {
    list = await api("/api/devices");
  } catch (e) {
    return say("Cannot list devices: " + e.message, true);
  }
  const rows = list.map((d) => {
    const state = (d.connectionState || "").toLowerCase();
    return el("tr", { "data-device": d.deviceId, "data-connection": state },
      el("td", {}, d.deviceId),
      el("td", { class: state === "connected" ? "connected" : "disconnected" }, d.connectionState),
      el("td", {}, d.status),
      el("td", {}, d.authentication?.type || ""),
      el("td", { class: "num" }, d.cloudToDeviceMessageCount ?? ""),
      el("td", {}, el("button", { onclick: () => select(d.deviceId) }, d.deviceId === selected ? "selected" : "open")));
  });
  $("devices").tBodies[0].replaceChildren(...rows);
}

async function refreshTwin() {
  if (!selected) return;
  try {
    const twin = await api(devicePath(selected, "/twin"));
    // The metadata (update times per key) is left out: it hides the values.
    $("twin").textContent = JSON.stringify(twin.properties ?? twin, (key, value) => key === "$metadata" ? undefined : value, 2);
  } catch (e) {
    $("twin").textContent = e.message;
  }
}

function select(id) {
  selected = id;
  $("device").hidden = false;
  $("device-id").textContent = id;
  $("method-result").textContent = "";
  refreshTwin();
  refreshDevices();
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not JSON: ${e.message}`);
  }
}

async function run(what, action) {
  try {
    const result = await action();
    say(typeof result === "string" ? result : what + ": done");
    return result;
  } catch (e) {
    say(`${what}: ${e.message}`, true);
  }
}

function line(container, cls, text) {
  container.append(el("div", { class: cls }, text));
  while (container.childElementCount > MAX_LINES) container.firstChild.remove();
  container.scrollTop = container.scrollHeight;
}

function showEvent(event) {
  const time = event.time ? event.time.slice(11, 23) + " " : "";
  if (event.type === "telemetry") {
    if (!$("only-selected").checked || event.deviceId === selected) {
      const props = Object.entries(event.properties || {}).map(([k, v]) => v == null ? k : `${k}=${v}`).join("&");
      line($("telemetry"), "telemetry", `${time}${event.deviceId}: ${event.body ?? "(" + event.bodyBase64 + ")"}${props ? "  [" + props + "]" : ""}`);
    }
  } else if (event.type === "twinChange" && event.deviceId === selected) {
    refreshTwin();
  }
  if (event.type === "connected" || event.type === "disconnected") refreshDevices();
  const { seq, time: _t, deviceId, type, ...rest } = event;
  line($("events"), type === "disconnected" ? "error" : "", `${time}${deviceId} ${type} ${JSON.stringify(rest)}`);
}

Tether.session().then((s) => {
  $("hub-name").textContent = s.hub;
  $("desired-form").onsubmit = (e) => {
    e.preventDefault();
    run("Update desired", async () => { await post(devicePath(selected, "/twin"), parseJson($("desired").value, "The desired properties"), "PATCH"); await refreshTwin(); });
  };
  $("method-form").onsubmit = async (e) => {
    e.preventDefault();
    $("method-result").textContent = "waiting for the device...";
    const result = await run("Direct method", async () => post(devicePath(selected, "/methods"), {
      method: $("method-name").value, payload: parseJson($("method-payload").value || "null", "The payload"), timeout_s: Number($("method-timeout").value),
    }));
    $("method-result").textContent = result ? JSON.stringify(result, null, 2) : $("message").textContent;
  };
  $("c2d-form").onsubmit = (e) => {
    e.preventDefault();
    const properties = Object.fromEntries(new URLSearchParams($("c2d-properties").value));
    run("C2D message", async () => `C2D message ${(await post(devicePath(selected, "/c2d"), { body: $("c2d-body").value, properties })).message_id} queued`);
  };
  $("fault-form").onsubmit = (e) => {
    e.preventDefault();
    run("Fault", async () => { await post("/api/faults", { kind: $("fault-kind").value, device: selected, duration_s: Number($("fault-duration").value) }); return `${$("fault-kind").value} injected for ${selected}`; });
  };
  refreshDevices();
  setInterval(refreshDevices, 3000);
  Tether.follow("/api/events", showEvent);
}, (e) => say(e.message, true));
