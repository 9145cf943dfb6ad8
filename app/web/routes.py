"""The pages (server-rendered Jinja2), one module per page group: account (sign in and out, API docs),
dashboard, datasets, jobs, compare, label_issues (the review of wrong labels), team (workspaces, users, tokens);
app.web.probe holds the backbone comparison's page parts and app.web.render the templates, filters and the `SignedIn` dependency (a page for signed-in users answers the
sign-in page, 401, to anyone else). Pages read through the same services as the API; their scripts call the
REST API with the session cookie and the X-CSRF-Token header. Never imports torch."""
from __future__ import annotations

from fastapi import APIRouter

from app.web import account, compare, dashboard, datasets, jobs, label_issues, oidc, team

router = APIRouter(include_in_schema=False)
for _module in (account, oidc, dashboard, datasets, jobs, compare, label_issues, team):
    router.routes.extend(_module.router.routes)  # the routes themselves: `router.routes` lists every page
