// Den dashboard: live workspace state (polling a small JSON endpoint), announced to screen
// readers through an aria-live region, and the copy button of a new token.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var table = document.querySelector("[data-poll]");
  var one = document.querySelector("[data-poll-one]");
  var POLL_MS = 2000, BUSY_POLL_MS = 700;

  function announce(text) { if (live) live.textContent = text; }

  function showActions(root, state) {
    root.querySelectorAll("[data-when]").forEach(function (el) {
      el.hidden = el.getAttribute("data-when").split(" ").indexOf(state) < 0;
    });
  }

  function setBadge(root, ws) {
    var badge = root.querySelector("[data-state]");
    if (!badge || badge.textContent === ws.state) return false;
    badge.textContent = ws.state;
    badge.className = "state state-" + ws.state;
    badge.title = ws.state_reason || "";
    return true;
  }

  function fetchJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        if (r.status === 401) { window.location.assign("/login?next=" + encodeURIComponent(location.pathname)); }
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      });
  }

  function schedule(fn, busy) {
    setTimeout(function () {
      if (document.hidden) { document.addEventListener("visibilitychange", fn, { once: true }); }
      else fn();
    }, busy ? BUSY_POLL_MS : POLL_MS);
  }

  function pollTable() {
    fetchJSON(table.getAttribute("data-poll")).then(function (data) {
      var seen = {}, busy = false, typing = document.activeElement &&
        /^(INPUT|SELECT|TEXTAREA)$/.test(document.activeElement.tagName);
      data.workspaces.forEach(function (ws) {
        seen[ws.id] = true;
        busy = busy || ws.busy;
        var row = table.querySelector('tr[data-ws-id="' + ws.id + '"]');
        if (!row) { if (!typing) window.location.reload(); return; }
        if (setBadge(row, ws)) announce(ws.name + " is now " + ws.state + ".");
        showActions(row, ws.state);
        if (ws.state !== "creating") {  // "Creating hello: cloning ..." is over
          document.querySelectorAll('[data-while-creating="' + ws.id + '"]').forEach(function (el) {
            el.remove();
          });
        }
        var act = row.querySelector("[data-activity]");
        if (act) act.textContent = ws.last_activity;
      });
      table.querySelectorAll("tr[data-ws-id]").forEach(function (row) {
        if (!seen[row.getAttribute("data-ws-id")] && !row.classList.contains("gone")) {
          row.classList.add("gone");
          setBadge(row, { state: "deleted" });
          showActions(row, "deleted");
          announce(row.getAttribute("data-ws-name") + " was deleted.");
        }
      });
      schedule(pollTable, busy);
    }).catch(function () { schedule(pollTable, false); });
  }

  function cell(tr, text) {
    var td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }

  function pollOne() {
    fetchJSON(one.getAttribute("data-poll-one")).then(function (ws) {
      if (setBadge(one, ws)) announce(ws.name + " is now " + ws.state + ".");
      showActions(one, ws.state);
      var reason = document.querySelector("[data-reason]");
      if (reason) { reason.textContent = ws.state_reason; reason.hidden = !ws.state_reason; }
      var act = document.querySelector("[data-activity]");
      if (act) act.textContent = ws.last_activity;
      var body = document.querySelector("[data-events]");
      if (body) {
        var rows = document.createDocumentFragment();
        ws.events.forEach(function (e) {
          var tr = document.createElement("tr");
          cell(tr, e.at.replace("T", " ").replace(/\+00:00$/, ""));
          cell(tr, e.kind);
          cell(tr, e.to_state ? (e.from_state || "") + " → " + e.to_state : "");
          cell(tr, e.actor);
          cell(tr, e.message);
          rows.appendChild(tr);
        });
        body.replaceChildren(rows);
      }
      schedule(pollOne, ws.busy);
    }).catch(function () { schedule(pollOne, false); });
  }

  // The workspace page's ports table and usage chart, refreshed without a reload. The ports
  // table is left alone while the person is choosing a share level in it.
  var liveUrl = one && one.getAttribute("data-live");
  var portsBox = document.querySelector("[data-ports]");
  var usageBox = document.querySelector("[data-usage]");
  var SAMPLES = 60, LIVE_MS = 2000;
  var cpuPts = [], memPts = [], last = null, portsDirty = false, portsHtml = null;
  if (portsBox) portsBox.addEventListener("change", function () { portsDirty = true; });

  function draw(svg, points) {
    var line = svg.querySelector("polyline"), step = 120 / (SAMPLES - 1), off = SAMPLES - points.length;
    line.setAttribute("points", points.map(function (v, i) {
      return ((off + i) * step).toFixed(1) + "," + (32 - Math.min(100, v) * 0.31).toFixed(1);
    }).join(" "));
  }

  function mib(n) { return Math.round(n / 1048576) + " MiB"; }

  function showUsage(u, running) {
    var idle = document.querySelector("[data-usage-idle]");
    if (idle) idle.hidden = running;
    if (!usageBox) return;
    var cpuText = usageBox.querySelector("[data-usage-cpu]"), memText = usageBox.querySelector("[data-usage-mem]");
    if (u.cpu_ns === null) { last = null; cpuText.textContent = "-"; memText.textContent = "-"; return; }
    if (last && u.at > last.at && u.cpu_ns >= last.cpu_ns) {
      var pct = (u.cpu_ns - last.cpu_ns) / ((u.at - last.at) * 1e9) / u.cpus * 100;
      cpuPts.push(pct); if (cpuPts.length > SAMPLES) cpuPts.shift();
      cpuText.textContent = Math.round(pct) + "%";
      draw(usageBox.querySelector("[data-chart-cpu]"), cpuPts);
    }
    last = u;
    if (u.memory_bytes !== null) {
      var mpct = u.memory_bytes / u.memory_limit_bytes * 100;
      memPts.push(mpct); if (memPts.length > SAMPLES) memPts.shift();
      memText.textContent = mib(u.memory_bytes) + " (" + Math.round(mpct) + "%)";
      draw(usageBox.querySelector("[data-chart-mem]"), memPts);
    }
  }

  function pollLive() {
    fetchJSON(liveUrl).then(function (data) {
      if (portsBox && !portsDirty && !portsBox.contains(document.activeElement) &&
          data.ports_html !== portsHtml) {
        portsBox.innerHTML = portsHtml = data.ports_html;
      }
      showUsage(data.usage, data.state === "running");
      schedule(pollLive, false);
    }).catch(function () { schedule(pollLive, false); });
  }

  if (table) schedule(pollTable, false);
  if (one) schedule(pollOne, true);
  if (liveUrl) pollLive();

  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = document.querySelector(button.getAttribute("data-copy"));
      input.select();
      var done = function () { button.textContent = "Copied"; };
      if (navigator.clipboard) navigator.clipboard.writeText(input.value).then(done, function () {
        document.execCommand("copy"); done();
      });
      else { document.execCommand("copy"); done(); }
    });
  });
})();
