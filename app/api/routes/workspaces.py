"""Workspaces: the ones you are a member of, shared ones (admins create them) and their members."""
from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from app.api.deps import CurrentUser, SessionDep
from app.api.schemas import UTCDatetime, errors
from app.core.errors import NotFound
from app.db.models import MAX_ID, Membership, Role, Workspace
from app.services import access
from app.services import workspaces as service

router = APIRouter(prefix="/api/v1/workspaces", tags=["workspaces"], responses=errors(401, 422))


class WorkspaceOut(BaseModel):
    id: int
    name: str
    personal: bool = Field(description="Your personal workspace (its only member is you).")
    role: str | None = Field(description="Your role: viewer (see, download, predict), editor (also upload, train, "
                                         "cancel, delete), owner (also manage members).")
    created_at: UTCDatetime


class WorkspaceCreate(BaseModel):
    name: str = Field(min_length=1, max_length=service.NAME_MAX)


class MemberOut(BaseModel):
    user_id: int
    username: str
    role: str
    since: UTCDatetime


class MemberSet(BaseModel):
    username: str = Field(min_length=1, max_length=100)
    role: Role


def _member(m: Membership) -> MemberOut:
    return MemberOut(user_id=m.user_id, username=m.user.name, role=m.role, since=m.created_at)


@router.get("", response_model=list[WorkspaceOut])
def list_workspaces(session: SessionDep, user: CurrentUser):
    """Every workspace you are a member of, your personal one first. Create calls (upload a dataset) take a
    `workspace_id` from here; the default is your personal workspace."""
    return [WorkspaceOut(id=w.id, name=w.name, personal=w.personal_user_id == user.id, role=r,
                         created_at=w.created_at) for w, r in service.mine(session, user)]


@router.post("", status_code=201, response_model=WorkspaceOut, responses=errors(400, 403))
def create_workspace(body: WorkspaceCreate, session: SessionDep, user: CurrentUser):
    """A shared workspace (admins only); you become its owner."""
    ws = service.create_shared(session, user, body.name)
    return WorkspaceOut(id=ws.id, name=ws.name, personal=False, role=Role.owner.value,
                        created_at=ws.created_at or dt.datetime.now(dt.UTC))


@router.get("/{workspace_id}/members", response_model=list[MemberOut], responses=errors(403, 404))
def list_members(workspace_id: int, session: SessionDep, user: CurrentUser):
    """The members and their roles (any member may look; owners and admins manage them)."""
    ws = session.get(Workspace, workspace_id) if 1 <= workspace_id <= MAX_ID else None
    if ws is None or (access.role_of(session, user, ws.id) is None and not user.is_admin):
        raise NotFound(f"workspace {workspace_id} not found: list yours with GET /api/v1/workspaces")
    return [_member(m) for m in service.members(session, ws)]


@router.post("/{workspace_id}/members", response_model=MemberOut, responses=errors(400, 403, 404, 409))
def set_member(workspace_id: int, body: MemberSet, session: SessionDep, user: CurrentUser):
    """Add a member with a role, or change a member's role (owners of the workspace and admins)."""
    return _member(service.set_member(session, user, workspace_id, body.username, body.role.value))


@router.delete("/{workspace_id}/members/{user_id}", status_code=204, responses=errors(403, 404, 409))
def remove_member(workspace_id: int, user_id: int, session: SessionDep, user: CurrentUser):
    service.remove_member(session, user, workspace_id, user_id)
    return Response(status_code=204)
