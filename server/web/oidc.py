"""OIDC and OAuth login through Authlib's Starlette client: presets, and what a provider
says about the person who logged in (:class:`~server.auth.identities.Profile`).

Presets (one dict, ``PRESETS``): ``oidc`` is any OpenID Connect issuer found by discovery;
``gitlab`` is OpenID Connect with gitlab.com as the default issuer; ``github`` is OAuth 2
plus GitHub's REST API (GitHub has no OpenID Connect for users). Authlib and httpx errors
are translated into :class:`LoginFailed` here, never past this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from server.auth.identities import Admission, Profile
from server.config import Settings
from server.errors import BadRequest

CLIENT = "den"
WELL_KNOWN = "/.well-known/openid-configuration"
GITHUB = "https://github.com"


class LoginFailed(BadRequest):
    code = "login_failed"


@dataclass(frozen=True)
class Preset:
    display: str
    oidc: bool  # OpenID Connect (ID token, discovery) rather than plain OAuth
    default_issuer: str
    default_scopes: str
    endpoints: dict[str, str]  # OAuth endpoints when there is no discovery


PRESETS: dict[str, Preset] = {
    "oidc": Preset("single sign-on", True, "", "openid email profile", {}),
    "gitlab": Preset("GitLab", True, "https://gitlab.com", "openid email profile", {}),
    "github": Preset("GitHub", False, GITHUB, "read:user user:email read:org", {
        "authorize_url": "https://github.com/login/oauth/authorize",
        "access_token_url": "https://github.com/login/oauth/access_token",
        "api_base_url": "https://api.github.com/",
    }),
}


# Issuers that vouch for anyone on the internet: closed registration unless the operator
# opens it (DEN_OIDC_REGISTRATION=open) or lists who may come in.
PUBLIC_ISSUER_HOSTS = frozenset({"github.com", "gitlab.com", "accounts.google.com",
                                 "login.microsoftonline.com", "appleid.apple.com"})


def public_issuer(settings: Settings) -> bool:
    """Whether the configured issuer is a public one (anyone can have an identity there)."""
    issuer = settings.oidc_issuer or preset(settings).default_issuer
    host = (urlsplit(issuer).hostname or "").lower()
    return settings.oidc_provider == "github" or host in PUBLIC_ISSUER_HOSTS


def admission(settings: Settings) -> Admission:
    """Who gets an account at first login (``DEN_OIDC_REGISTRATION`` and the allowlists)."""
    lists = Admission.of(open=False, email_domains=settings.oidc_allowed_email_domains,
                         users=settings.oidc_allowed_users, groups=settings.oidc_allowed_groups)
    mode = settings.oidc_registration
    is_open = mode == "open" or (mode == "auto" and lists.empty and not public_issuer(settings))
    return Admission(is_open, lists.email_domains, lists.users, lists.groups)


def preset(settings: Settings) -> Preset:
    try:
        return PRESETS[settings.oidc_provider]
    except KeyError:
        raise ValueError(f"DEN_OIDC_PROVIDER must be one of {', '.join(PRESETS)}, "
                         f"not {settings.oidc_provider!r}") from None


def enabled(settings: Settings) -> bool:
    """OIDC login is on: a client id and, for generic OIDC, an issuer."""
    return bool(settings.oidc_client_id) and bool(
        settings.oidc_issuer or preset(settings).default_issuer)


def display_name(settings: Settings) -> str:
    return settings.oidc_display_name or preset(settings).display


def discovery_url(issuer: str) -> str:
    issuer = issuer.rstrip("/")
    return issuer if issuer.endswith(WELL_KNOWN) else issuer + WELL_KNOWN


def scopes(settings: Settings) -> str:
    if settings.oidc_scopes:
        return settings.oidc_scopes
    p = preset(settings)
    wants_groups = settings.oidc_admin_groups or settings.oidc_allowed_groups
    extra = " groups" if p.oidc and wants_groups and settings.oidc_provider == "oidc" else ""
    return p.default_scopes + extra


def client_kwargs(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``OAuth.register`` for the configured provider (pure)."""
    p = preset(settings)
    kwargs: dict[str, Any] = {
        "name": CLIENT,
        "client_id": settings.oidc_client_id,
        "client_secret": settings.oidc_client_secret,
        "client_kwargs": {"scope": scopes(settings), "code_challenge_method": "S256"},
    }
    if p.oidc:
        kwargs["server_metadata_url"] = discovery_url(settings.oidc_issuer or p.default_issuer)
    else:
        kwargs.update(p.endpoints)
    return kwargs


def make_oauth(settings: Settings) -> Any:
    """An Authlib ``OAuth`` registry with Den's one client, or None when OIDC is off."""
    if not enabled(settings):
        return None
    from authlib.integrations.starlette_client import OAuth

    oauth = OAuth()
    oauth.register(**client_kwargs(settings))
    return oauth


def profile_from_claims(claims: dict[str, Any], *, groups_claim: str) -> Profile:
    """The profile in OIDC claims (ID token merged with userinfo)."""
    groups = claims.get(groups_claim) or []
    if isinstance(groups, str):
        groups = [groups]
    verified = claims.get("email_verified")
    return Profile(
        issuer=str(claims["iss"]),
        subject=str(claims["sub"]),
        username=str(claims.get("preferred_username") or claims.get("nickname") or ""),
        email=str(claims.get("email") or ""),
        email_verified=verified is True or str(verified).lower() == "true",
        groups=tuple(str(g) for g in groups if isinstance(g, str | int)),
    )


def profile_from_github(user: dict[str, Any], emails: list[dict[str, Any]],
                        orgs: list[dict[str, Any]]) -> Profile:
    """The profile in GitHub's /user, /user/emails and /user/orgs answers."""
    primary = next((e for e in emails if e.get("primary") and e.get("verified")), None)
    return Profile(
        issuer=GITHUB,
        subject=str(user["id"]),
        username=str(user.get("login") or ""),
        email=str(primary["email"]) if primary else "",
        email_verified=primary is not None,
        groups=tuple(str(o["login"]) for o in orgs if o.get("login")),
    )


async def authorize_redirect(oauth: Any, request: Any, redirect_uri: str) -> Any:
    """The redirect to the provider's login page (state, nonce and PKCE verifier are kept in
    the session cookie by Authlib)."""
    try:
        return await oauth.create_client(CLIENT).authorize_redirect(request, redirect_uri)
    except Exception as exc:  # discovery unreachable, bad metadata
        raise LoginFailed("the login provider cannot be reached; try again later",
                          detail=repr(exc)) from exc


async def finish(oauth: Any, request: Any, settings: Settings) -> Profile:
    """Complete the code flow on the callback: check state, swap the code for tokens,
    validate the ID token and read the profile."""
    from authlib.integrations.base_client.errors import OAuthError

    client = oauth.create_client(CLIENT)
    call: Callable[..., Any]
    try:
        token = await client.authorize_access_token(request)
        if not preset(settings).oidc:
            call = client.get
            user = (await call("user", token=token)).json()
            emails = (await call("user/emails", token=token)).json()
            orgs = (await call("user/orgs", token=token)).json()
            return profile_from_github(user, emails if isinstance(emails, list) else [],
                                       orgs if isinstance(orgs, list) else [])
        claims = dict(token.get("userinfo") or {})
        if not claims:
            raise LoginFailed("the provider sent no ID token")
        metadata = await client.load_server_metadata()
        if metadata.get("userinfo_endpoint"):
            info = dict(await client.userinfo(token=token))
            if str(info.get("sub")) == str(claims.get("sub")):  # OIDC Core 5.3.2
                claims = {**claims, **info, "iss": claims["iss"], "sub": claims["sub"]}
        return profile_from_claims(claims, groups_claim=settings.oidc_groups_claim)
    except OAuthError as exc:
        raise LoginFailed(f"login failed: {exc.description or exc.error}",
                          detail=repr(exc)) from exc
    except LoginFailed:
        raise
    except Exception as exc:  # network errors, malformed answers
        raise LoginFailed("login failed: the provider's answer could not be used",
                          detail=repr(exc)) from exc
