"""Pure pieces of the SSH gateway: which workspace a user name means, which forwarding
destinations are allowed, the environment and the commands run inside the workspace."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from server.config import Settings

ALIAS_PREFIX = "den-"  # `den ssh-config` names hosts den-<workspace>; the bare name works too
# Variables a client may send (OpenSSH's default SendEnv is LANG LC_*).
_CLIENT_ENV = re.compile(r"^(LANG|LANGUAGE|LC_[A-Z_]+|COLORTERM|TZ)$")
_MAX_ENV_VALUE = 1024
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                          "ip6-loopback"})

# The relay behind one forwarded connection (ssh -L): connect inside the workspace and copy
# bytes both ways. Client EOF half-closes the socket; the server's EOF ends the relay at once
# (a relay waiting for the client's EOF as well would hold back the end of the stream).
RELAY_SCRIPT = r"""
import os, socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=10)
except OSError as e:
    sys.stderr.write("connect to %s port %d failed: %s\n" % (host, port, e))
    sys.exit(1)
s.settimeout(None)
def up():
    try:
        while True:
            b = os.read(0, 65536)
            if not b:
                break
            s.sendall(b)
    except OSError:
        pass
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=up, daemon=True).start()
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        v = memoryview(b)
        while v:
            v = v[os.write(1, v):]
except OSError:
    pass
os._exit(0)
"""

SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/lib/sftp-server",
                "/usr/libexec/openssh/sftp-server", "/usr/libexec/sftp-server")


def workspace_refs(username: str) -> list[str]:
    """The workspace references an SSH user name may mean, in order: the name (or id) as
    given, then without the ``den-`` prefix of `den ssh-config`'s host aliases."""
    refs = [username]
    if username.startswith(ALIAS_PREFIX) and len(username) > len(ALIAS_PREFIX):
        refs.append(username[len(ALIAS_PREFIX):])
    return refs


def forward_allowed(dest_host: str, dest_port: int, *, workspace_name: str) -> bool:
    """Local forwarding reaches only the workspace itself: a loopback address, ``localhost``
    or the workspace's own host name, on a valid port."""
    if not 0 < dest_port < 65536:
        return False
    host = dest_host.strip("[]").lower()
    if host in _LOCAL_NAMES or host == workspace_name.lower():
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def relay_argv(dest_host: str, dest_port: int) -> list[str]:
    host = "127.0.0.1" if dest_host.lower() == "localhost" else dest_host.strip("[]")
    return ["python3", "-I", "-S", "-c", RELAY_SCRIPT, host, str(dest_port)]


def sftp_argv(start_dir: str) -> list[str]:
    """OpenSSH's sftp-server, wherever the image has it, starting in ``start_dir``."""
    script = (
        f"for p in {' '.join(SFTP_SERVERS)}; do "
        '[ -x "$p" ] && exec "$p" -d "$1"; done; '
        'echo "den: this workspace image has no sftp-server (install openssh-sftp-server)" >&2;'
        " exit 127"
    )
    return ["/bin/sh", "-c", script, "den-sftp", start_dir]


def session_env(client_env: Mapping[str, str], *, term: str | None,
                client: tuple[str, int], server: tuple[str, int]) -> dict[str, str]:
    """The environment of a session: the client's locale variables, TERM of its terminal,
    and SSH_CONNECTION / SSH_CLIENT as sshd sets them."""
    env = {k: v for k, v in client_env.items()
           if _CLIENT_ENV.match(k) and len(v) <= _MAX_ENV_VALUE and "\x00" not in v}
    if term:
        env["TERM"] = term
    env["SSH_CONNECTION"] = f"{client[0]} {client[1]} {server[0]} {server[1]}"
    env["SSH_CLIENT"] = f"{client[0]} {client[1]} {server[1]}"
    return env


def ssh_endpoint(settings: Settings, workspace_name: str) -> dict[str, str | int] | None:
    """The ``ssh`` field of a workspace in the API: where and as whom to connect; None when
    the gateway is off. A wildcard listen address is left for the client to replace with
    the host it reached the API by."""
    if settings.ssh_port <= 0:
        return None
    host = settings.public_host or settings.host
    port = settings.ssh_port
    where = f"-p {port} " if port != 22 else ""
    return {"host": host, "port": port, "user": workspace_name,
            "command": f"ssh {where}{workspace_name}@{host}"}
