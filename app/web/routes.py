"""Pages (server-rendered Jinja2). Pages read through the same services as the API; their scripts call
the REST API with the session cookie and the X-CSRF-Token header."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from app.api.deps import SESSION_COOKIE, SessionDep, SettingsDep, csrf_token_for, user_from_request
from app.services import auth

ROOT = Path(__file__).resolve().parents[2]
templates = Jinja2Templates(directory=ROOT / "templates")
router = APIRouter(include_in_schema=False)


@router.get("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep, token: str = ""):
    """The sign-in link printed by `graft serve`: spends the one-time token, sets a session cookie."""
    session_token = auth.exchange_login(session, token, dt.timedelta(seconds=settings.session_max_age_s))
    if session_token is None:
        return templates.TemplateResponse(request, "login.html", {"user": None, "error": True}, status_code=401)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(SESSION_COOKIE, session_token, max_age=settings.session_max_age_s, httponly=True,
                    samesite="strict", secure=request.url.scheme == "https", path="/")
    return resp


@router.post("/logout")
def logout(request: Request, session: SessionDep):
    user_from_request(request, session)  # checks the CSRF header for cookie sessions
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        auth.revoke(session, cookie)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp
