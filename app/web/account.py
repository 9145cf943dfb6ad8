"""Pages: signing in and out, the API docs, the favicon."""
from __future__ import annotations

import datetime as dt
import hmac

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import RedirectResponse

from app.api.deps import CSRF_HEADER, SESSION_COOKIE, SessionDep, SettingsDep, csrf_token_for
from app.services import auth
from app.web.render import PageUser, error_page, sign_in_page

router = APIRouter(include_in_schema=False)


@router.get("/login")
def login(request: Request, session: SessionDep, settings: SettingsDep, user: PageUser, token: str = ""):
    """The sign-in link printed by `graft serve`: spends the one-time token, sets a session cookie."""
    if not token:
        if user is not None:
            return RedirectResponse("/", status_code=303)
        return sign_in_page(request, status_code=200)
    session_token = auth.exchange_login(session, token, dt.timedelta(seconds=settings.session_max_age_s))
    if session_token is None:
        return sign_in_page(request, status_code=401, error=True)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(SESSION_COOKIE, session_token, max_age=settings.session_max_age_s, httponly=True,
                    samesite="strict", secure=request.url.scheme == "https", path="/")
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
