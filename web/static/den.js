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

  if (table) schedule(pollTable, false);
  if (one) schedule(pollOne, true);

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
