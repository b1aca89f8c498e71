"""forwardPorts and portsAttributes into the preview ports table (docs/preview.md): each
forwarded port is listed with its label, at the share level its attributes name (else
private). The row's ``devcontainer`` keeps them (:func:`to_json`), so that a fork of the
workspace, or of its prebuild, lists them too (:func:`from_json`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from server.db.models import PreviewPort
from server.devcontainer.parse import DevContainer, PortAttributes


def rows(config: DevContainer, *, public_allowed: bool) -> dict[int, PortAttributes]:
    """Port -> attributes, for every forwarded port and every port with attributes; a
    ``public`` share reads as ``users`` where the server does not allow public sharing."""
    out = {p: config.ports.get(p, PortAttributes()) for p in config.forward_ports}
    out.update(config.ports)
    if not public_allowed:
        out = {p: PortAttributes(label=a.label, share="users") if a.share == "public" else a
               for p, a in out.items()}
    return out


def to_json(ports: dict[int, PortAttributes]) -> dict[str, dict[str, str]]:
    return {str(p): {"label": a.label, "share": a.share or ""} for p, a in sorted(ports.items())}


def from_json(kept: Any, *, public_allowed: bool) -> dict[int, PortAttributes]:
    """The ports :func:`to_json` kept, under the server's public rule of now (as
    :func:`rows`); anything malformed is left out (the row is Den's own, but old rows have
    no ``ports``)."""
    out: dict[int, PortAttributes] = {}
    if not isinstance(kept, dict):
        return out
    for key, attrs in kept.items():
        if not (isinstance(key, str) and key.isdigit() and 1 <= int(key) <= 65535
                and isinstance(attrs, dict)):
            continue
        label, share = attrs.get("label", ""), attrs.get("share", "")
        if not isinstance(label, str) or share not in ("", "private", "users", "public"):
            continue
        if share == "public" and not public_allowed:
            share = "users"
        out[int(key)] = PortAttributes(label=label[:64], share=share or None)
    return out


def write(s: Session, workspace_id: str, ports: dict[int, PortAttributes]) -> None:
    now = datetime.now(UTC)
    s.execute(delete(PreviewPort).where(PreviewPort.workspace_id == workspace_id,
                                        PreviewPort.port.in_(list(ports))))
    for port, attrs in sorted(ports.items()):
        s.add(PreviewPort(workspace_id=workspace_id, port=port,
                          share=attrs.share or "private", label=attrs.label,
                          updated_by="devcontainer.json", updated_at=now))


def describe(ports: dict[int, PortAttributes]) -> str:
    return ", ".join(f"{p}" + (f" ({a.label})" if a.label else "") + f": {a.share or 'private'}"
                     for p, a in sorted(ports.items()))
