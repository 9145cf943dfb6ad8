"""Pages for a team: workspaces (list, create, members, the switcher), the admin's users page (invite,
disable, re-enable, reset) and each user's API tokens and sessions. Every form posts back here with the
page's CSRF token (field csrf_token); a form without it is refused (401) and changes nothing."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import SESSION_COOKIE, SessionDep, SettingsDep
from app.core.errors import AppError, NotFound
from app.db.models import User
from app.services import auth, workspaces
from app.services.auth import hash_token
from app.web.render import (
    WORKSPACE_COOKIE,
    SignedIn,
    check_csrf,
    error_page,
    my_workspaces,
    page_id,
    read_form,
    render,
)

router = APIRouter(include_in_schema=False)


def _refused(request: Request, user: User) -> HTMLResponse:
    return error_page(request, 401, "Refused", "The form did not carry this page's security token. Reload the "
                      "page and try again.", user)


def _failed(request: Request, user: User, e: AppError, title: str) -> HTMLResponse:
    return error_page(request, e.status, title, e.message[:1].upper() + e.message[1:] + ".", user)


# ---------------------------------------------------------------- workspaces


@router.get("/workspaces")
def workspaces_page(request: Request, session: SessionDep, user: SignedIn):
    return render(request, "workspaces.html", {"nav": "workspaces", "rows": my_workspaces(request, session, user)},
                  user=user)


@router.post("/workspaces")
async def create_workspace(request: Request, session: SessionDep, user: SignedIn):
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    try:
        ws = workspaces.create_shared(session, user, form.get("name", ""))
    except AppError as e:
        return _failed(request, user, e, "The workspace was not created")
    return RedirectResponse(f"/workspaces/{ws.id}", status_code=303)


@router.get("/workspaces/switch")
def switch_form_target(user: SignedIn):
    """The switcher's form posts here; a GET (a bookmarked or followed link) goes to the list."""
    return RedirectResponse("/workspaces", status_code=303)


@router.post("/workspaces/switch")
async def switch_workspace(request: Request, session: SessionDep, user: SignedIn):
    """The top bar's switcher: the pages show the chosen workspace (a cookie) from now on."""
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    wid = page_id(form.get("workspace_id", ""))
    if wid is None or not any(w.id == wid for w, _ in my_workspaces(request, session, user)):
        return error_page(request, 404, "Not found", "There is no such workspace of yours.", user)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(WORKSPACE_COOKIE, str(wid), max_age=365 * 24 * 3600, httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", path="/")
    return resp


def _workspace_view(request: Request, session: Session, user: User, raw_id: str, status_code: int = 200,
                    notice: str | None = None) -> Response:
    wid = page_id(raw_id)
    mine = {w.id: (w, r) for w, r in my_workspaces(request, session, user)}
    try:
        ws = workspaces.get_managed(session, user, wid) if wid is not None else None
        manage = True
    except AppError:
        ws, manage = (mine[wid][0], False) if wid in mine else (None, False)
    if ws is None:
        return error_page(request, 404, "Not found", f"There is no workspace {raw_id} here, or you are not a "
                          "member.", user)
    members = workspaces.members(session, ws)
    return render(request, "workspace.html", {
        "nav": "workspaces", "ws": ws, "members": members, "manage": manage and ws.personal_user_id is None,
        "role": mine[ws.id][1] if ws.id in mine else None, "roles": workspaces.ROLES, "notice": notice,
        "users": session.scalars(select(User).where(User.disabled.is_(False)).order_by(User.name)).all()
        if manage else []}, status_code=status_code, user=user)


@router.get("/workspaces/{workspace_id}")
def workspace_page(workspace_id: str, request: Request, session: SessionDep, user: SignedIn):
    return _workspace_view(request, session, user, workspace_id)


@router.post("/workspaces/{workspace_id}/members")
async def set_member(workspace_id: str, request: Request, session: SessionDep, user: SignedIn):
    """Add a member or change a member's role (fields username, role); `remove` set: remove them."""
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    wid = page_id(workspace_id)
    if wid is None:
        return error_page(request, 404, "Not found", "There is no such workspace.", user)
    try:
        if form.get("remove"):
            target = session.scalar(select(User).where(User.name == form.get("username", "")))
            if target is None:
                raise NotFound(f"no user named {form.get('username', '')!r}")
            workspaces.remove_member(session, user, wid, target.id)
        else:
            workspaces.set_member(session, user, wid, form.get("username", ""), form.get("role", ""))
    except AppError as e:
        return _failed(request, user, e, "The members did not change")
    return RedirectResponse(f"/workspaces/{wid}", status_code=303)


# ---------------------------------------------------------------- the admin's users page


def _users_view(request: Request, session: Session, user: User, status_code: int = 200,
                link: tuple[str, str] | None = None) -> Response:
    if not user.is_admin:
        return error_page(request, 403, "Admins only", "Only an admin manages users. Ask one to invite people.",
                          user)
    users = session.scalars(select(User).order_by(User.name)).all()
    return render(request, "admin_users.html", {"nav": "admin", "users": users, "link": link},
                  status_code=status_code, user=user)


@router.get("/admin/users")
def users_page(request: Request, session: SessionDep, user: SignedIn):
    return _users_view(request, session, user)


@router.post("/admin/users")
async def invite_user(request: Request, session: SessionDep, settings: SettingsDep, user: SignedIn):
    """Invite a user (fields name, admin): the page shows their one-time invite link."""
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    if not user.is_admin:
        return _users_view(request, session, user)
    try:
        new = auth.create_user(session, form.get("name", ""), admin=bool(form.get("admin")))
    except AppError as e:
        return _failed(request, user, e, "The user was not invited")
    link = auth.invite_link(session, new, settings.public_url)
    return _users_view(request, session, user, 201, (new.name, link))


@router.post("/admin/users/{user_id}/{action}")
async def user_action(user_id: str, action: str, request: Request, session: SessionDep, settings: SettingsDep,
                      user: SignedIn):
    """disable, enable, or reset (forget the password, end the sessions, show a new invite link)."""
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    if not user.is_admin:
        return _users_view(request, session, user)
    uid = page_id(user_id)
    target = session.get(User, uid) if uid is not None else None
    if target is None or action not in ("disable", "enable", "reset"):
        return error_page(request, 404, "Not found", "There is no such user or action.", user)
    if target.id == user.id and action == "disable":
        return error_page(request, 409, "Not done", "You cannot disable your own account: ask another admin.",
                          user)
    if action == "reset":
        return _users_view(request, session, user, 200, (target.name, auth.reset(session, target,
                                                                                 settings.public_url)))
    auth.set_disabled(session, target, action == "disable")
    return RedirectResponse("/admin/users", status_code=303)


# ---------------------------------------------------------------- API tokens and sessions


def _tokens_view(request: Request, session: Session, user: User, status_code: int = 200,
                 created: tuple[str, str] | None = None) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return render(request, "tokens.html", {
        "nav": "tokens", "tokens": auth.tokens(session, user, "api"), "sessions": auth.tokens(session, user, "session"),
        "this_session": hash_token(cookie) if cookie else None, "created": created}, status_code=status_code,
        user=user)


@router.get("/settings/tokens")
def tokens_page(request: Request, session: SessionDep, user: SignedIn):
    return _tokens_view(request, session, user)


@router.post("/settings/tokens")
async def create_api_token(request: Request, session: SessionDep, user: SignedIn):
    """Create an API token (field name): shown once on the page that answers."""
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    name = form.get("name", "").strip()
    if not name or len(name) > 100:
        return error_page(request, 400, "No token created", "Give the token a name of 1 to 100 characters (what "
                          "it is for).", user)
    token = auth.create_token(session, user, name)
    return _tokens_view(request, session, user, 201, (name, token))


@router.post("/settings/tokens/{token_id}/revoke")
async def revoke_token(token_id: str, request: Request, session: SessionDep, user: SignedIn):
    """Revoke one of your API tokens, or end one of your sessions (signs that browser out)."""
    form = await read_form(request)
    if not check_csrf(request, form):
        return _refused(request, user)
    tid = page_id(token_id)
    try:
        if tid is None:
            raise NotFound("no such token")
        auth.revoke_id(session, user, tid, ("api", "session"))
    except AppError as e:
        return _failed(request, user, e, "Nothing was revoked")
    return RedirectResponse("/settings/tokens", status_code=303)

