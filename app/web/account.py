"""Pages: signing in (password form, one-time links) and out, invites, the API docs, the favicon."""
from __future__ import annotations

import datetime as dt
import hmac

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import CSRF_HEADER, SESSION_COOKIE, SessionDep, SettingsDep, csrf_token_for
from app.core.errors import AppError, TooManyRequests
from app.services import auth, passwords
from app.web.render import PageUser, check_form_token, error_page, invite_form, read_form, sign_in_page

router = APIRouter(include_in_schema=False)


def _set_session(request: Request, settings, resp, session_token: str) -> None:
    resp.set_cookie(SESSION_COOKIE, session_token, max_age=settings.session_max_age_s, httponly=True,
                    samesite="strict", secure=request.url.scheme == "https", path="/")


def _next(value: object) -> str:
    """Where to go after signing in: a path on this server only (never another site)."""
    v = value if isinstance(value, str) else "/"
    return v if v.startswith("/") and not v.startswith("//") and "\\" not in v else "/"


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _agent(request: Request) -> str:
    return request.headers.get("user-agent", "")[:100]


@router.get("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep, user: PageUser, token: str = "",
          next: str = "/"):
    """The sign-in form; with `token`, a one-time sign-in link (spent here, sets a session cookie)."""
    if not token:
        if user is not None:
            return RedirectResponse(_next(next), status_code=303)
        return sign_in_page(request, status_code=200, next=_next(next))
    session_token = auth.exchange_login(session, token, dt.timedelta(seconds=settings.session_max_age_s))
    if session_token is None:
        return sign_in_page(request, status_code=401, error=True)
    resp = RedirectResponse("/", status_code=303)
    _set_session(request, settings, resp, session_token)
    return resp


@router.post("/login")
async def login_form(request: Request, session: SessionDep, settings: SettingsDep):
    """The sign-in form: `username` and `password`; success: a session cookie and the dashboard."""
    form = await read_form(request)
    username, password = form.get("username", ""), form.get("password", "")
    nxt = _next(form.get("next"))
    if not check_form_token(request, form):
        return sign_in_page(request, status_code=400, username=username, next=nxt,
                            message="This form had expired: sign in again.")
    try:
        session_token = await run_in_threadpool(
            auth.sign_in, session, username, password, _address(request),
            dt.timedelta(seconds=settings.session_max_age_s), _agent(request))
    except TooManyRequests as e:
        page = sign_in_page(request, status_code=429, username=username, next=nxt, message=e.message[:1].upper()
                            + e.message[1:] + ".")
        page.headers["Retry-After"] = str(e.retry_after)
        return page
    except AppError as e:
        return sign_in_page(request, status_code=e.status, username=username, next=nxt,
                            message=e.message[:1].upper() + e.message[1:] + ".")
    done = RedirectResponse(nxt, status_code=303)
    _set_session(request, settings, done, session_token)
    return done


@router.get("/invite")
def invite_page(request: Request, session: SessionDep, token: str = ""):
    """An invite link: the form that sets the new user's password."""
    invitee = auth.invited(session, token) if token else None
    return invite_form(request, invitee, token, status_code=200 if invitee is not None else 401)


@router.post("/invite")
async def accept_invite(request: Request, session: SessionDep, settings: SettingsDep):
    """Set the password (`password`, `password_confirm`) of an invite (`token`) and sign in."""
    form = await read_form(request)
    token = form.get("token", "")
    invitee = auth.invited(session, token) if token else None
    if invitee is None:
        return invite_form(request, None, token, status_code=401)
    if not check_form_token(request, form):
        return invite_form(request, invitee, token, 400, ["this form had expired: type the password again"])
    problems = passwords.problems(form.get("password", ""), form.get("password_confirm", ""), invitee.name)
    if problems:
        return invite_form(request, invitee, token, 400, problems)
    session_token = await run_in_threadpool(
        auth.accept_invite, session, token, form.get("password", ""), form.get("password_confirm", ""),
        dt.timedelta(seconds=settings.session_max_age_s), _agent(request))
    resp = RedirectResponse("/", status_code=303)
    _set_session(request, settings, resp, session_token)
    return resp


@router.post("/logout")
async def logout(request: Request, session: SessionDep):
    """Sign out: the CSRF token comes in the X-CSRF-Token header (scripts) or the form field csrf_token."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie and auth.authenticate(session, cookie, ("session",)) is not None:
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent and request.headers.get("content-type", "").startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else ""
        if not hmac.compare_digest(sent, csrf_token_for(cookie)):
            return error_page(request, 401, "Sign-out refused",
                              "The request did not carry this page's security token. Reload the page and use "
                              "Sign out again.")
        auth.revoke(session, cookie)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


@router.get("/docs")
def api_docs(request: Request):
    """Swagger UI from static/vendor/swagger-ui (FastAPI's default loads it from a CDN)."""
    return get_swagger_ui_html(openapi_url=request.app.openapi_url, title="Graft API",
                               swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
                               swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
                               swagger_favicon_url="/static/favicon.svg",
                               swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True})


@router.get("/favicon.ico")
def favicon():
    """Browsers ask for /favicon.ico whatever the page says."""
    return RedirectResponse("/static/favicon.svg", status_code=301)
