"""Where a preview request goes, and the URLs of a port: pure functions of strings.

Two forms (docs/preview.md): ``<port>--<workspace>--<owner>.<DEN_PREVIEW_DOMAIN>`` (a browser
origin per port) and ``/preview/<workspace>/<port>/`` on Den's own origin.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PATH_PREFIX = "/preview/"
# One DNS label: the port, then the workspace (which may itself contain "--"), then the owner
# (the part after the last "--"). A label is at most 63 characters.
_LABEL_RE = re.compile(r"^([0-9]{1,5})--([a-z0-9](?:[a-z0-9-]*[a-z0-9])?)--([a-z0-9_-]+)$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
MAX_LABEL = 63


@dataclass(frozen=True)
class HostTarget:
    """A preview origin: ``port`` of ``owner``'s workspace ``workspace``."""

    port: int
    workspace: str
    owner: str


@dataclass(frozen=True)
class PathTarget:
    """A path-form request: ``workspace`` (an id, or a name of the viewer's own), ``port``,
    and the path to forward (always starting with "/"), query string apart."""

    workspace: str
    port: int
    path: str

    @property
    def prefix(self) -> str:
        return f"{PATH_PREFIX}{self.workspace}/{self.port}"


def valid_port(text: str) -> int | None:
    """``text`` as a TCP port (1-65535), or None."""
    if _PORT_RE.fullmatch(text) is None:
        return None
    port = int(text)
    return port if 1 <= port <= 65535 else None


def host_name(host_header: str) -> str:
    """The host of a Host header, lowercased, without port or trailing dot."""
    host = host_header.strip().lower()
    if host.startswith("["):  # an IPv6 literal is never a preview origin
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


def is_preview_host(host_header: str, domain: str) -> bool:
    """Whether the request is for a name under the preview domain (valid or not)."""
    if not domain:
        return False
    return host_name(host_header).endswith("." + domain.lower().strip("."))


def parse_host(host_header: str, domain: str) -> HostTarget | None:
    """The target of a preview origin; None for a name under ``domain`` that is not one (a
    bad port included): the caller answers 404 for those."""
    host = host_name(host_header)
    suffix = "." + domain.lower().strip(".")
    if not domain or not host.endswith(suffix):
        return None
    label = host[: -len(suffix)]
    m = _LABEL_RE.fullmatch(label)
    if m is None:
        return None
    port = valid_port(m.group(1))
    if port is None:
        return None
    return HostTarget(port=port, workspace=m.group(2), owner=m.group(3))


def parse_path(path: str) -> PathTarget | None:
    """``/preview/<workspace>/<port>/rest`` as a target; None for anything else (a bad port
    included). ``/preview/<workspace>/<port>`` without the slash is a target with path "" (the
    caller redirects to the slash, so that relative links resolve under the prefix)."""
    if not path.startswith(PATH_PREFIX):
        return None
    parts = path[len(PATH_PREFIX):].split("/", 2)
    if len(parts) < 2 or not parts[0]:
        return None
    port = valid_port(parts[1])
    if port is None or len(parts[0]) > 64:
        return None
    rest = "/" + parts[2] if len(parts) == 3 else ""
    return PathTarget(workspace=parts[0], port=port, path=rest)


def host_label(port: int, workspace: str, owner: str) -> str | None:
    """The DNS label of a port's origin, or None when it cannot be one (too long, or an owner
    name with characters a label cannot carry, or with "--" that would be ambiguous)."""
    if re.fullmatch(r"[a-z0-9_-]+", owner) is None or "--" in owner:
        return None
    label = f"{port}--{workspace}--{owner}"
    return label if len(label) <= MAX_LABEL else None


def host_url(*, scheme: str, domain: str, port: int, workspace: str, owner: str,
             public_port: int | None = None) -> str | None:
    """``scheme://<port>--<workspace>--<owner>.<domain>[:public_port]/``, or None."""
    label = host_label(port, workspace, owner) if domain else None
    if label is None:
        return None
    suffix = f":{public_port}" if public_port else ""
    return f"{scheme}://{label}.{domain.strip('.')}{suffix}/"


def path_url(base_url: str, workspace_id: str, port: int) -> str:
    return f"{base_url.rstrip('/')}{PATH_PREFIX}{workspace_id}/{port}/"


# --- /proc/net/tcp --------------------------------------------------------------------------

_LISTEN = "0A"
_LOOPBACK_OR_ANY = {
    "00000000", "0100007F",  # 0.0.0.0, 127.0.0.1
    "00000000000000000000000000000000",  # ::
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
}


def listening_ports(proc_net_tcp: str, *, limit: int = 1000) -> list[int]:
    """The ports in LISTEN state on an address the agent can reach (loopback or any) from the
    text of /proc/net/tcp and /proc/net/tcp6 (concatenated), sorted, at most ``limit``.
    Lines that do not parse are skipped: the text comes from inside the workspace."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTEN or ":" not in fields[1]:
            continue
        addr, _, port_hex = fields[1].partition(":")
        if not _reachable(addr.upper()):
            continue
        try:
            port = int(port_hex, 16)
        except ValueError:
            continue
        if 1 <= port <= 65535:
            ports.add(port)
        if len(ports) >= limit:
            break
    return sorted(ports)


def _reachable(addr: str) -> bool:
    """An address from /proc/net/tcp{,6} (hex, little-endian words) that is loopback or any."""
    if addr in _LOOPBACK_OR_ANY:
        return True
    if len(addr) == 8:  # 127.0.0.0/8
        return addr.endswith("7F")
    return len(addr) == 32 and addr.startswith("0000000000000000FFFF0000") and addr.endswith("7F")
