"""Single sign-on with OpenID Connect (the authorization code flow with PKCE S256), through Authlib: the
provider's metadata (discovered once per process), the authorization URL, the code exchange, the ID token's
checks (signature against the provider's JWKS, iss, aud, exp, nonce; Authlib's CodeIDToken) and the Graft
account it signs in: the one linked to the provider's subject, else the one with the same *verified* e-mail
(linked then), else a new one when GRAFT_OIDC_AUTO_CREATE is on. Tokens are never logged."""
from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any, cast

import httpx
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import AppError, BadRequest, Conflict, Forbidden, Unauthorized
from app.core.settings import Settings
from app.db.models import User
from app.services import auth

log = logging.getLogger(__name__)

SCOPE = "openid email profile"
TIMEOUT_S = 10.0
LEEWAY_S = 60
# asymmetric signatures only: an HMAC "signature" keyed with the client secret proves nothing about the
# provider, and "none" none at all
SAFE_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519")


class ProviderUnavailable(AppError):
    """The OpenID provider could not be reached, or answered nonsense."""

    status = 502
    code = "bad_gateway"


@dataclass(frozen=True)
class Flow:
    """One sign-in in progress: what the callback needs (kept in the browser's signed flow cookie)."""

    state: str
    nonce: str
    code_verifier: str
    next: str = "/"


_lock = threading.Lock()
_metadata: dict[str, dict[str, Any]] = {}
_jwks: dict[str, dict[str, Any]] = {}
_secrets: dict[str, bytes] = {}


def server_secret(settings: Settings) -> bytes:
    """A random key in <data_dir>/secret.key (mode 0600, made on first use), which signs the flow cookie."""
    path = settings.data_dir / "secret.key"
    with _lock:
        if str(path) in _secrets:
            return _secrets[str(path)]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes().strip()
        else:
            key = secrets.token_hex(32).encode()
            with os.fdopen(fd, "wb") as f:
                f.write(key)
        if len(key) < 32:
            raise RuntimeError(f"{path} holds no usable key: delete it and Graft makes a new one")
        _secrets[str(path)] = key
        return key


def _http() -> httpx.Client:
    return httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)


def _issuer(settings: Settings) -> str:
    if not settings.oidc_issuer or not settings.oidc_client_id:
        raise BadRequest("single sign-on is not configured (GRAFT_OIDC_ISSUER, GRAFT_OIDC_CLIENT_ID)")
    return settings.oidc_issuer.rstrip("/")


def redirect_uri(settings: Settings) -> str:
    return f"{settings.public_url}/login/oidc/callback"


def metadata(issuer: str) -> dict[str, Any]:
    """The provider's discovery document ({issuer}/.well-known/openid-configuration), cached per process."""
    issuer = issuer.rstrip("/")
    with _lock:
        if issuer in _metadata:
            return _metadata[issuer]
    url = f"{issuer}/.well-known/openid-configuration"
    try:
        with _http() as http:
            r = http.get(url, headers={"Accept": "application/json"})
            r.raise_for_status()
            meta = r.json()
    except (httpx.HTTPError, ValueError) as e:
        log.warning("OpenID provider discovery failed at %s: %s", url, type(e).__name__)
        raise ProviderUnavailable(f"the single sign-on provider {issuer} could not be reached ({type(e).__name__})"
                                  ": try again in a moment, or sign in with your password") from e
    if not isinstance(meta, dict) or str(meta.get("issuer", "")).rstrip("/") != issuer or not all(
            meta.get(k) for k in ("authorization_endpoint", "token_endpoint", "jwks_uri")):
        raise ProviderUnavailable(f"the single sign-on provider at {issuer} sent an unusable discovery document "
                                  "(its issuer must equal GRAFT_OIDC_ISSUER): an admin should check the setting")
    with _lock:
        _metadata[issuer] = meta
    return meta


def _key_set(meta: dict[str, Any], force: bool = False) -> KeySet:
    uri = meta["jwks_uri"]
    with _lock:
        cached = None if force else _jwks.get(uri)
    if cached is None:
        try:
            with _http() as http:
                r = http.get(uri, headers={"Accept": "application/json"})
                r.raise_for_status()
                cached = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ProviderUnavailable("the single sign-on provider's signing keys could not be fetched "
                                      f"({type(e).__name__}): try again in a moment") from e
        if not isinstance(cached, dict) or not isinstance(cached.get("keys"), list):
            raise ProviderUnavailable(f"the single sign-on provider's signing keys at {uri} are not a JWK set: "
                                      "an admin should check the provider")
        with _lock:
            _jwks[uri] = cached
    return KeySet.import_key_set(cast(Any, cached))


def _client(settings: Settings, meta: dict[str, Any]) -> OAuth2Client:
    methods = meta.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    auth_method = ("none" if not settings.oidc_client_secret else
                   "client_secret_basic" if "client_secret_basic" in methods else "client_secret_post")
    return OAuth2Client(client_id=settings.oidc_client_id, client_secret=settings.oidc_client_secret or None,
                        token_endpoint_auth_method=auth_method, scope=SCOPE, redirect_uri=redirect_uri(settings),
                        code_challenge_method="S256", timeout=TIMEOUT_S)


def begin(settings: Settings, next: str = "/") -> tuple[str, Flow]:
    """A new sign-in: the provider's authorization URL to send the browser to, and the flow to keep."""
    meta = metadata(_issuer(settings))
    flow = Flow(state=generate_token(32), nonce=generate_token(32), code_verifier=generate_token(64), next=next)
    with _client(settings, meta) as client:
        url, _ = client.create_authorization_url(meta["authorization_endpoint"], state=flow.state,
                                                 code_verifier=flow.code_verifier, nonce=flow.nonce)
    return url, flow


def _algorithms(meta: dict[str, Any]) -> list[str]:
    offered = meta.get("id_token_signing_alg_values_supported") or ["RS256"]
    algs = [a for a in offered if a in SAFE_ALGS]
    return algs or ["RS256"]


def _validate_id_token(settings: Settings, meta: dict[str, Any], id_token: str, nonce: str,
                       access_token: str | None) -> dict[str, Any]:
    registry = JWSRegistry(algorithms=_algorithms(meta), strict_check_header=False)
    try:
        try:
            token = jwt.decode(id_token, _key_set(meta), registry=registry)
        except InvalidKeyIdError:  # the provider rotated its keys since we fetched them
            token = jwt.decode(id_token, _key_set(meta, force=True), registry=registry)
        params: dict[str, Any] = {"nonce": nonce, "client_id": settings.oidc_client_id}
        if access_token:
            params["access_token"] = access_token
        options: dict[str, Any] = {"iss": {"essential": True, "value": meta["issuer"]},
                                   "aud": {"essential": True, "value": settings.oidc_client_id}}
        claims = CodeIDToken(token.claims, token.header, options, params)
        claims.validate(leeway=LEEWAY_S)
    except (JoseError, ValueError, KeyError, TypeError) as e:
        log.warning("single sign-on: an ID token failed its checks (%s)", type(e).__name__)
        raise Unauthorized("the single sign-on provider's answer did not pass Graft's checks "
                           f"({getattr(e, 'error', type(e).__name__)}): sign in again") from e
    return dict(claims)


def _userinfo(client: OAuth2Client, meta: dict[str, Any], sub: str) -> dict[str, Any]:
    """The userinfo endpoint's claims (many providers put the e-mail only there); {} when there is none."""
    endpoint = meta.get("userinfo_endpoint")
    if not endpoint:
        return {}
    r = client.get(endpoint, headers={"Accept": "application/json"})
    if r.status_code != 200 or not r.headers.get("content-type", "").startswith("application/json"):
        return {}
    data = r.json()
    if not isinstance(data, dict) or data.get("sub") != sub:  # OIDC Core 5.3.2: must be the same subject
        return {}
    return data


def finish(settings: Settings, flow: Flow, code: str) -> dict[str, Any]:
    """Exchange the authorization code (with the PKCE verifier) and return the checked claims: the ID
    token's, completed by the userinfo endpoint's."""
    meta = metadata(_issuer(settings))
    try:
        with _client(settings, meta) as client:
            tokens = client.fetch_token(meta["token_endpoint"], grant_type="authorization_code", code=code,
                                        code_verifier=flow.code_verifier)
            if not tokens.get("id_token"):
                raise Unauthorized("the single sign-on provider sent no ID token (is the 'openid' scope allowed "
                                   "for this client?): an admin should check the provider's client settings")
            claims = _validate_id_token(settings, meta, tokens["id_token"], flow.nonce, tokens.get("access_token"))
            extra = _userinfo(client, meta, claims["sub"]) if tokens.get("access_token") else {}
    except httpx.HTTPError as e:
        raise ProviderUnavailable(f"the single sign-on provider could not be reached ({type(e).__name__}): try "
                                  "again in a moment, or sign in with your password") from e
    except (OAuthError, ValueError) as e:  # the provider refused the code, or answered nonsense
        error = getattr(e, "error", None) or type(e).__name__
        log.warning("single sign-on: the token request failed (%s)", error)
        raise BadRequest(f"the single sign-on provider did not accept the sign-in ({error}): sign in again") from e
    return {**extra, **claims}


# ---------------------------------------------------------------- the Graft account


def _verified(claims: dict[str, Any]) -> bool:
    v = claims.get("email_verified")
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _free_name(session: Session, claims: dict[str, Any], email: str) -> str:
    """A valid user name from preferred_username or the e-mail's local part, made unique: bob, bob-2, ..."""
    raw = str(claims.get("preferred_username") or email.partition("@")[0] or "user")
    base = re.sub(r"[^A-Za-z0-9._@-]+", "-", raw).lstrip("._@-")[:90].rstrip("-") or "user"
    taken = {n.lower() for n in session.scalars(
        select(User.name).where(func.lower(User.name).like(f"{base.lower()}%"))).all()}
    if base.lower() not in taken:
        return base
    n = 2
    while f"{base}-{n}".lower() in taken:
        n += 1
    return f"{base}-{n}"


def _link(session: Session, user: User, issuer: str, sub: str) -> User:
    user.oidc_issuer, user.oidc_subject = issuer, sub
    session.commit()
    return user


def match_user(session: Session, settings: Settings, claims: dict[str, Any]) -> User:
    """The Graft account these (checked) claims sign in to; linked to the provider's subject on first use."""
    issuer, sub = str(claims["iss"]), str(claims["sub"])
    user = session.scalar(select(User).where(User.oidc_issuer == issuer, User.oidc_subject == sub))
    email = str(claims.get("email") or "").strip()
    if user is None and email and _verified(claims):
        user = session.scalar(select(User).where(func.lower(User.email) == email.lower()))
        if user is not None and user.oidc_subject is not None:
            raise Forbidden(f"the Graft account with the e-mail {email} is already linked to another single "
                            "sign-on identity: sign in with that one, or ask an admin")
        if user is not None and not user.disabled:
            user = _link(session, user, issuer, sub)
            log.info("single sign-on: linked user %s to subject %s of %s", user.name, sub, issuer)
    if user is None and email and _verified(claims) and settings.oidc_auto_create:
        for _ in range(5):
            try:
                user = auth.create_user(session, _free_name(session, claims, email), email=email)
                break
            except Conflict:  # someone took the name meanwhile
                session.rollback()
        if user is None:
            raise Conflict("no free user name was found for this account: ask an admin to invite you")
        user = _link(session, user, issuer, sub)
        log.info("single sign-on: created user %s for subject %s of %s", user.name, sub, issuer)
    if user is None:
        if not email:
            raise Forbidden("the single sign-on provider did not share your e-mail address, so no Graft account "
                            "matches: allow the e-mail scope, or ask an admin to invite you")
        if not _verified(claims):
            raise Forbidden(f"the single sign-on provider has not verified your e-mail {email}, so Graft cannot "
                            "match it to an account: verify it with the provider and sign in again, or sign in "
                            "with your password")
        raise Forbidden(f"no Graft account has the e-mail {email}: ask an admin to invite you with that e-mail, "
                        "or sign in with your password")
    if user.disabled:
        raise Forbidden("this account is disabled: ask an admin")
    return user


def sign_in(session: Session, settings: Settings, flow: Flow, code: str, session_ttl: dt.timedelta, agent: str = "") -> str:
    """The whole callback: exchange, check, match; returns a Graft session token."""
    user = match_user(session, settings, finish(settings, flow, code))
    log.info("single sign-on: user %s signed in", user.name)
    return auth.start_session(session, user, session_ttl, agent)


def error_text(error: str, description: str | None) -> str:
    """The provider's error redirect (?error=...&error_description=...), for the sign-in page."""
    what = re.sub(r"[^A-Za-z0-9_.-]", "", error or "")[:60] or "error"
    if error == "access_denied":
        return "The single sign-on was cancelled or refused by the provider. Try again, or sign in with your password."
    desc = f": {description[:200]}" if description else ""
    return f"The single sign-on provider refused the sign-in ({what}{desc}). Try again, or sign in with your password."
