"""The current user: their API tokens, single sign-on identities and web sessions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from server.api.deps import CurrentUser
from server.api.limits import quotas_out
from server.api.schemas import (
    IdentityList,
    IdentityOut,
    RowId,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenOut,
    UserOut,
    WebSessionList,
    WebSessionOut,
    errors,
)
from server.auth import logins, tokens

router = APIRouter(prefix="/api/v1/users/me", tags=["users"])


@router.get("", response_model=UserOut, responses=errors())
def me(user: CurrentUser, request: Request) -> UserOut:
    """Who you are, and your limits with what you use of each."""
    return UserOut(id=user.id, name=user.name, is_admin=user.is_admin,
                   quotas=quotas_out(request.app.state.workspaces.quotas, user))


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated,
             responses=errors())
def create_token(body: TokenCreate, user: CurrentUser, request: Request) -> TokenCreated:
    with request.app.state.sessions.begin() as s:
        row, secret = tokens.issue_token(s, user, name=body.name,
                                         expires_in_s=body.expires_in_s)
        return TokenCreated(id=row.id, name=row.name, created_at=row.created_at,
                            expires_at=row.expires_at, token=secret)


@router.get("/tokens", response_model=TokenList, responses=errors())
def list_tokens(user: CurrentUser, request: Request) -> TokenList:
    with request.app.state.sessions() as s:
        return TokenList(tokens=[
            TokenOut(id=t.id, name=t.name, created_at=t.created_at, last_used_at=t.last_used_at,
                     expires_at=t.expires_at)
            for t in tokens.list_tokens(s, user)
        ])


@router.delete("/tokens/{token_id}", status_code=204, responses=errors(404))
def revoke_token(token_id: RowId, user: CurrentUser, request: Request) -> Response:
    with request.app.state.sessions.begin() as s:
        tokens.revoke_token(s, user, token_id)
    return Response(status_code=204)


@router.get("/identities", response_model=IdentityList, responses=errors())
def list_identities(user: CurrentUser, request: Request) -> IdentityList:
    """Your single sign-on logins (issuer and subject), linked to this user."""
    with request.app.state.sessions() as s:
        return IdentityList(identities=[
            IdentityOut(id=i.id, issuer=i.issuer, subject=i.subject, email=i.email,
                        created_at=i.created_at, last_login_at=i.last_login_at)
            for i in logins.identities_of(s, user)])


@router.delete("/identities/{identity_id}", status_code=204, responses=errors(404))
def unlink_identity(identity_id: RowId, user: CurrentUser, request: Request) -> Response:
    with request.app.state.sessions.begin() as s:
        logins.unlink_identity(s, user, identity_id)
    return Response(status_code=204)


@router.get("/sessions", response_model=WebSessionList, responses=errors())
def list_sessions(user: CurrentUser, request: Request) -> WebSessionList:
    """Your web sessions (browsers signed in), live ones only."""
    with request.app.state.sessions() as s:
        return WebSessionList(sessions=[
            WebSessionOut(id=w.id, method=w.method, token_id=w.token_id,
                          created_at=w.created_at, expires_at=w.expires_at)
            for w in logins.sessions_of(s, user)])


@router.delete("/sessions/{session_id}", status_code=204, responses=errors(404))
def end_session(session_id: RowId, user: CurrentUser, request: Request) -> Response:
    """Sign a browser out: its cookie stops working at once."""
    with request.app.state.sessions.begin() as s:
        logins.end_session(s, user, session_id)
    return Response(status_code=204)
