"""The current user's SSH public keys (what the SSH gateway authenticates)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from server.api.deps import CurrentUser, SSHKeys
from server.api.schemas import RowId, SSHKeyIn, SSHKeyList, SSHKeyOut, errors

router = APIRouter(prefix="/api/v1/users/me/ssh-keys", tags=["ssh"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SSHKeyOut,
             responses=errors(409, 429))
def add_key(body: SSHKeyIn, user: CurrentUser, keys: SSHKeys) -> SSHKeyOut:
    return SSHKeyOut.of(keys.add(user, body.public_key, name=body.name))


@router.get("", response_model=SSHKeyList, responses=errors())
def list_keys(user: CurrentUser, keys: SSHKeys) -> SSHKeyList:
    return SSHKeyList(ssh_keys=[SSHKeyOut.of(k) for k in keys.list_for(user)])


@router.delete("/{key_id}", status_code=204, responses=errors(404))
def delete_key(key_id: RowId, user: CurrentUser, keys: SSHKeys) -> Response:
    keys.delete(user, key_id)
    return Response(status_code=204)
