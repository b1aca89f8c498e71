"""Preview URLs: HTTP and WebSocket traffic from a browser to a TCP port inside a workspace.

``urls`` (where a request is going: pure), ``headers`` (what is forwarded: pure), ``tokens``
(signed share links and preview cookies: pure), ``service`` (share levels, the port list and
the connection cap), ``proxy`` (the bytes: h11 and the websockets sans-I/O protocol over the
agent's ``connect``), ``dispatch`` (the ASGI front door that picks preview requests).
See docs/preview.md.
"""
