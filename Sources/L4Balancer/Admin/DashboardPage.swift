/// `GET /`: the dashboard, one self-contained page (no CDN, nothing fetched but this admin
/// API). It polls `/stats` once a second and redraws listeners, clusters and endpoints
/// (health, drain, active connections, rates from the deltas, bytes), the filter and the
/// workers; its buttons drain and undrain an endpoint and reload the config through the
/// same endpoints the CLI uses. The page holds no data of its own: with `admin.token` set,
/// it asks for the token (or takes it from `/#token=…`: a fragment never reaches a server
/// or its logs), keeps it in the tab's sessionStorage and sends it as the bearer header.
enum DashboardPage {
    static let html = #"""
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>l4lb</title>
<style>
  :root { --fg: #1d2330; --muted: #687185; --line: #e3e6ec; --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --info: #0969da; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: #f6f7f9; }
  header { display: flex; align-items: center; gap: 16px; padding: 10px 20px; background: #1d2330; color: #fff; }
  header h1 { font-size: 18px; margin: 0; }
  header .meta { color: #c4c9d4; font-size: 13px; }
  header .spacer { flex: 1; }
  main { padding: 16px 20px; max-width: 1400px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 6px; margin-bottom: 16px; }
  section h2 { font-size: 15px; margin: 0; padding: 10px 14px; border-bottom: 1px solid var(--line); }
  section h2 small { color: var(--muted); font-weight: normal; margin-left: 8px; }
  table { width: 100%; border-collapse: collapse; font-variant-numeric: tabular-nums; }
  th, td { text-align: right; padding: 6px 14px; border-bottom: 1px solid var(--line); white-space: nowrap; }
  th { color: var(--muted); font-weight: 600; font-size: 12px; }
  th:first-child, td:first-child, td.text, th.text { text-align: left; }
  tr:last-child td { border-bottom: none; }
  .badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; color: #fff; }
  .healthy { background: var(--ok); } .unhealthy { background: var(--bad); } .ejected { background: var(--warn); }
  .draining { background: var(--info); } .removed { background: var(--muted); }
  button { font: inherit; padding: 3px 10px; border: 1px solid #b9bfcc; border-radius: 5px; background: #fff; cursor: pointer; }
  button:hover { background: #eef1f5; }
  header button { background: #2f3747; color: #fff; border-color: #4a5366; }
  #status { font-size: 13px; }
  #status.error { color: #ffb3b8; }
  #message-box { display: none; }
  #message-box.show { display: block; }
  #message { padding: 8px 14px; }
</style>
</head>
<body>
<header>
  <h1>l4lb</h1>
  <span class="meta" id="generation"></span>
  <span class="meta" id="reloads"></span>
  <span class="spacer"></span>
  <span id="status">connecting…</span>
  <button id="reload" type="button">Reload config</button>
</header>
<main>
  <section id="message-box"><div id="message"></div></section>
  <section><h2>Listeners</h2><table id="listeners"></table></section>
  <div id="clusters"></div>
  <section><h2>Filter <small id="filter-mode"></small></h2><table id="filter"></table></section>
  <section><h2>Workers</h2><table id="workers"></table></section>
</main>
<script>
"use strict";
let previous = null, previousAt = 0;

// The admin token: from /#token=… (then dropped from the address bar), else this tab's.
function takeTokenFromAddress() {
  const match = location.hash.match(/^#token=(.*)$/);
  if (match) {
    sessionStorage.setItem("l4lbToken", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname);
  }
}
takeTokenFromAddress();
window.addEventListener("hashchange", () => { takeTokenFromAddress(); refresh(); });
function api(path, options = {}) {
  const token = sessionStorage.getItem("l4lbToken");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  return fetch(path, { ...options, headers, cache: "no-store" });
}
function askForToken() {
  const box = document.getElementById("message");
  document.getElementById("message-box").className = "show";
  box.style.color = "";
  box.innerHTML = 'The admin API needs its token (admin.token): <input id="token" type="password" size="32"> <button type="button" id="save-token">Open</button>';
}

function esc(value) {
  return String(value ?? "-").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function num(n) { return n == null ? "-" : Number(n).toLocaleString("en-US"); }
function bytes(n) {
  if (n == null) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}
function rate(now, before, seconds) {
  if (before == null || seconds <= 0) return "-";
  return num(Math.max(0, Math.round((now - before) / seconds)));
}
function table(element, header, rows) {
  element.innerHTML = "<tr>" + header.map(h => `<th class="${h.startsWith("~") ? "text" : ""}">${esc(h.replace("~", ""))}</th>`).join("") + "</tr>" + rows.join("");
}
function endpointState(e) {
  const states = [];
  if (e.removed) states.push("removed");
  if (e.healthy === false) states.push("unhealthy");
  if (e.ejected) states.push("ejected");
  if (e.draining) states.push("draining");
  if (!states.length) states.push("healthy");
  return states.map(s => `<span class="badge ${s}">${s}</span>`).join(" ");
}
function show(message, isError) {
  const box = document.getElementById("message");
  box.textContent = message;
  document.getElementById("message-box").className = "show";
  box.style.color = isError ? "var(--bad)" : "var(--ok)";
}

// A tcp listener's or endpoint's kernel-forwarded flows (relay: kernel): active / total,
// and payload bytes each way; dashes where the kernel carries none.
function kernelCells(k) {
  if (!k) return "<td class=\"kernel-flows\">-</td><td class=\"kernel-bytes\">-</td>";
  return `<td class="kernel-flows">${num(k.flows_active)} / ${num(k.flows)}</td><td class="kernel-bytes">${bytes(k.bytes_in)} / ${bytes(k.bytes_out)}</td>`;
}

function render(stats, seconds) {
  const before = previous;
  document.getElementById("generation").textContent = "generation " + stats.generation;
  const r = stats.reloads || {};
  document.getElementById("reloads").textContent = `reloads: ${r.succeeded ?? 0} ok, ${r.failed ?? 0} failed`;

  const oldListeners = Object.fromEntries((before?.listeners || []).map(l => [l.name, l]));
  table(document.getElementById("listeners"),
    ["~Listener", "~Address", "Active", "Total", "Conn/s", "Refused", "In", "Out", "Bytes in", "Bytes out", "Kernel flows", "Kernel bytes in/out"],
    stats.listeners.map(l => {
      const o = oldListeners[l.name];
      return `<tr data-listener="${esc(l.name)}"><td>${esc(l.name)}</td><td class="text">${esc(l.address ?? "(removed)")}</td>` +
        `<td class="active">${num(l.active)}</td><td>${num(l.total)}</td><td>${rate(l.total, o?.total, seconds)}</td>` +
        `<td>${num(l.refused)}</td><td>${o ? bytes(Math.max(0, (l.bytes_in - o.bytes_in) / seconds)) + "/s" : "-"}</td>` +
        `<td>${o ? bytes(Math.max(0, (l.bytes_out - o.bytes_out) / seconds)) + "/s" : "-"}</td><td>${bytes(l.bytes_in)}</td><td>${bytes(l.bytes_out)}</td>` +
        kernelCells(l.protocol === "tcp" ? l.kernel_relay : undefined) + "</tr>";
    }));

  const oldEndpoints = {};
  for (const c of before?.clusters || []) for (const e of c.endpoints) oldEndpoints[c.name + "/" + e.address] = e;
  const clusters = document.getElementById("clusters");
  clusters.innerHTML = stats.clusters.map(c => {
    const rows = c.endpoints.map(e => {
      const key = c.name + "/" + e.address, o = oldEndpoints[key];
      const action = e.removed ? "" : `<button type="button" class="drain" data-cluster="${esc(c.name)}" data-address="${esc(e.address)}" data-draining="${e.draining ? 1 : 0}">${e.draining ? "Undrain" : "Drain"}</button>`;
      return `<tr data-endpoint="${esc(key)}"><td>${esc(e.address)}</td><td class="text state">${endpointState(e)}</td>` +
        `<td>${num(e.weight)}</td><td class="active">${num(e.active)}</td><td>${num(e.total)}</td><td>${rate(e.total, o?.total, seconds)}</td>` +
        `<td>${num(e.connect_failures)}</td><td>${bytes(e.bytes_in)}</td><td>${bytes(e.bytes_out)}</td>${kernelCells(e.kernel_relay)}<td>${action}</td></tr>`;
    });
    return `<section data-cluster="${esc(c.name)}"><h2>Cluster ${esc(c.name)}<small>${esc(c.balancer ?? "")}</small></h2><table>` +
      "<tr><th class=\"text\">Endpoint</th><th class=\"text\">State</th><th>Weight</th><th>Active</th><th>Total</th><th>Conn/s</th><th>Connect fails</th><th>Bytes in</th><th>Bytes out</th><th>Kernel flows</th><th>Kernel bytes in/out</th><th></th></tr>" +
      rows.join("") + "</table></section>";
  }).join("");

  const f = stats.filter || {};
  document.getElementById("filter-mode").textContent = f.mode ? `${f.mode}, ${f.blocked_entries ?? 0} blocked, ${f.allowed_entries ?? 0} allowed` : "";
  const reasons = (f.counters || []).flatMap(row => Object.entries(row.dropped || {}).map(([reason, n]) => [row, reason, n]));
  table(document.getElementById("filter"), ["~Interface", "~Mode", "~Dropped because", "Count"],
    reasons.map(([row, reason, n]) => `<tr><td>${esc(row.interface)}</td><td class="text">${esc(row.mode)}</td><td class="text">${esc(reason)}</td><td>${num(n)}</td></tr>`));

  table(document.getElementById("workers"), ["~Worker", "CPU", "Generation", "Plans", "Loop iterations", "Small buffers peak", "Large buffers peak"],
    stats.workers.map(w => `<tr><td>${w.index}</td><td>${esc(w.cpu)}</td><td>${w.generation}</td><td>${w.plans}</td>` +
      `<td>${num(w.iterations)}</td><td>${num(w.small_buffers_peak)}</td><td>${num(w.large_buffers_peak)}</td></tr>`));
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await api("/stats");
    if (response.status === 401) {
      status.textContent = "not authorised"; status.className = "error";
      if (!document.getElementById("token")) askForToken();
      return;
    }
    const stats = await response.json();
    const now = performance.now();
    render(stats, previous ? (now - previousAt) / 1000 : 0);
    previous = stats; previousAt = now;
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "";
  } catch (error) {
    status.textContent = "l4lb unreachable: " + error; status.className = "error";
  }
}

document.addEventListener("click", async event => {
  const button = event.target.closest("button");
  if (!button) return;
  if (button.id === "save-token") {
    sessionStorage.setItem("l4lbToken", document.getElementById("token").value);
    document.getElementById("message-box").className = "";
  } else if (button.id === "reload") {
    const response = await api("/reload", { method: "POST" });
    const outcome = await response.json();
    show(response.ok ? `reloaded: generation ${outcome.generation}` + (outcome.changes?.length ? " — " + outcome.changes.join("; ") : ", nothing changed")
                     : "reload failed, the running config is unchanged: " + (outcome.errors || []).join("; "), !response.ok);
  } else if (button.classList.contains("drain")) {
    const draining = button.dataset.draining === "1";
    const path = `/clusters/${encodeURIComponent(button.dataset.cluster)}/endpoints/${encodeURIComponent(button.dataset.address)}/drain`;
    const response = await api(path, { method: draining ? "DELETE" : "POST" });
    const outcome = await response.json();
    show(response.ok ? `${button.dataset.cluster} ${button.dataset.address}: ${draining ? "taking new connections again" : "draining"}` : outcome.error, !response.ok);
  }
  refresh();
});

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""#
}
