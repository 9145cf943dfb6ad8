"""GET /metrics: Prometheus' text format (app.services.metrics). For a scraper, set GRAFT_METRICS_TOKEN and
send it as `Authorization: Bearer <token>`; an admin's API token or browser session works too."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import SessionDep, SettingsDep, user_from_request
from app.api.schemas import errors
from app.core.errors import Forbidden, Unauthorized

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
                       **errors(401, 403)})
def metrics(request: Request, session: SessionDep, settings: SettingsDep):
    """Jobs by status and kind, the queue's length, busy workers, job and epoch durations, request latencies
    by route, upload bytes (docs/deploy.md lists them)."""
    header = request.headers.get("authorization", "")
    token = header.partition(" ")[2].strip() if header.lower().startswith("bearer ") else ""
    if not (settings.metrics_token and token and hmac.compare_digest(token, settings.metrics_token)):
        user = user_from_request(request, session)
        if user is None:
            raise Unauthorized("send GRAFT_METRICS_TOKEN as 'Authorization: Bearer <token>' (or an admin's token)")
        if not user.is_admin:
            raise Forbidden("only admins (or a scraper with GRAFT_METRICS_TOKEN) read the metrics")
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
