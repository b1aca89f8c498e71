"""The current user and their API tokens."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from server.api.deps import CurrentUser
from server.api.schemas import (
    RowId,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
    UserOut,
    errors,
)
from server.auth import tokens

router = APIRouter(prefix="/api/v1/users/me", tags=["users"])


@router.get("", response_model=UserOut, responses=errors())
def me(user: CurrentUser) -> UserOut:
    return UserOut(id=user.id, name=user.name, is_admin=user.is_admin)


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated,
             responses=errors())
def create_token(body: TokenCreate, user: CurrentUser, request: Request) -> TokenCreated:
    with request.app.state.sessions.begin() as s:
        row, secret = tokens.issue_token(s, user, name=body.name)
        return TokenCreated(id=row.id, name=row.name, created_at=row.created_at, token=secret)


@router.get("/tokens", response_model=TokenList, responses=errors())
def list_tokens(user: CurrentUser, request: Request) -> TokenList:
    with request.app.state.sessions() as s:
        return TokenList(tokens=[
            TokenOut(id=t.id, name=t.name, created_at=t.created_at, last_used_at=t.last_used_at)
            for t in tokens.list_tokens(s, user)
        ])


@router.delete("/tokens/{token_id}", status_code=204, responses=errors(404))
def revoke_token(token_id: RowId, user: CurrentUser, request: Request) -> Response:
    with request.app.state.sessions.begin() as s:
        tokens.revoke_token(s, user, token_id)
    return Response(status_code=204)
