"""Per-user limits: an admin reads and sets a user's own (docs/api.md, "Limits")."""

from __future__ import annotations

from fastapi import APIRouter, Path, Request

from server.api.deps import AdminUser
from server.api.schemas import LimitsIn, QuotaOut, UserLimitsOut, errors
from server.db.models import User
from server.quotas.service import Quotas

router = APIRouter(prefix="/api/v1/users", tags=["users"])

UserName = Path(max_length=64, description="The user's name")


def quotas_out(quotas: Quotas, user: User) -> dict[str, QuotaOut]:
    return {name: QuotaOut(limit=q.limit, used=q.used, default=q.default)
            for name, q in quotas.report(user).items()}


def _quotas(request: Request) -> Quotas:
    return request.app.state.workspaces.quotas  # type: ignore[no-any-return]


@router.get("/{name}/limits", response_model=UserLimitsOut, responses=errors(403, 404))
def get_limits(admin: AdminUser, request: Request, name: str = UserName) -> UserLimitsOut:
    """A user's limits and what they use of each (admins only)."""
    quotas = _quotas(request)
    user = quotas.user_named(name)
    return UserLimitsOut(user=user.name, quotas=quotas_out(quotas, user))


@router.put("/{name}/limits", response_model=UserLimitsOut, responses=errors(403, 404))
def set_limits(body: LimitsIn, admin: AdminUser, request: Request,
               name: str = UserName) -> UserLimitsOut:
    """Set a user's own limits (admins only): the body replaces what was set before; a limit
    left out is the server's. Lowering one below what the user has refuses new ones and
    takes nothing away."""
    quotas = _quotas(request)
    user = quotas.set_overrides(name, body.model_dump(exclude_none=True))
    return UserLimitsOut(user=user.name, quotas=quotas_out(quotas, user))
