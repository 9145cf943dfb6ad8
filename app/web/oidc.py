"""Pages: single sign-on (OpenID Connect). /login/oidc sends the browser to the provider with a fresh state,
nonce and PKCE verifier, kept in a signed, short-lived flow cookie; /login/oidc/callback checks the state,
lets app.services.oidc exchange and check the answer and find the account, and signs in. Every failure is
the sign-in page with what to do; both routes are 404 when single sign-on is not configured."""
from __future__ import annotations

import datetime as dt
import hmac
import html
import logging

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRouter
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from app.api.deps import SessionDep, SettingsDep
from app.core.errors import AppError
from app.core.settings import Settings
from app.services import oidc
from app.web.account import _next, _set_session
from app.web.render import error_page, sign_in_page

router = APIRouter(include_in_schema=False)
log = logging.getLogger(__name__)

FLOW_COOKIE = "graft_oidc_flow"
FLOW_PATH = "/login/oidc"  # the cookie goes to these two routes only
FLOW_TTL_S = 600


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(oidc.server_secret(settings), salt="graft-oidc-flow")


def _sentence(e: AppError) -> str:
    return e.message[:1].upper() + e.message[1:] + "."


def _not_configured(request: Request) -> HTMLResponse:
    return error_page(request, 404, "Page not found", "Single sign-on is not configured on this server (an admin "
                      "sets GRAFT_OIDC_ISSUER, GRAFT_OIDC_CLIENT_ID and GRAFT_OIDC_CLIENT_SECRET).")


def _refused(request: Request, status: int, message: str, next: str = "/") -> HTMLResponse:
    page = sign_in_page(request, status_code=status, message=message, next=next)
    page.delete_cookie(FLOW_COOKIE, path=FLOW_PATH)
    return page


def _agent(request: Request) -> str:
    return request.headers.get("user-agent", "")[:100]


@router.get("/login/oidc")
def oidc_start(request: Request, settings: SettingsDep, next: str = "/") -> Response:
    """Start a single sign-on: a redirect to the provider (its answer comes back to the callback below)."""
    if not settings.oidc_enabled:
        return _not_configured(request)
    nxt = _next(next)
    try:
        url, flow = oidc.begin(settings, nxt)
    except AppError as e:
        return _refused(request, e.status, _sentence(e), nxt)
    resp = RedirectResponse(url, status_code=303)
    value = _serializer(settings).dumps({"s": flow.state, "n": flow.nonce, "v": flow.code_verifier, "next": nxt})
    # SameSite=Lax, not Strict: the provider's redirect back is a cross-site top-level GET
    resp.set_cookie(FLOW_COOKIE, value, max_age=FLOW_TTL_S, httponly=True, samesite="lax",
                    secure=request.url.scheme == "https", path=FLOW_PATH)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _flow(request: Request, settings: Settings) -> oidc.Flow | str:
    """The flow this browser started, or why there is none usable."""
    raw = request.cookies.get(FLOW_COOKIE)
    if not raw:
        return ("This single sign-on was not started in this browser, or its cookie was blocked: use the "
                "'Sign in with' button again.")
    try:
        data = _serializer(settings).loads(raw, max_age=FLOW_TTL_S)
    except SignatureExpired:
        return f"This single sign-on took longer than {FLOW_TTL_S // 60} minutes and expired: sign in again."
    except BadSignature:
        return "This single sign-on's cookie was not valid: use the 'Sign in with' button again."
    if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("s", "n", "v", "next")):
        return "This single sign-on's cookie was not valid: use the 'Sign in with' button again."
    return oidc.Flow(state=data["s"], nonce=data["n"], code_verifier=data["v"], next=_next(data["next"]))


@router.get("/login/oidc/callback")
def oidc_callback(request: Request, session: SessionDep, settings: SettingsDep, code: str = "", state: str = "",
                  error: str = "", error_description: str = "", iss: str = "") -> Response:
    """The provider's answer: check it, find the account, set the session cookie, go on to the saved page."""
    if not settings.oidc_enabled:
        return _not_configured(request)
    flow = _flow(request, settings)
    nxt = flow.next if isinstance(flow, oidc.Flow) else "/"
    if error:
        return _refused(request, 401, oidc.error_text(error, error_description or None), nxt)
    if isinstance(flow, str):
        return _refused(request, 400, flow)
    if not state or not hmac.compare_digest(state.encode(), flow.state.encode()):
        log.warning("single sign-on: a callback's state did not match its flow cookie")
        return _refused(request, 400, "This single sign-on answer does not belong to the sign-in this browser "
                        "started (its state did not match): sign in again.", nxt)
    if iss and iss.rstrip("/") != (settings.oidc_issuer or "").rstrip("/"):  # RFC 9207: another provider's answer
        return _refused(request, 400, "This answer came from another single sign-on provider than Graft's: sign "
                        "in again.", nxt)
    if not code:
        return _refused(request, 400, "The single sign-on provider sent no authorization code: sign in again.",
                        nxt)
    try:
        token = oidc.sign_in(session, settings, flow, code, dt.timedelta(seconds=settings.session_max_age_s),
                             _agent(request))
    except AppError as e:
        session.rollback()
        return _refused(request, e.status, _sentence(e), nxt)
    resp = _continue_page(nxt)
    _set_session(request, settings, resp, token)
    resp.delete_cookie(FLOW_COOKIE, path=FLOW_PATH)
    return resp


def _continue_page(nxt: str) -> HTMLResponse:
    """Signed in: go on to `nxt` from a page of ours (a meta refresh), not with a 303. The callback was
    reached through the provider, a cross-site redirect chain, and browsers withhold SameSite=Strict cookies
    (the session's) from every request of such a chain: a 303 would land on the sign-in page."""
    url = html.escape(nxt, quote=True)
    resp = HTMLResponse(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" '
                        f'content="0;url={url}"><title>Signed in</title></head><body><p>Signed in. '
                        f'<a href="{url}" id="continue">Continue</a></p></body></html>')
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Referrer-Policy"] = "no-referrer"  # the callback's URL holds the (spent) code
    return resp
