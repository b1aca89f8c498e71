"""Exclusive allocation of whole GPUs, written in the same transaction as the state change
that needs it (the ledger, ``Ledger.transition``, calls :meth:`GpuPool.on_transition`).

A workspace holds its GPUs while its container may run: they are taken on the way into
``creating``, ``starting`` and ``resuming`` (:data:`TAKES`) and given back on the way into
``stopped``, ``paused``, ``error`` and ``deleting`` (:data:`RELEASES`). When none is free
the transition is refused (409 ``gpus_unavailable``): the workspace stays stopped or
paused, and the error says who holds the GPU. There is no queue: a caller retries, or an
admin reclaims.

Exclusivity is the database's: ``gpu_allocations`` has the GPU's UUID as its primary key,
so a second holder cannot be written on SQLite (one writer at a time) or PostgreSQL (the
second insert waits for the first transaction, then fails on the key and picks again).

A workspace's container is made with the device nodes of the GPUs it first got (Docker
cannot change a container's devices), so later starts take those same GPUs again: they are
pinned in ``Workspace.engine["gpus"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.config import Settings
from server.db.models import GpuAllocation, Workspace
from server.errors import Conflict, ValidationFailed
from server.gpus.inventory import Gpu, inventory_from_setting, nvml_utilization
from server.workspaces.states import State

log = logging.getLogger(__name__)

# Entering these from a state without GPUs takes them; entering RELEASES gives them back.
# In between (stopping, pausing) a container may still run, so they stay held.
TAKES: frozenset[State] = frozenset({State.CREATING, State.STARTING, State.RESUMING,
                                     State.RUNNING})
RELEASES: frozenset[State] = frozenset({State.STOPPED, State.PAUSED, State.ERROR,
                                        State.DELETING})
_PICK_TRIES = 5


def change(src: State | None, dst: State) -> str | None:
    """"take", "release" or None: what moving from ``src`` (None: a new row) to ``dst``
    does to a workspace's GPUs."""
    if dst in RELEASES:
        return "release"
    if dst in TAKES and (src is None or src in RELEASES):
        return "take"
    return None


def model_matches(gpu: Gpu, model: str | None) -> bool:
    """``gpu_model`` matches a GPU whose model name contains it, ignoring case ("a100")."""
    return model is None or model.casefold() in gpu.model.casefold()


def pick(inventory: Sequence[Gpu], taken: set[str], *, count: int, model: str | None
         ) -> list[Gpu] | None:
    """The first ``count`` free GPUs of ``model`` in inventory order; None if too few."""
    free = [g for g in inventory if g.uuid not in taken and model_matches(g, model)]
    return free[:count] if len(free) >= count else None


def idle_action(gpus: int, *, checkpoint: bool) -> str:
    """What sleep does to a workspace: "pause" (memory kept) or "stop" (disk kept). A GPU's
    memory is not checkpointed unless nvproxy's checkpointing is shown to work here."""
    return "stop" if gpus > 0 and not checkpoint else "pause"


@dataclass(frozen=True)
class Holder:
    gpu: Gpu | None  # None: held, but no longer in the inventory (DEN_GPUS changed)
    uuid: str
    workspace_id: str | None
    workspace_name: str | None
    owner: str | None


class GpuPool:
    """The inventory and its allocations. ``checkpoint``: GPU workspaces may be paused
    (DEN_GPU_CHECKPOINT, nvproxy's checkpointing shown to work on this host)."""

    def __init__(self, gpus: Sequence[Gpu] = (), *, from_driver: bool = False,
                 checkpoint: bool = False) -> None:
        self.gpus = tuple(gpus)
        self.by_uuid = {g.uuid: g for g in self.gpus}
        self.from_driver = from_driver
        self.checkpoint = checkpoint

    @classmethod
    def from_settings(cls, settings: Settings) -> GpuPool:
        """The pool DEN_GPUS gives (I/O: may ask NVML or nvidia-smi)."""
        gpus, from_driver = inventory_from_setting(settings.gpus)
        if gpus:
            log.info("gpus: %d to hand out: %s", len(gpus),
                     ", ".join(f"{g.uuid} ({g.model})" for g in gpus))
        return cls(gpus, from_driver=from_driver, checkpoint=settings.gpu_checkpoint)

    # --- asking -----------------------------------------------------------------------

    def validate(self, count: int, model: str | None, *, max_gpus: int) -> None:
        """Whether this host could ever give ``count`` GPUs of ``model`` (422/409)."""
        if count < 0:
            raise ValidationFailed("resources.gpus must be 0 or more")
        if count == 0:
            if model is not None:
                raise ValidationFailed("resources.gpu_model needs resources.gpus of 1 or more")
            return
        if not self.gpus:
            raise ValidationFailed(
                "this server has no GPUs (no NVIDIA driver found, or DEN_GPUS=none); "
                "create the workspace without resources.gpus", code="no_gpus")
        if count > max_gpus:
            raise Conflict(f"{count} GPU(s) asked, but this server can give a workspace at "
                           f"most {max_gpus}", code="gpus_unavailable")
        matching = [g for g in self.gpus if model_matches(g, model)]
        if not matching:
            models = ", ".join(sorted({g.model for g in self.gpus}))
            raise ValidationFailed(f"no GPU here is a {model!r}; this server has: {models}",
                                   code="no_gpus")
        if count > len(matching):
            raise ValidationFailed(
                f"{count} GPU(s) asked, but this server has only {len(matching)}"
                + (f" {model!r}" if model else ""), code="no_gpus")

    def idle_action(self, ws: Workspace) -> str:
        return idle_action(ws.gpus, checkpoint=self.checkpoint)

    def check_pause(self, ws: Workspace) -> None:
        if self.idle_action(ws) == "stop":
            raise Conflict("a workspace with a GPU cannot be paused on this server (the "
                           "GPU's memory cannot be saved); stop it instead: files are kept",
                           code="pause_unsupported")

    def devices_for(self, ws: Workspace) -> tuple[Gpu, ...]:
        """The GPUs ``ws``'s container is made with (pinned at its first allocation)."""
        return tuple(self.by_uuid[u] for u in (ws.engine or {}).get("gpus", [])
                     if u in self.by_uuid)

    # --- the ledger's hook --------------------------------------------------------------

    def on_transition(self, s: Session, workspace_id: str, src: State | None, dst: State
                      ) -> None:
        """Take or give back ``workspace_id``'s GPUs in ``s``, the transaction that moves it
        from ``src`` (None: a new row) to ``dst``. Raises Conflict when none is free, which
        rolls the state change back with it."""
        what = change(src, dst)
        if what is None:
            return
        if what == "release":
            s.execute(delete(GpuAllocation).where(GpuAllocation.workspace_id == workspace_id))
            return
        ws = s.get(Workspace, workspace_id)
        if ws is None or ws.gpus <= 0:
            return
        for _ in range(_PICK_TRIES):
            try:
                with s.begin_nested():
                    self._take(s, ws)
                return
            except IntegrityError:  # another transaction took one of them first: pick again
                log.info("workspace %s: a GPU was taken meanwhile; picking again", ws.id)
        raise Conflict("the GPUs are in great demand right now; try again",
                       code="gpus_unavailable")

    def _take(self, s: Session, ws: Workspace) -> None:
        s.execute(delete(GpuAllocation).where(GpuAllocation.workspace_id == ws.id))
        rows = s.execute(select(GpuAllocation.gpu_uuid, Workspace.name)
                         .join(Workspace, Workspace.id == GpuAllocation.workspace_id)).all()
        taken = {uuid: name for uuid, name in rows}
        pinned: list[str] = list((ws.engine or {}).get("gpus", []))
        if pinned:
            gone = [u for u in pinned if u not in self.by_uuid]
            if gone:
                raise Conflict(f"this workspace was made with GPU {', '.join(gone)}, which "
                               "this server no longer hands out (DEN_GPUS)",
                               code="gpus_unavailable")
            busy = [f"{u} (held by workspace {taken[u]!r})" for u in pinned if u in taken]
            if busy:
                raise Conflict(f"this workspace's GPU is in use: {', '.join(busy)}; try again "
                               "when it is stopped, or ask an admin to reclaim it",
                               code="gpus_unavailable")
            chosen = pinned
        else:
            got = pick(self.gpus, set(taken), count=ws.gpus, model=ws.gpu_model)
            if got is None:
                free = len([g for g in self.gpus if g.uuid not in taken])
                raise Conflict(
                    f"{ws.gpus} GPU(s){' ' + repr(ws.gpu_model) if ws.gpu_model else ''} "
                    f"asked, but {free} of {len(self.gpus)} are free; try again when one is "
                    "released, or ask an admin", code="gpus_unavailable")
            chosen = [g.uuid for g in got]
            ws.engine = {**(ws.engine or {}), "gpus": chosen}
        s.add_all(GpuAllocation(gpu_uuid=u, workspace_id=ws.id) for u in chosen)
        s.flush()

    # --- reading ----------------------------------------------------------------------

    def holders(self, s: Session) -> list[Holder]:
        """Every GPU of the inventory with its holder, then held GPUs no longer in it."""
        rows = s.execute(select(GpuAllocation, Workspace)
                         .join(Workspace, Workspace.id == GpuAllocation.workspace_id)).all()
        held = {a.gpu_uuid: w for a, w in rows}
        out = [Holder(gpu=g, uuid=g.uuid, workspace_id=held[g.uuid].id if g.uuid in held
                      else None,
                      workspace_name=held[g.uuid].name if g.uuid in held else None,
                      owner=held[g.uuid].owner.name if g.uuid in held else None)
               for g in self.gpus]
        out += [Holder(gpu=None, uuid=u, workspace_id=w.id, workspace_name=w.name,
                       owner=w.owner.name) for u, w in held.items() if u not in self.by_uuid]
        return out

    def held_by(self, s: Session, workspace_id: str) -> list[str]:
        return list(s.scalars(select(GpuAllocation.gpu_uuid)
                              .where(GpuAllocation.workspace_id == workspace_id)))

    def utilization(self, uuids: Sequence[str]) -> dict[str, int]:
        """UUID -> utilization percent from NVML; empty when it cannot be measured (a
        described inventory, no ``nvidia-ml-py``, a driver error)."""
        if not uuids or not self.from_driver:
            return {}
        try:
            import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional
            return nvml_utilization(pynvml, uuids)
        except Exception as exc:
            log.info("gpus: utilization unavailable: %s", exc)
            return {}

    def summary(self, s: Session) -> dict[str, Any]:
        """Free count per model (what any user may see)."""
        taken = set(s.scalars(select(GpuAllocation.gpu_uuid)))
        models: dict[str, dict[str, int]] = {}
        for g in self.gpus:
            m = models.setdefault(g.model, {"total": 0, "free": 0})
            m["total"] += 1
            m["free"] += g.uuid not in taken
        return {"total": len(self.gpus), "free": sum(m["free"] for m in models.values()),
                "models": [{"model": k, **v} for k, v in sorted(models.items())]}
