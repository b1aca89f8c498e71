"""forwardPorts and portsAttributes into the preview ports table (docs/preview.md): each
forwarded port is listed with its label, at the share level its attributes name (else
private)."""

from __future__ import annotations

from datetime import UTC, datetime

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
