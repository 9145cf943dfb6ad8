"""Page: a run comparison (two or more succeeded jobs of one dataset side by side)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from app.api.deps import SessionDep
from app.core.errors import AppError, NotFound
from app.services import compare as compare_service
from app.web.render import SignedIn, _not_found, error_page, render

router = APIRouter(include_in_schema=False)


@router.get("/compare")
def compare_page(request: Request, session: SessionDep, user: SignedIn):
    """Two or more succeeded jobs of one dataset side by side: /compare?ids=3,5 (or ids repeated, as the
    dashboard's form sends them); without ids, how to pick them."""
    ids = request.query_params.getlist("ids")
    if not any(i.strip() for i in ids):
        return render(request, "compare.html", {"nav": "compare", "cmp": None}, user=user)
    try:
        cmp = compare_service.compare(session, user, ids)
    except NotFound as e:
        details = e.details if isinstance(e.details, dict) else {}
        return _not_found(request, user, f"job {details.get('job_id', '')}".strip())
    except AppError as e:
        return error_page(request, e.status, "These jobs cannot be compared", e.message[:1].upper() + e.message[1:],
                          user)
    page_data = {"baseline_id": cmp["baseline_id"],
                 "jobs": [{"id": j["id"], "curves": j["curves"]} for j in cmp["jobs"]]}
    return render(request, "compare.html", {"nav": "compare", "cmp": cmp, "page_data": page_data,
                                            "diffs": {c["job_id"]: c for c in cmp["comparisons"]},
                                            "cmp_points": compare_service.points}, user=user)
