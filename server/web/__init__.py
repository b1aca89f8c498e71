"""The browser interface: login (API token or OIDC), the dashboard and the web terminal page.
``server.web.mount.mount(app, settings)`` wires it into the app."""
