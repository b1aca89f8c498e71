"""A tiny web app for the preview tests, run inside a workspace with the standard library
only (``python3 app.py PORT``)."""

# ``/``: a page that shows document.cookie, a WebSocket echo and a server-sent event (and
# sets a cookie of its own); ``/events``: a server-sent event stream that sends one event,
# waits for /tmp/go to exist, then sends two more; ``/ws``: a WebSocket echo (unfragmented
# frames).
APP = r"""
import base64, hashlib, http.server, os, struct, sys, time

PAGE = '''<!doctype html><title>preview app</title>
<pre id=cookie></pre><pre id=ws></pre><pre id=sse></pre>
<script>
document.getElementById("cookie").textContent = "cookie:" + document.cookie;
const scheme = location.protocol == "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + "/ws");
ws.onopen = () => ws.send("ping from the page");
ws.onmessage = (e) => { document.getElementById("ws").textContent = "echo:" + e.data; };
const es = new EventSource("/events");
es.onmessage = (e) => {
  document.getElementById("sse").textContent = "event:" + e.data;
  es.close();
};
</script>
'''


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/":
            body = PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Set-Cookie", "app=1; Path=/")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"data: tick 0\n\n")
            while not os.path.exists("/tmp/go"):
                time.sleep(0.05)
            self.chunk(b"data: tick 1\n\n")
            self.chunk(b"data: tick 2\n\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/ws":
            key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                op, n = head[0] & 0x0F, head[1] & 0x7F
                if n == 126:
                    n = struct.unpack(">H", self.rfile.read(2))[0]
                elif n == 127:
                    n = struct.unpack(">Q", self.rfile.read(8))[0]
                mask = self.rfile.read(4)
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(n)))
                if op == 8:
                    self.wfile.write(b"\x88\x02\x03\xe8")
                    self.wfile.flush()
                    return
                size = bytes([n]) if n < 126 else (
                    b"\x7e" + struct.pack(">H", n) if n < 65536 else b"\x7f" + struct.pack(">Q", n))
                self.wfile.write(bytes([0x80 | op]) + size + data)
                self.wfile.flush()
        else:
            self.send_error(404)

http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
