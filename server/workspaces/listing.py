"""Pages of the workspace list: keyset pagination in creation order.

With thousands of workspaces (2,000 paused on one host is a goal of issue 13) one answer with
all of them is a megabyte of JSON built row by row; a client that shows a screenful asks for a
page. A page is the next ``limit`` rows after a cursor, ordered by ``(created_at, id)``: the
cursor names the last row of the page before, so a page costs the same wherever it is in the
list (no ``OFFSET`` scan) and rows created or deleted meanwhile shift nothing. The cursor is
opaque to clients (``next`` of the answer before); pure functions here.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, and_, or_

from server.db.models import Workspace
from server.errors import ValidationFailed

MAX_PAGE = 1000


@dataclass(frozen=True)
class Cursor:
    """The last row of a page: where the next one starts."""

    created_at: datetime
    id: str


def encode(cursor: Cursor) -> str:
    raw = f"{cursor.created_at.isoformat()}|{cursor.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(text: str) -> Cursor:
    """The cursor a client sent back; a clear 422 for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        at, _, ws_id = raw.partition("|")
        if not ws_id:
            raise ValueError(raw)
        return Cursor(datetime.fromisoformat(at), ws_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationFailed("after: not a cursor of this list; pass the `next` of the "
                               "page before, or leave it out for the first page") from None


def page_query(q: Select[Workspace], *, limit: int, after: Cursor | None
               ) -> Select[Workspace]:
    """``q`` (workspaces, any filter) limited to the page after ``after``; one row more than
    ``limit`` is asked for, to know whether a next page exists."""
    q = q.order_by(Workspace.created_at, Workspace.id)
    if after is not None:
        q = q.where(or_(Workspace.created_at > after.created_at,
                        and_(Workspace.created_at == after.created_at, Workspace.id > after.id)))
    return q.limit(limit + 1)


def split(rows: list[Workspace], limit: int) -> tuple[list[Workspace], str | None]:
    """The page, and the cursor of the next one (None on the last page)."""
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode(Cursor(last.created_at, last.id))
