"""Dependencies: settings, a database session, the current user (Bearer token or browser session)."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.core.errors import Unauthorized
from app.core.settings import Settings
from app.db.models import User
from app.services import auth

SESSION_COOKIE = "graft_session"
CSRF_HEADER = "x-csrf-token"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


async def get_settings_dep(request: Request) -> Settings:  # async: no trip to the threadpool for this
    return request.app.state.settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    """A session per request. Opening one does no I/O (the connection comes with the first query, in the
    threadpool), so it is made here on the event loop; closing it (returning the connection to the pool)
    goes to the threadpool. A sync generator would cost two threadpool trips per request."""
    s = request.app.state.sessions()
    try:
        yield s
    finally:
        await run_in_threadpool(s.close)


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_db)]


def csrf_token_for(session_token: str) -> str:
    """Derived from the (HttpOnly, unreadable to other sites) session token: pages embed it and send it
    back in the X-CSRF-Token header on every state-changing request."""
    return hashlib.sha256(f"graft-csrf:{session_token}".encode()).hexdigest()[:40]


def user_from_request(request: Request, session: Session) -> User | None:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        user = auth.authenticate(session, token.strip(), ("api",))
        if user is None:
            raise Unauthorized("this API token is not valid (revoked or mistyped): create one with "
                               "`graft token create --name NAME`")
        return user
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        user = auth.authenticate(session, cookie, ("session",))
        if user is None:
            return None
        if request.method in UNSAFE:
            sent = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(sent, csrf_token_for(cookie)):
                raise Unauthorized("missing or wrong X-CSRF-Token header: reload the page and try again")
        return user
    return None


# declares the scheme in OpenAPI (the /docs "Authorize" button); the header itself is read below
_bearer = HTTPBearer(auto_error=False, description="An API token from `graft token create --name NAME`")


def current_user(request: Request, session: SessionDep,
                 _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None) -> User:
    user = user_from_request(request, session)
    if user is None:
        raise Unauthorized("sign in first: send 'Authorization: Bearer <token>' (create a token with "
                           "`graft token create --name NAME`), or open the sign-in link `graft serve` printed")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
