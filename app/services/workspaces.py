"""Workspaces and their members. Every user has a personal workspace (made with the user, its only member,
as owner); admins create shared ones and become their owners; owners (and admins) add members, change
roles and remove members, keeping at least one owner. Torch-free."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.errors import BadRequest, Conflict, Forbidden, NotFound
from app.db.models import MAX_ID, Membership, Role, User, Workspace
from app.services import access

NAME_MAX = 100
ROLES = [r.value for r in Role]


def personal(session: Session, user: User) -> Workspace:
    """The user's personal workspace, made (with the user as owner) when missing. Flushes, does not commit."""
    ws = session.scalar(select(Workspace).where(Workspace.personal_user_id == user.id))
    if ws is None:
        ws = Workspace(name=user.name[:NAME_MAX], personal_user_id=user.id)
        session.add(ws)
        session.flush()
        session.add(Membership(workspace_id=ws.id, user_id=user.id, role=Role.owner.value))
        session.flush()
    return ws


def mine(session: Session, user: User) -> list[tuple[Workspace, str]]:
    """(workspace, role) of every workspace the user is a member of: the personal one first, then by name."""
    rows = session.execute(select(Workspace, Membership.role).join(Membership, Membership.workspace_id == Workspace.id)
                           .where(Membership.user_id == user.id)).all()
    return sorted(((w, r) for w, r in rows), key=lambda wr: (wr[0].personal_user_id != user.id, wr[0].name.lower(),
                                                             wr[0].id))


def target(session: Session, user: User, workspace_id: int | None, what: str) -> Workspace:
    """The workspace a create call puts its object in: `workspace_id`, or the user's personal one. The user
    must be an editor there (404 when they are not a member, 403 when only a viewer)."""
    if workspace_id is None:
        return personal(session, user)
    ws = session.get(Workspace, workspace_id) if 1 <= workspace_id <= MAX_ID else None
    if ws is None or access.role_of(session, user, ws.id) is None:
        raise NotFound(f"workspace {workspace_id} not found: list yours with GET /api/v1/workspaces",
                       {"workspace_id": workspace_id})
    access.check_role(session, user, ws.id, access.EDIT, what)
    return ws


def create_shared(session: Session, admin: User, name: str) -> Workspace:
    if not admin.is_admin:
        raise Forbidden("only admins create shared workspaces: ask an admin (`graft user create NAME --admin` "
                        "makes one)")
    name = (name or "").strip()
    if not name or len(name) > NAME_MAX:
        raise BadRequest(f"a workspace name needs 1 to {NAME_MAX} characters")
    ws = Workspace(name=name)
    session.add(ws)
    session.flush()
    session.add(Membership(workspace_id=ws.id, user_id=admin.id, role=Role.owner.value))
    session.commit()
    return ws


def get_managed(session: Session, user: User, workspace_id: int) -> Workspace:
    """A workspace whose members `user` may manage: its owners, and admins for shared workspaces."""
    ws = session.get(Workspace, workspace_id) if 1 <= workspace_id <= MAX_ID else None
    role = access.role_of(session, user, ws.id) if ws is not None else None
    if ws is None or (role is None and not (user.is_admin and ws.personal_user_id is None)):
        raise NotFound(f"workspace {workspace_id} not found: list yours with GET /api/v1/workspaces")
    if not (user.is_admin and ws.personal_user_id is None):
        access.check_role(session, user, ws.id, access.OWN, "managing members")
    return ws


def members(session: Session, ws: Workspace) -> list[Membership]:
    return list(session.scalars(select(Membership).where(Membership.workspace_id == ws.id)
                                .order_by(Membership.id)))


def _check_role_name(role: str) -> str:
    if role not in ROLES:
        raise BadRequest(f"unknown role {role!r}: use one of {', '.join(ROLES)} (viewer: see, download, predict; "
                         "editor: also upload, train, cancel, delete; owner: also manage members)")
    return role


def _owners(session: Session, ws: Workspace) -> int:
    return session.scalar(select(func.count()).select_from(Membership).where(
        Membership.workspace_id == ws.id, Membership.role == Role.owner.value)) or 0


def set_member(session: Session, actor: User, workspace_id: int, username: str, role: str) -> Membership:
    """Add `username` with `role`, or change their role."""
    ws = get_managed(session, actor, workspace_id)
    if ws.personal_user_id is not None:
        raise Conflict("a personal workspace has one member, its user: share work through a shared workspace "
                       "(an admin creates one)")
    _check_role_name(role)
    user = session.scalar(select(User).where(User.name == (username or "").strip()))
    if user is None:
        raise NotFound(f"no user named {username!r}: an admin invites them first (/admin/users)")
    m = session.scalar(select(Membership).where(Membership.workspace_id == ws.id, Membership.user_id == user.id))
    if m is None:
        m = Membership(workspace_id=ws.id, user_id=user.id, role=role)
        session.add(m)
    else:
        if m.role == Role.owner.value and role != Role.owner.value and _owners(session, ws) <= 1:
            raise Conflict(f"{user.name} is the last owner of workspace {ws.name!r}: make someone else owner first")
        m.role = role
    session.commit()
    return m


def remove_member(session: Session, actor: User, workspace_id: int, user_id: int) -> None:
    ws = get_managed(session, actor, workspace_id)
    m = session.scalar(select(Membership).where(Membership.workspace_id == ws.id, Membership.user_id == user_id))
    if m is None:
        raise NotFound(f"user {user_id} is not a member of workspace {ws.id}")
    if ws.personal_user_id is not None:
        raise Conflict("the user of a personal workspace stays its member")
    if m.role == Role.owner.value and _owners(session, ws) <= 1:
        raise Conflict("that is the workspace's last owner: make someone else owner first")
    session.delete(m)
    session.commit()
