"""Page: the dashboard (the user's datasets and newest jobs)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import func, select

from app.api.deps import SessionDep
from app.db.models import Dataset, Job
from app.services import access
from app.web.render import SignedIn, current_workspace, render

router = APIRouter(include_in_schema=False)
JOBS_ON_DASHBOARD = 100


@router.get("/")
def dashboard(request: Request, session: SessionDep, user: SignedIn):
    """The current workspace's datasets and newest jobs (the switcher in the top bar picks the workspace)."""
    ws, role = current_workspace(request, session, user)
    datasets = session.scalars(select(Dataset).where(Dataset.workspace_id == ws.id).order_by(Dataset.id.desc())).all()
    jobs = session.scalars(select(Job).where(Job.workspace_id == ws.id).order_by(Job.id.desc())
                           .limit(JOBS_ON_DASHBOARD)).all()
    total_jobs = session.scalar(select(func.count()).select_from(Job).where(Job.workspace_id == ws.id))
    names = {d.id: d.name + (f" v{d.version}" if d.version > 1 else "") for d in datasets}
    counts = {s: n for s, n in session.execute(select(Job.status, func.count()).where(Job.workspace_id == ws.id)
                                               .group_by(Job.status))}
    return render(request, "dashboard.html", {"nav": "dashboard", "datasets": datasets, "jobs": jobs,
                                              "dataset_names": names, "status_counts": counts,
                                              "total_jobs": total_jobs, "can_edit": access.allows(role, access.EDIT)},
                  user=user)
