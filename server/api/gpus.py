"""GPU routes: the inventory and who holds what (admins), free counts (everyone); reclaim."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from server.api.deps import AdminUser, CurrentUser, Workspaces
from server.api.schemas import errors
from server.errors import Conflict, NotFound
from server.gpus.allocation import Holder, idle_action

router = APIRouter(prefix="/api/v1/gpus", tags=["gpus"])


class GpuModelOut(BaseModel):
    model: str
    total: int
    free: int


class GpuHolderOut(BaseModel):
    workspace_id: str
    workspace: str
    owner: str


class GpuOut(BaseModel):
    uuid: str
    index: int | None = Field(description="The driver's index; null: held, but no longer in "
                              "the inventory (DEN_GPUS changed)")
    model: str | None
    memory_mb: int | None
    device: str | None
    held_by: GpuHolderOut | None
    utilization_percent: int | None = Field(
        description="From NVML; null where it cannot be measured")


class GpuInventoryOut(BaseModel):
    total: int
    free: int
    models: list[GpuModelOut]
    idle_action: str = Field(description='What idling does to a GPU workspace: "stop" (disk '
                             'kept) or "pause" (only with DEN_GPU_CHECKPOINT)')
    gpus: list[GpuOut] | None = Field(description="Each GPU and its holder: admins only "
                                      "(null for others)")


def _gpu_out(h: Holder, utilization: dict[str, int]) -> GpuOut:
    g = h.gpu
    return GpuOut(
        uuid=h.uuid, index=g.index if g else None, model=g.model if g else None,
        memory_mb=g.memory_mb if g else None, device=g.device if g else None,
        held_by=GpuHolderOut(workspace_id=h.workspace_id, workspace=h.workspace_name or "",
                             owner=h.owner or "") if h.workspace_id else None,
        utilization_percent=utilization.get(h.uuid))


@router.get("", response_model=GpuInventoryOut, responses=errors())
def list_gpus(user: CurrentUser, svc: Workspaces) -> GpuInventoryOut:
    pool = svc.gpus
    with svc.sessions() as s:
        summary = pool.summary(s)
        holders = pool.holders(s) if user.is_admin else None
    gpus = None
    if holders is not None:
        utilization = pool.utilization([h.uuid for h in holders if h.gpu is not None])
        gpus = [_gpu_out(h, utilization) for h in holders]
    return GpuInventoryOut(
        total=summary["total"], free=summary["free"],
        models=[GpuModelOut(**m) for m in summary["models"]],
        idle_action=idle_action(1, checkpoint=pool.checkpoint), gpus=gpus)


@router.post("/{uuid}/reclaim", response_model=GpuOut, responses=errors(403, 404, 409))
async def reclaim_gpu(uuid: str, admin: AdminUser, svc: Workspaces) -> GpuOut:
    """Stop the workspace that holds ``uuid`` (its disk is kept), which gives the GPU back."""
    with svc.sessions() as s:
        holder = next((h for h in svc.gpus.holders(s) if h.uuid == uuid), None)
    if holder is None:
        raise NotFound(f"no GPU {uuid!r} on this server")
    if holder.workspace_id is None:
        raise Conflict(f"GPU {uuid} is not held by any workspace", code="gpu_free")
    svc.note(holder.workspace_id, "gpu", f"GPU {uuid} reclaimed by admin {admin.name}",
             actor=admin.name)
    await svc.stop(holder.workspace_id, actor=admin.name)
    with svc.sessions() as s:
        after = next(h for h in svc.gpus.holders(s) if h.uuid == uuid)
    return _gpu_out(after, {})
