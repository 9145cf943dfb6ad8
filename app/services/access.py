"""Who may see and do what, defined once. Datasets and jobs belong to a workspace; a user sees what belongs
to the workspaces they are a member of, and their role there (viewer < editor < owner, app.db.models.Role)
decides what they may do: viewers see, download and predict; editors also upload, train, cancel and delete;
owners also manage members. An admin manages users and workspaces but sees only the workspaces they belong to.

Every lookup by id goes through `get_visible`, every listing filters with `visible_to`. An object the user
cannot see answers exactly like one that does not exist (404), so ids never tell one user about another's
data; one they can see but not change answers 403 with what their role allows. Torch-free."""
from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Forbidden
from app.db.models import MAX_ID, ROLE_RANK, Membership, Role, User

VIEW, EDIT, OWN = Role.viewer.value, Role.editor.value, Role.owner.value
ALLOWS = {VIEW: "see, download and predict", EDIT: "also upload, train, cancel and delete",
          OWN: "also manage members"}


class _InWorkspace(Protocol):
    id: Any
    workspace_id: Any


T = TypeVar("T", bound=_InWorkspace)


def my_workspaces(user: User) -> Any:
    """A subquery: the ids of the workspaces `user` is a member of."""
    return select(Membership.workspace_id).where(Membership.user_id == user.id)


def visible_to(model: Any, user: User) -> Any:
    """The WHERE clause of the rows of `model` (Dataset, Job) that `user` may see."""
    return model.workspace_id.in_(my_workspaces(user))


def role_of(session: Session, user: User, workspace_id: int) -> str | None:
    """The user's role in the workspace, or None when they are not a member."""
    return session.scalar(select(Membership.role).where(Membership.workspace_id == workspace_id,
                                                        Membership.user_id == user.id))


def allows(role: str | None, need: str) -> bool:
    return role is not None and ROLE_RANK.get(role, 0) >= ROLE_RANK[need]


def check_role(session: Session, user: User, workspace_id: int, need: str, what: str) -> str:
    """The user's role when it allows `need` (viewer, editor, owner); else Forbidden that says so. Call it
    for a workspace the user can see (a member's); others answer NotFound before this."""
    role = role_of(session, user, workspace_id)
    if not allows(role, need):
        raise Forbidden(f"you are a {role or 'non-member'} of workspace {workspace_id}, which may "
                        f"{ALLOWS.get(role or '', 'not see it')}: {what} needs the {need} role; ask the "
                        "workspace's owner or an admin", {"role": role, "needs": need})
    return role or need


def get_visible(session: Session, model: type[T], user: User, obj_id: int, need: str = VIEW,
                what: str = "this") -> T | None:
    """The row of `model` with id `obj_id` when `user` may see it, else None (missing or not theirs: the
    same). With `need` above viewer, a visible row whose workspace role is too low raises Forbidden."""
    obj = session.get(model, obj_id) if 1 <= obj_id <= MAX_ID else None
    if obj is None:
        return None
    role = role_of(session, user, obj.workspace_id)
    if role is None:
        return None
    if not allows(role, need):
        check_role(session, user, obj.workspace_id, need, what)
    return obj
