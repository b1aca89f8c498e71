"""The current user's SSH public keys (what the SSH gateway authenticates)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Response, status

from server.api.deps import CurrentUser, SSHKeys
from server.api.schemas import (
    RowId,
    SSHKeyChallengeOut,
    SSHKeyIn,
    SSHKeyList,
    SSHKeyOut,
    errors,
)
from server.ssh.proof import NAMESPACE

router = APIRouter(prefix="/api/v1/users/me/ssh-keys", tags=["ssh"])


@router.post("/challenge", response_model=SSHKeyChallengeOut, responses=errors())
def key_challenge(user: CurrentUser, keys: SSHKeys) -> SSHKeyChallengeOut:
    """A challenge to sign with the key to register (proof that you hold it)."""
    text, expires = keys.challenge(user)
    return SSHKeyChallengeOut(
        challenge=text, namespace=NAMESPACE, expires_at=datetime.fromtimestamp(expires, UTC),
        command=f"printf %s '{text}' | ssh-keygen -Y sign -n {NAMESPACE} -f ~/.ssh/id_ed25519")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=SSHKeyOut,
             responses=errors(409, 429))
def add_key(body: SSHKeyIn, user: CurrentUser, keys: SSHKeys) -> SSHKeyOut:
    return SSHKeyOut.of(keys.add(user, body.public_key, name=body.name,
                                 challenge=body.challenge, signature=body.signature))


@router.get("", response_model=SSHKeyList, responses=errors())
def list_keys(user: CurrentUser, keys: SSHKeys) -> SSHKeyList:
    return SSHKeyList(ssh_keys=[SSHKeyOut.of(k) for k in keys.list_for(user)])


@router.delete("/{key_id}", status_code=204, responses=errors(404))
def delete_key(key_id: RowId, user: CurrentUser, keys: SSHKeys) -> Response:
    keys.delete(user, key_id)
    return Response(status_code=204)
