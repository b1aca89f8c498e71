"""Where the host may connect on a user's behalf (issue 11, finding 7: blind SSRF).

Clones, mirror pushes and forge API calls run on the host, which can reach its own loopback,
the private networks it sits on and the cloud metadata address, none of which a workspace
can. A user names those destinations (a repository URL, a forge's base URL), so Den connects
only to public addresses unless the operator allows more (``DEN_OUTBOUND_ALLOW``: networks
in CIDR notation, or host names whose every address is allowed).

The check is on the resolved addresses, and the connection then goes to exactly those
addresses, so a name that resolves differently a moment later (DNS rebinding) gains nothing:

- forge API calls (httpx) go through :class:`GuardedBackend`, which resolves, checks and
  connects to the checked address (TLS still verifies the name);
- git gets the checked addresses pinned (:func:`git_pin`): ``http.curloptResolve`` for
  http(s), ``HostName`` for ssh (with ``HostKeyAlias`` so the known host stays the name),
  and for ``git://`` the URL itself with the address. Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import httpcore
import httpx

from server.errors import DenError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
MAX_RESPONSE_BYTES = 4 * 1024 * 1024  # a forge's JSON answer; more is refused


class DestinationRefused(DenError):
    """A user-named destination that resolves to an address Den does not connect to."""

    status_code = 422
    code = "destination_refused"


def parse_entries(entries: Iterable[str]) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """``DEN_OUTBOUND_ALLOW``'s entries as networks and host names; ValueError if malformed."""
    nets: list[IPNetwork] = []
    hosts: set[str] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            nets.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        name = entry.lower().rstrip(".")
        if not name or any(c in name for c in "/:@ *[]") or name.startswith("-"):
            raise ValueError(f"{raw!r} is neither a network (CIDR) nor a host name")
        hosts.add(name)
    return tuple(nets), frozenset(hosts)


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast (not private, loopback, link-local, CGNAT, ULA, ...)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class OutboundPolicy:
    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, entries: Iterable[str]) -> OutboundPolicy:
        nets, hosts = parse_entries(entries)
        return cls(nets, hosts)

    def allows(self, host: str, address: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        if any((mapped or address) in net for net in self.networks):
            return True
        return is_public(address)

    def resolve(self, host: str, port: int) -> list[str]:
        """``host``'s addresses, every one allowed, else DestinationRefused (blocking)."""
        name = host.strip("[]")
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%")[0])
                                           for i in infos))
        except (OSError, UnicodeError, ValueError) as exc:
            log.warning("outbound: %s does not resolve: %s", name, exc)
            addresses = []
        refused = [str(a) for a in addresses if not self.allows(name, a)]
        if not addresses or refused:
            if refused:
                log.warning("outbound: refused %s:%s, which resolves to %s", name, port,
                            ", ".join(refused))
            raise DestinationRefused(
                f"Den does not connect to {name}: it does not resolve to a public address "
                "(the operator can allow private destinations with DEN_OUTBOUND_ALLOW)")
        return [str(a) for a in addresses]


PUBLIC_ONLY = OutboundPolicy()  # the default: public addresses only


# --- git ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GitPin:
    """How to make git connect to the checked addresses only: ``config`` as ``-c`` pairs,
    ``ssh_options`` for GIT_SSH_COMMAND, and the URL to hand git."""

    url: str
    config: dict[str, str] = field(default_factory=dict)
    ssh_options: str = ""


def _scp_host(url: str) -> str:
    return url.split("@", 1)[-1].split(":", 1)[0]


def git_pin(url: str, kind: str, policy: OutboundPolicy) -> GitPin:
    """Resolve and check ``url``'s host, and say how git must reach it (blocking)."""
    if kind == "file":
        return GitPin(url)
    if "://" not in url:  # scp-like ssh: [user@]host:path
        host, port = _scp_host(url), 22
    else:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS.get(kind, 443)
    addresses = policy.resolve(host, port)
    if kind in ("http", "https"):
        pinned = ",".join(f"[{a}]" if ":" in a else a for a in addresses)
        return GitPin(url, {"http.curloptResolve": f"{host}:{port}:{pinned}",
                            "http.followRedirects": "false"})
    if kind == "ssh":
        alias = host if port == 22 else f"[{host}]:{port}"
        return GitPin(url, ssh_options=f"-o HostName={addresses[0]} -o HostKeyAlias={alias}")
    if kind == "git":
        parts = urlsplit(url)
        literal = f"[{addresses[0]}]" if ":" in addresses[0] else addresses[0]
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        return GitPin(urlunsplit(parts._replace(netloc=netloc)))
    raise DestinationRefused(f"Den does not connect over {kind}")


# --- httpx ----------------------------------------------------------------------------------


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend that connects only to addresses the policy allows."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await anyio.to_thread.run_sync(self.policy.resolve, host, port)
        return await self._inner.connect_tcp(addresses[0], port, timeout=timeout,
                                             local_address=local_address,
                                             socket_options=socket_options)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("Den does not connect to Unix sockets for a user")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over :class:`GuardedBackend`: no proxies from the environment, no
    redirects (httpx's client decides those), answers of at most ``MAX_RESPONSE_BYTES``.

    httpx's own transport takes no network backend, hence this small adapter onto httpcore's
    public pool."""

    def __init__(self, policy: OutboundPolicy) -> None:
        self._pool = httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(),
                                                  network_backend=GuardedBackend(policy))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        req = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream,
            extensions=request.extensions)
        try:
            resp = await self._pool.handle_async_request(req)
            body = bytearray()
            try:
                async for chunk in resp.aiter_stream():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        raise httpx.DecodingError("the answer is too large", request=request)
            finally:
                await resp.aclose()
        except httpcore.TimeoutException as exc:
            raise httpx.TimeoutException(str(exc), request=request) from exc
        except httpcore.ConnectError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except httpcore.NetworkError as exc:
            raise httpx.NetworkError(str(exc), request=request) from exc
        except httpcore.ProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        return httpx.Response(status_code=resp.status, headers=resp.headers,
                              content=bytes(body), extensions=resp.extensions)

    async def aclose(self) -> None:
        await self._pool.aclose()
