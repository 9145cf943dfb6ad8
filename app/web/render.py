"""Rendering pages: the Jinja2 environment with its filters, the signed-in page user, and the standard
sign-in, error and not-found pages. Every page module renders through here."""
from __future__ import annotations

import datetime as dt
import hmac
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from app.api.deps import SESSION_COOKIE, SessionDep, csrf_token_for
from app.core.errors import NotFound
from app.db.models import FINAL_STATUSES, User, Workspace
from app.services import auth
from domain.clock import as_utc

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
templates = Jinja2Templates(directory=ROOT / "templates")

STAGES = {"decode": "Decoding images", "features": "Computing features", "probe": "Fitting linear classifiers",
          "advise": "Measuring how far the images are from ImageNet", "train": "Training",
          "folds": "Cross-validating linear classifiers", "duplicates": "Looking for duplicates",
          "val": "Validating", "export": "Exporting the model (TorchScript, ONNX)",
          "search": "Searching the head's parameters", "lr_find": "Finding the learning rate"}


# ---------------------------------------------------------------- template helpers


_aware = as_utc


def _when(t: dt.datetime | None) -> str:
    t = _aware(t)
    return t.strftime("%Y-%m-%d %H:%M UTC") if t else ""


def _iso(t: dt.datetime | None) -> str:
    t = _aware(t)
    return t.isoformat() if t else ""


def _filesize(n: int | float | None) -> str:
    n = float(n or 0)
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _duration(s: float | None) -> str:
    if s is None:
        return ""
    if s < 9.95:
        return f"{max(0.0, s):.1f} s"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _sci(x: float | None) -> str:
    """2.80e-3, as JavaScript's toExponential(2) writes it."""
    if x is None:
        return ""
    mant, _, exp = f"{x:.2e}".partition("e")
    return f"{mant}e{int(exp)}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"


templates.env.filters.update(when=_when, iso=_iso, filesize=_filesize, duration=_duration, pct=_pct, sci=_sci)
templates.env.globals.update(STAGES=STAGES, FINAL_STATUSES=FINAL_STATUSES)


# ---------------------------------------------------------------- who is looking


def page_user(request: Request, session: SessionDep) -> User | None:
    """The signed-in browser user (session cookie), or None. Pages do not take bearer tokens."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    user = auth.authenticate(session, cookie, ("session",))
    if user is not None:
        request.state.page_session = session  # render() lists the user's workspaces for the top bar
    return user


WORKSPACE_COOKIE = "graft_workspace"


def my_workspaces(request: Request, session: Session, user: User) -> list[tuple[Workspace, str]]:
    """The user's (workspace, role) pairs, read once per request (the top bar and the page both use them)."""
    from app.services import workspaces

    mine = getattr(request.state, "my_workspaces", None)
    if mine is None:
        mine = workspaces.mine(session, user)
        if not any(w.personal_user_id == user.id for w, _ in mine):  # a user made before workspaces
            workspaces.personal(session, user)
            session.commit()
            mine = workspaces.mine(session, user)
        request.state.my_workspaces = mine
    return mine


def current_workspace(request: Request, session: Session, user: User) -> tuple[Workspace, str]:
    """The workspace the pages show (chosen with the switcher; a cookie), with the user's role there;
    the personal workspace when none is chosen or the chosen one is no longer theirs."""
    raw = request.cookies.get(WORKSPACE_COOKIE, "")
    mine = my_workspaces(request, session, user)
    for ws, role in mine:
        if raw.isdigit() and ws.id == int(raw):
            return ws, role
    return next((w, r) for w, r in mine if w.personal_user_id == user.id)


PageUser = Annotated[User | None, Depends(page_user)]


class SignInRequired(Exception):
    """A page for signed-in users was asked for without a session: create_app answers the sign-in page
    (401), so that each page states its need once (`user: SignedIn`) instead of checking."""


def require_user(user: PageUser) -> User:
    if user is None:
        raise SignInRequired()
    return user


SignedIn = Annotated[User, Depends(require_user)]


def page_id(value: str) -> int | None:
    """A page URL's numeric id, or None (pages answer their own 404 page instead of a validation error)."""
    return int(value) if value.isdigit() and len(value) < 12 else None


def page_object(get_owned: Callable[[Session, User, int], T], session: Session, user: User, raw_id: str) -> T | None:
    """The user's object for a page URL id, or None (bad id, no such object, or someone else's)."""
    oid = page_id(raw_id)
    if oid is None:
        return None
    try:
        return get_owned(session, user, oid)
    except NotFound:
        return None


def render(request: Request, name: str, context: dict[str, Any] | None = None, status_code: int = 200,
           user: User | None = None) -> HTMLResponse:
    cookie = request.cookies.get(SESSION_COOKIE)
    ctx = {"user": user, "csrf_token": csrf_token_for(cookie) if user is not None and cookie else "",
           "nav": None, **(context or {})}
    session = getattr(request.state, "page_session", None)
    if user is not None and session is not None and "workspace" not in ctx:
        ctx["workspace"], ctx["workspace_role"] = current_workspace(request, session, user)
        ctx["my_workspaces"] = my_workspaces(request, session, user)
    resp = templates.TemplateResponse(request, name, ctx, status_code=status_code)
    resp.headers["Cache-Control"] = "no-store"
    return resp


FORM_COOKIE = "graft_form"  # the anonymous forms' (sign-in, invite) CSRF token: a double-submit cookie


def _with_form_token(request: Request, name: str, context: dict[str, Any], status_code: int) -> HTMLResponse:
    token = request.cookies.get(FORM_COOKIE) or ""
    if not (20 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()):
        token = secrets.token_urlsafe(24)
    resp = render(request, name, {**context, "form_token": token}, status_code=status_code)
    resp.set_cookie(FORM_COOKIE, token, max_age=24 * 3600, httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", path="/")
    return resp


def check_form_token(request: Request, form: dict[str, str]) -> bool:
    """An anonymous form came from our page: its hidden field matches the cookie set with the page."""
    cookie = request.cookies.get(FORM_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie, form.get("form_token", ""))


def check_csrf(request: Request, form: dict[str, str]) -> bool:
    """A signed-in user's form (field csrf_token) or script (X-CSRF-Token header) came from our page."""
    cookie = request.cookies.get(SESSION_COOKIE, "")
    sent = request.headers.get("x-csrf-token", "") or form.get("csrf_token", "")
    return bool(cookie) and hmac.compare_digest(sent, csrf_token_for(cookie))


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded or multipart form's text fields (files are refused: these forms have none)."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return {}
    form = await request.form(max_files=0, max_fields=30)
    try:
        return {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()


def sign_in_page(request: Request, status_code: int = 401, error: bool = False, message: str | None = None,
                 username: str | None = None, next: str = "/") -> HTMLResponse:
    settings = request.app.state.settings
    return _with_form_token(request, "login.html", {
        "error": "link" if error else None, "message": message, "username": username, "next": next,
        "oidc_name": settings.oidc_name if settings.oidc_enabled else None}, status_code)


def invite_form(request: Request, invitee: User | None, token: str, status_code: int = 200,
                problems: list[str] | None = None) -> HTMLResponse:
    from app.services.passwords import MIN_LENGTH

    return _with_form_token(request, "invite.html", {"invitee": invitee, "token": token, "problems": problems,
                                                     "min_length": MIN_LENGTH}, status_code)


def error_page(request: Request, status_code: int, title: str, message: str,
               user: User | None = None) -> HTMLResponse:
    return render(request, "error.html", {"title": title, "message": message, "status": status_code},
                  status_code=status_code, user=user)


def _not_found(request: Request, user: User | None, what: str) -> HTMLResponse:
    return error_page(request, 404, "Not found", f"There is no {what} here, or it belongs to someone else.",
                      user)


def wants_html(request: Request) -> bool:
    """A browser asking for a page (not the API, not an asset)."""
    path = request.url.path
    return (request.method == "GET" and "text/html" in request.headers.get("accept", "")
            and not path.startswith(("/api/", "/static/")))


def html_not_found(request: Request) -> HTMLResponse:
    """The HTML 404 page for unknown page URLs (the API keeps its JSON errors)."""
    user = None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        with request.app.state.sessions() as s:
            user = auth.authenticate(s, cookie, ("session",))
    return error_page(request, 404, "Page not found", f"There is no page at {request.url.path}.", user)
