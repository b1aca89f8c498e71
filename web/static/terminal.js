// Den web terminal: xterm.js (from npm, served by Den) on WS /api/v1/workspaces/{id}/terminal.
// The shell lives in a tmux session inside the workspace: when the connection drops, this
// page reconnects and tmux repaints the screen; the shell itself never noticed.
(function () {
  "use strict";
  var el = document.getElementById("terminal");
  var statusEl = document.getElementById("term-status");
  var wsId = el.getAttribute("data-ws-id");
  var session = el.getAttribute("data-session");
  var encoder = new TextEncoder();

  var term = new Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
    fontSize: 14,
    lineHeight: 1.15,
    scrollback: 5000,
    theme: { background: "#0f1115" },
  });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  term.focus();
  window.denTerminal = term; // for tests and the browser console

  var sock = null, attempts = 0, ended = false;

  function setStatus(text, state) {
    statusEl.textContent = text;
    el.setAttribute("data-state", state);
  }

  function socketUrl() {
    var proto = location.protocol === "https:" ? "wss:" : "ws:";
    return proto + "//" + location.host + "/api/v1/workspaces/" + encodeURIComponent(wsId) +
      "/terminal?cols=" + term.cols + "&rows=" + term.rows + "&session=" + encodeURIComponent(session);
  }

  // Why the shell ended, in words: the workspace was paused or stopped (Enter wakes it), or
  // the shell itself ended while the workspace runs.
  var ENDED = {
    paused: "the workspace was paused · press Enter to resume it and reconnect",
    pausing: "the workspace was paused · press Enter to resume it and reconnect",
    stopped: "the workspace was stopped · press Enter to start it and reconnect",
    stopping: "the workspace was stopped · press Enter to start it and reconnect",
    running: "the shell ended · press Enter to start a new one",
  };
  function workspaceState() {
    return fetch("/workspaces/" + encodeURIComponent(wsId) + "/state.json",
                 { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; });
  }
  function explainEnd() {
    workspaceState().then(function (ws) {
      if (!ended || !ws) return;
      setStatus(ENDED[ws.state] || ("disconnected: the workspace is " + ws.state +
                                    " · press Enter to reconnect"), "ended");
    }).catch(function () { /* the generic message stays */ });
  }

  function connect() {
    ended = false;
    setStatus(attempts ? "reconnecting…" : "connecting…", "connecting");
    sock = new WebSocket(socketUrl());
    sock.onmessage = function (ev) {
      var msg = JSON.parse(ev.data);
      if (msg.type === "stdout" || msg.type === "stderr") {
        term.write(msg.data);
      } else if (msg.type === "status") {
        if (msg.state === "running") {
          attempts = 0;
          setStatus("connected · shell " + session + " (tmux session den-web-" + session + ")", "connected");
        } else {
          setStatus(msg.message + "…", "waking");
        }
      } else if (msg.type === "exit") {
        ended = true;
        setStatus("the shell ended · press Enter to reconnect", "ended");
        explainEnd();
      } else if (msg.type === "error") {
        ended = true;
        if (msg.error.code === "unauthorized") {
          window.location.assign("/login?next=" + encodeURIComponent(location.pathname));
        }
        setStatus("error: " + msg.error.message + " · press Enter to retry", "error");
      }
    };
    sock.onclose = function () {
      sock = null;
      if (ended) return;
      var retry = function () {
        attempts += 1; // a network blip: try again, backing off up to 10 s
        var delay = Math.min(10000, 500 * Math.pow(2, Math.min(attempts - 1, 5)));
        setStatus("connection lost · reconnecting in " + Math.ceil(delay / 1000) + " s…", "reconnecting");
        setTimeout(connect, delay);
      };
      // The workspace was paused or stopped: say so and wait for Enter, rather than wake it
      // again at once by reconnecting.
      workspaceState().then(function (ws) {
        if (ws && ws.state !== "running" && ENDED[ws.state]) {
          ended = true;
          setStatus(ENDED[ws.state], "ended");
        } else {
          retry();
        }
      }, retry);
    };
  }

  term.onData(function (data) {
    if (sock && sock.readyState === WebSocket.OPEN) {
      sock.send(encoder.encode(data)); // binary frame: raw input
    } else if (ended && data === "\r") {
      attempts = 0;
      connect();
    }
  });
  term.onResize(function (size) {
    if (sock && sock.readyState === WebSocket.OPEN) {
      sock.send(JSON.stringify({ type: "resize", cols: size.cols, rows: size.rows }));
    }
  });

  // Copy: Ctrl+Shift+C, or Ctrl+C while text is selected (otherwise Ctrl+C interrupts).
  // Paste: Ctrl+V / Ctrl+Shift+V go to the browser, whose paste event xterm.js forwards.
  term.attachCustomKeyEventHandler(function (e) {
    if (e.type !== "keydown" || !e.ctrlKey) return true;
    var key = e.key.toLowerCase();
    if (key === "c" && (e.shiftKey || term.hasSelection())) {
      var text = term.getSelection();
      if (text && navigator.clipboard) navigator.clipboard.writeText(text);
      term.clearSelection();
      e.preventDefault();
      return false;
    }
    if (key === "v") return false;
    return true;
  });

  var refit = function () { try { fit.fit(); } catch (err) { /* hidden */ } };
  window.addEventListener("resize", refit);
  if (window.ResizeObserver) new ResizeObserver(refit).observe(el);
  connect();
})();
