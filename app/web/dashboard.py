"""Page: the dashboard (the user's datasets and newest jobs)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import func, select

from app.api.deps import SessionDep
from app.db.models import Dataset, Job
from app.services import access
from app.web.render import SignedIn, render

router = APIRouter(include_in_schema=False)
JOBS_ON_DASHBOARD = 100


@router.get("/")
def dashboard(request: Request, session: SessionDep, user: SignedIn):
    datasets = session.scalars(select(Dataset).where(access.visible_to(Dataset, user)).order_by(Dataset.id.desc())).all()
    jobs = session.scalars(select(Job).where(access.visible_to(Job, user)).order_by(Job.id.desc())
                           .limit(JOBS_ON_DASHBOARD)).all()
    total_jobs = session.scalar(select(func.count()).select_from(Job).where(access.visible_to(Job, user)))
    names = {d.id: d.name for d in datasets}
    counts = {s: n for s, n in session.execute(select(Job.status, func.count()).where(access.visible_to(Job, user))
                                               .group_by(Job.status))}
    return render(request, "dashboard.html", {"nav": "dashboard", "datasets": datasets, "jobs": jobs,
                                              "dataset_names": names, "status_counts": counts,
                                              "total_jobs": total_jobs}, user=user)
