"""Single sign-on against a real OpenID provider (tests/support/oidc/provider.js, started by the
`oidc_provider` fixture), on SQLite and PostgreSQL: Graft's side through the TestClient, the provider's pages
(its login and consent forms) through httpx, the redirects followed by hand. An invited user is matched by
verified e-mail and linked, then found by subject; unverified or unknown e-mails are refused unless
auto-creation is on (verified only); a forged state, an old flow, a disabled user, the provider's own refusal
and an unreachable provider each end on the sign-in page with what to do."""
from __future__ import annotations

import re
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from support.db import db_url  # noqa: F401  (fixture: sqlite and postgres)
from support.oidc import GRAFT_URL, oidc_provider, provider_sign_in  # noqa: F401  (fixture)
from support.web import make_app

from app.api.deps import SESSION_COOKIE
from app.db.models import User
from app.services import auth
from app.web.oidc import FLOW_COOKIE

pytestmark = pytest.mark.e2e  # starts a real OpenID provider (Node.js)


@pytest.fixture
def site(tmp_path, db_url, oidc_provider):  # noqa: F811
    """Graft on this provider, with bob invited under bob@example.org (no password yet)."""
    app, settings = make_app(tmp_path / "data", db_url, **oidc_provider.settings())
    with app.state.sessions() as s:
        auth.create_user(s, "bob", email="bob@example.org")
    return app


def start(client: TestClient, next: str = "/") -> str:
    r = client.get("/login/oidc", params={"next": next}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"].startswith("http://127.0.0.1:")
    return r.headers["location"]


def sso(app, login: str, browser: httpx.Client | None = None, next: str = "/"):
    """The whole sign-in as `login` (an account of provider.js): Graft's client and the callback's answer."""
    client = TestClient(app)
    callback = provider_sign_in(browser or httpx.Client(timeout=10), start(client, next), login)
    assert callback.startswith(f"{GRAFT_URL}/login/oidc/callback?")
    return client, client.get(callback.removeprefix(GRAFT_URL), follow_redirects=False)


def user(app, name: str) -> User:
    with app.state.sessions() as s:
        u = s.scalar(select(User).where(User.name == name))
        assert u is not None, f"no user {name}"
        s.expunge(u)
        return u


def signed_in_as(client: TestClient, name: str) -> bool:
    page = client.get("/", follow_redirects=False)
    return page.status_code == 200 and name in page.text


def test_the_sign_in_page_offers_single_sign_on_only_when_configured(site, tmp_path, db_url):  # noqa: F811
    page = TestClient(site).get("/login", params={"next": "/compare"})
    assert page.status_code == 200
    assert 'id="oidc-sign-in"' in page.text and "Sign in with single sign-on" in page.text
    assert 'href="/login/oidc?next=/compare"' in page.text or 'href="/login/oidc?next=%2Fcompare"' in page.text
    plain, _ = make_app(tmp_path / "plain", db_url.replace("graft-test.db", "plain.db"))
    c = TestClient(plain)
    assert "oidc-sign-in" not in c.get("/login").text
    assert c.get("/login/oidc", follow_redirects=False).status_code == 404
    assert c.get("/login/oidc/callback?code=x&state=y", follow_redirects=False).status_code == 404


def test_an_invited_user_signs_in_by_verified_email_then_by_subject(site, oidc_provider):  # noqa: F811
    browser = httpx.Client(timeout=10)
    client, r = sso(site, "bob-sub", browser, next="/compare")
    assert r.status_code == 200, r.text
    assert 'http-equiv="refresh" content="0;url=/compare"' in r.text  # on to the saved page, same-site
    assert r.cookies.get(SESSION_COOKIE)
    set_cookie = ", ".join(r.headers.get_list("set-cookie"))
    assert re.search(rf"{SESSION_COOKIE}=[^;]+;.*HttpOnly.*SameSite=strict", set_cookie, re.I)
    assert re.search(rf'{FLOW_COOKIE}=""?;', set_cookie)  # the flow cookie is spent
    assert signed_in_as(client, "bob")
    assert client.get("/compare").status_code == 200
    bob = user(site, "bob")
    assert (bob.oidc_issuer, bob.oidc_subject) == (oidc_provider.issuer, "bob-sub")

    # the second time the subject finds the account, whatever the e-mail now says
    with site.state.sessions() as s:
        s.scalar(select(User).where(User.name == "bob")).email = "bob@elsewhere.example"
        s.commit()
    again, r = sso(site, "bob-sub", browser)  # the provider remembers bob: no login form this time
    assert r.status_code == 200, r.text
    assert signed_in_as(again, "bob")
    with site.state.sessions() as s:
        assert s.query(User).count() == 1


def test_unverified_and_unknown_emails_are_refused_without_auto_create(site):
    with site.state.sessions() as s:
        auth.create_user(s, "eve", email="eve@example.org")
    client, r = sso(site, "eve-sub")  # eve has an account, but the provider has not verified that e-mail
    assert r.status_code == 403
    assert "has not verified your e-mail eve@example.org" in r.text and "Sign in to Graft" in r.text
    assert not r.cookies.get(SESSION_COOKIE) and not signed_in_as(client, "eve")
    assert user(site, "eve").oidc_subject is None
    client, r = sso(site, "carol-sub")
    assert r.status_code == 403
    assert "No Graft account has the e-mail Carol@Example.org: ask an admin to invite you with that e-mail" in r.text
    assert not signed_in_as(client, "carol")
    with site.state.sessions() as s:
        assert s.scalar(select(User).where(User.name == "carol")) is None


def test_auto_create_makes_an_account_for_a_new_verified_email(tmp_path, db_url, oidc_provider):  # noqa: F811
    app, _ = make_app(tmp_path / "data", db_url, **oidc_provider.settings(oidc_auto_create=True))
    with app.state.sessions() as s:
        auth.create_user(s, "bob", email="bob@example.org")
    client, r = sso(app, "carol-sub")
    assert r.status_code == 200, r.text
    assert signed_in_as(client, "carol")
    carol = user(app, "carol")
    assert (carol.email, carol.oidc_subject, carol.is_admin) == ("Carol@Example.org", "carol-sub", False)
    client, r = sso(app, "robert-sub")  # preferred_username "bob" is taken
    assert r.status_code == 200, r.text
    assert user(app, "bob-2").oidc_subject == "robert-sub" and signed_in_as(client, "bob-2")
    client, r = sso(app, "eve-sub")  # never for an unverified e-mail
    assert r.status_code == 403 and "has not verified" in r.text
    with app.state.sessions() as s:
        assert sorted(s.scalars(select(User.name))) == ["bob", "bob-2", "carol"]


def test_a_forged_state_or_a_missing_flow_is_refused(site):
    client = TestClient(site)
    callback = provider_sign_in(httpx.Client(timeout=10), start(client), "bob-sub")
    forged = re.sub(r"state=[^&]+", "state=forged", callback)
    r = client.get(forged.removeprefix(GRAFT_URL), follow_redirects=False)
    assert r.status_code == 400 and "state did not match" in r.text
    assert not r.cookies.get(SESSION_COOKIE) and not signed_in_as(client, "bob")
    # the right state with a wrong code: the provider refuses it
    client = TestClient(site)
    callback = provider_sign_in(httpx.Client(timeout=10), start(client), "bob-sub")
    r = client.get(re.sub(r"code=[^&]+", "code=forged", callback).removeprefix(GRAFT_URL), follow_redirects=False)
    assert r.status_code == 400 and "did not accept the sign-in (invalid_grant)" in r.text
    assert not signed_in_as(client, "bob")
    # another browser (no flow cookie) cannot use the real answer either
    other = TestClient(site)
    r = other.get(callback.removeprefix(GRAFT_URL), follow_redirects=False)
    assert r.status_code == 400 and "not started in this browser" in r.text and not signed_in_as(other, "bob")
    assert user(site, "bob").oidc_subject is None
    # the provider's own refusal
    fresh = TestClient(site)
    start(fresh)
    r = fresh.get("/login/oidc/callback?error=access_denied&error_description=nope&state=x", follow_redirects=False)
    assert r.status_code == 401 and "cancelled or refused" in r.text


def test_a_flow_older_than_ten_minutes_is_refused(site, monkeypatch):
    client = TestClient(site)
    callback = provider_sign_in(httpx.Client(timeout=10), start(client), "bob-sub")
    import itsdangerous.timed

    later = time.time() + 11 * 60
    monkeypatch.setattr(itsdangerous.timed, "time", type("Clock", (), {"time": staticmethod(lambda: later)}))
    r = client.get(callback.removeprefix(GRAFT_URL), follow_redirects=False)
    assert r.status_code == 400 and "expired" in r.text and not r.cookies.get(SESSION_COOKIE)


def test_a_disabled_user_is_refused(site):
    client, r = sso(site, "bob-sub")
    assert r.status_code == 200
    with site.state.sessions() as s:
        auth.set_disabled(s, s.scalar(select(User).where(User.name == "bob")), True)
    assert not signed_in_as(client, "bob")
    client, r = sso(site, "bob-sub")  # linked: found by subject
    assert r.status_code == 403 and "disabled" in r.text and not signed_in_as(client, "bob")
    with site.state.sessions() as s:  # not linked yet: found by e-mail, and still refused
        auth.set_disabled(s, auth.create_user(s, "robert", email="robert@example.org"), True)
    client, r = sso(site, "robert-sub")
    assert r.status_code == 403 and "disabled" in r.text and not signed_in_as(client, "robert")
    assert user(site, "robert").oidc_subject is None


def test_an_unreachable_provider_is_said_on_the_sign_in_page(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    app, _ = make_app(tmp_path / "data", f"sqlite:///{tmp_path / 'g.db'}", oidc_issuer=f"http://127.0.0.1:{port}",
                      oidc_client_id="x", oidc_client_secret="y", public_url=GRAFT_URL)
    r = TestClient(app).get("/login/oidc", follow_redirects=False)
    assert r.status_code == 502 and "could not be reached" in r.text and "Sign in to Graft" in r.text


def test_an_id_token_for_another_nonce_is_refused(site):
    """The ID token's checks run on the provider's real answer: a flow cookie (re-signed with the server's
    key, as only the server could) whose nonce differs from the one sent to the provider is refused."""
    from itsdangerous import URLSafeTimedSerializer

    from app.services.oidc import server_secret

    client = TestClient(site)
    callback = provider_sign_in(httpx.Client(timeout=10), start(client), "bob-sub")
    serializer = URLSafeTimedSerializer(server_secret(site.state.settings), salt="graft-oidc-flow")
    (cookie,) = [c for c in client.cookies.jar if c.name == FLOW_COOKIE]
    cookie.value = serializer.dumps({**serializer.loads(cookie.value), "n": "another-nonce"})
    r = client.get(callback.removeprefix(GRAFT_URL), follow_redirects=False)
    assert r.status_code == 401 and "did not pass Graft&#39;s checks (invalid_claim)" in r.text
    assert not signed_in_as(client, "bob") and user(site, "bob").oidc_subject is None
    key = site.state.settings.data_dir / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
