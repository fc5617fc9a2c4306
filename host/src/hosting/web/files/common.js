"use strict";
// What every console page shares: the API with the session's CSRF token, safe element
// building (text only, never markup from the server), number formats and plots (uPlot).
const Tether = (() => {
  let csrf = null;
  const $ = (id) => document.getElementById(id);

  // A call to the management API as the logged-in session; 401 goes back to the login.
  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}) };
    if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = csrf || "";
    const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
    if (response.status === 401) {
      location.href = "/login";
      throw new Error("not logged in");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  // Who is logged in; fills the header and wires "log out".
  async function session() {
    const s = await api("/api/session");
    csrf = s.csrf;
    $("tenant").textContent = s.who ?? "tenant " + s.tenant;
    $("logout").onclick = async () => {
      await api("/logout", { method: "POST" }).catch(() => {});
      location.href = "/login";
    };
    return s;
  }

  // An element with text content only: whatever an agent wrote stays text.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
    return node;
  }

  function say(text, bad = false) {
    const m = $("message");
    m.textContent = text;
    m.className = bad ? "bad" : "";
  }

  function bytes(n) {
    if (n == null) return "";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n) + " " + units[i];
  }

  function rate(n) {
    return n == null ? "" : n >= 100 ? n.toFixed(0) : n >= 1 ? n.toFixed(1) : n.toFixed(2);
  }

  function when(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleString();
  }

  const colours = ["#0969da", "#1a7f37", "#cf222e", "#9a6700", "#8250df"];

  // A time plot of `series` (labels), filled by `set(columns)`: columns[0] is time (Unix
  // seconds), the others one per series.
  function plot(container, title, series, { width = 420, height = 160, format = rate } = {}) {
    // Narrower on a narrow screen: the plot fits its box, also when the window changes
    // (a phone turned, a window resized).
    const fit = () => Math.max(200, Math.min(width, container.clientWidth - 10 || width));
    const opts = {
      title, width: fit(), height,
      series: [{}, ...series.map((label, i) => ({ label, stroke: colours[i % colours.length], width: 1.5, spanGaps: false, value: (u, v) => v == null ? "-" : format(v) }))],
      axes: [{}, { values: (u, ticks) => ticks.map(format), size: 80 }],
      legend: { live: true },
    };
    const chart = new uPlot(opts, [[], ...series.map(() => [])], container);
    new ResizeObserver(() => {
      if (fit() !== chart.width) chart.setSize({ width: fit(), height });
    }).observe(container);
    return { set: (columns) => chart.setData(columns), chart };
  }

  // A sparkline: a tiny plot without axes or legend.
  function spark(container, values) {
    const data = [values.map((_, i) => i), values];
    const chart = new uPlot({ width: 120, height: 26, class: "spark", cursor: { show: false }, legend: { show: false }, select: { show: false },
      // A little below zero, so that a flat line at 0 is drawn, not cut off.
      scales: { x: { time: false }, y: { range: (u, min, max) => [-0.1 * Math.max(max, 1), Math.max(max, 1)] } },
      axes: [{ show: false }, { show: false }], series: [{}, { stroke: colours[0], fill: "rgba(9,105,218,0.12)", width: 1 }] }, data, container);
    return { set: (v) => chart.setData([v.map((_, i) => i), v]) };
  }

  // Server-sent log lines from `path`, each passed to `show`; reconnects on its own.
  function follow(path, show) {
    const source = new EventSource(path);
    source.onmessage = (event) => show(JSON.parse(event.data));
    return source;
  }

  return { $, api, session, el, say, bytes, rate, when, plot, spark, follow };
})();
