"""Accounts on a real database (SQLite and PostgreSQL): invites set a password and sign in, the sign-in
form and its throttle, password rules, disabled users, API tokens and sessions from the browser, the admin's
users page, and the `graft user` commands."""
from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from support.db import db_url  # noqa: F401  (fixture: sqlite and postgres)
from support.web import csrf_of, field_of, make_app, sign_in_with_password

from app.db.models import ApiToken, User
from app.services import auth, passwords

GOOD = "correct horse battery staple"


@pytest.fixture
def site(tmp_path, db_url):  # noqa: F811
    app, settings = make_app(tmp_path / "data", db_url, public_url="https://graft.example.org/")
    with app.state.sessions() as s:
        admin = auth.create_user(s, "root", admin=True)
        admin.password_hash = passwords.hash_password(GOOD)
        s.commit()
    return app, settings


def invite(app, name: str, admin: bool = False) -> str:
    with app.state.sessions() as s:
        user = auth.create_user(s, name, admin=admin)
        return auth.invite_link(s, user, app.state.settings.public_url)


def accept(client: TestClient, link: str, password: str, confirm: str | None = None):
    path = link.split("graft.example.org", 1)[1]
    page = client.get(path)
    assert page.status_code == 200, page.text
    token = path.split("token=", 1)[1]
    return client.post("/invite", data={"token": token, "password": password,
                                        "password_confirm": password if confirm is None else confirm,
                                        "form_token": field_of(page.text, "form_token")}, follow_redirects=False)


def test_an_invite_sets_the_password_and_signs_in_once(site):
    app, _ = site
    link = invite(app, "bob")
    assert link.startswith("https://graft.example.org/invite?token=graft_")  # GRAFT_PUBLIC_URL's origin
    c = TestClient(app)
    page = c.get(link.split("graft.example.org", 1)[1])
    assert 'name="password"' in page.text and 'name="password_confirm"' in page.text and "bob" in page.text
    # the rules, said on the form; nothing changes
    for pw, confirm, said in (("short", None, "at least 12 characters"),
                              (GOOD, GOOD + "x", "the two passwords differ"),
                              ("password1234", None, "most common passwords"),
                              ("passwordpassword", None, "most common passwords")):
        r = accept(c, link, pw, confirm)
        assert r.status_code == 400 and said in r.text, (pw, r.status_code)
    with app.state.sessions() as s:
        assert s.scalar(select(User.password_hash).where(User.name == "bob")) is None
    r = accept(c, link, GOOD)
    assert r.status_code == 303 and r.headers["location"] == "/" and "graft_session" in c.cookies
    assert c.get("/").status_code == 200 and "bob" in c.get("/").text
    with app.state.sessions() as s:
        stored = s.scalar(select(User.password_hash).where(User.name == "bob"))
    assert stored.startswith("$argon2id$") and GOOD not in stored  # argon2id, never the password
    # the link is spent
    again = TestClient(app).get(link.split("graft.example.org", 1)[1])
    assert again.status_code == 401 and "does not work" in again.text
    # and the password signs in from another browser
    other = TestClient(app)
    r = sign_in_with_password(other, "bob", GOOD)
    assert r.status_code == 303 and "graft_session" in other.cookies


def test_the_sign_in_form_refuses_wrong_passwords_and_forged_posts(site):
    app, _ = site
    c = TestClient(app)
    r = sign_in_with_password(c, "root", "not the password at all")
    assert r.status_code == 401 and "Wrong user name or password" in r.text and "graft_session" not in c.cookies
    r = sign_in_with_password(c, "nobody", GOOD)
    assert r.status_code == 401 and "Wrong user name or password" in r.text  # the same answer
    # a post that did not come from the form (no form token: a cross-site post) signs nobody in
    r = TestClient(app).post("/login", data={"username": "root", "password": GOOD}, follow_redirects=False)
    assert r.status_code == 400 and "graft_session" not in r.cookies
    # an open redirect is not possible through `next`
    page = c.get("/login")
    r = c.post("/login", data={"username": "root", "password": GOOD, "next": "//evil.example/",
                               "form_token": field_of(page.text, "form_token")}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_repeated_failures_are_throttled_and_logged_without_the_password(site, caplog):
    app, _ = site
    c = TestClient(app)
    caplog.set_level(logging.WARNING, logger="graft.signin")
    for i in range(5):
        assert sign_in_with_password(c, "root", f"wrong guess number {i}").status_code == 401
    r = sign_in_with_password(c, "root", GOOD)  # even the right password waits now
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "try again in" in r.text
    assert "graft_session" not in c.cookies
    assert len([m for m in caplog.messages if "failed sign-in for user 'root'" in m]) == 5
    assert not any("wrong guess" in m or GOOD in m for m in caplog.messages)
    # another user from the same address is not locked out by root's lock
    link = invite(app, "carol")
    accept(TestClient(app), link, GOOD)
    assert sign_in_with_password(TestClient(app), "carol", GOOD).status_code == 303
    # the lock is short: once it has passed (moved back in time here), root signs in
    from app.db.models import SignInFailure
    from domain.clock import utcnow

    with app.state.sessions() as s:
        for f in s.scalars(select(SignInFailure)):
            f.created_at = utcnow() - dt.timedelta(seconds=61)
        s.commit()
    assert sign_in_with_password(c, "root", GOOD).status_code == 303


def test_a_disabled_user_is_refused_everywhere_and_re_enabled(site):
    app, _ = site
    accept(bob := TestClient(app), invite(app, "bob"), GOOD)
    with app.state.sessions() as s:
        user = auth.get_user(s, "bob")
        token = auth.create_token(s, user, "script")
    api = {"Authorization": f"Bearer {token}"}
    assert TestClient(app).get("/api/v1/datasets", headers=api).status_code == 200
    admin = TestClient(app)
    assert sign_in_with_password(admin, "root", GOOD).status_code == 303
    page = admin.get("/admin/users")
    assert page.status_code == 200 and 'data-user="bob"' in page.text
    with app.state.sessions() as s:
        bob_id = auth.get_user(s, "bob").id
    r = admin.post(f"/admin/users/{bob_id}/disable", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    assert bob.get("/", follow_redirects=False).status_code == 401  # the session ended
    assert TestClient(app).get("/api/v1/datasets", headers=api).status_code == 401  # the token stopped
    r = sign_in_with_password(TestClient(app), "bob", GOOD)
    assert r.status_code == 401 and "disabled" in r.text
    r = admin.post(f"/admin/users/{bob_id}/enable", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 303
    assert sign_in_with_password(TestClient(app), "bob", GOOD).status_code == 303
    assert TestClient(app).get("/api/v1/datasets", headers=api).status_code == 200
    # a form without the page's token changes nothing
    r = admin.post(f"/admin/users/{bob_id}/disable", data={}, follow_redirects=False)
    assert r.status_code == 401
    with app.state.sessions() as s:
        assert not auth.get_user(s, "bob").disabled


def test_admins_invite_and_reset_from_the_users_page_and_others_may_not(site):
    app, _ = site
    admin = TestClient(app)
    sign_in_with_password(admin, "root", GOOD)
    csrf = csrf_of(admin.get("/admin/users").text)
    r = admin.post("/admin/users", data={"name": "dave", "csrf_token": csrf})
    assert r.status_code == 201 and 'id="invite-url"' in r.text
    link = r.text.split('id="invite-url">', 1)[1].split("<", 1)[0]
    assert link.startswith("https://graft.example.org/invite?token=")
    assert accept(dave := TestClient(app), link, GOOD).status_code == 303
    # a bad name is refused with the reason
    r = admin.post("/admin/users", data={"name": "../x", "csrf_token": csrf})
    assert r.status_code == 400 and "user name" in r.text
    # dave is no admin: the page and its forms are refused
    assert dave.get("/admin/users").status_code == 403
    r = dave.post("/admin/users", data={"name": "eve", "csrf_token": csrf_of(dave.get("/").text)})
    assert r.status_code == 403
    with app.state.sessions() as s:
        assert s.scalar(select(User).where(User.name == "eve")) is None
        dave_id = auth.get_user(s, "dave").id
    # reset: the password is forgotten, the sessions end, a new invite works
    r = admin.post(f"/admin/users/{dave_id}/reset", data={"csrf_token": csrf})
    assert r.status_code == 200 and 'id="invite-url"' in r.text
    new_link = r.text.split('id="invite-url">', 1)[1].split("<", 1)[0]
    assert dave.get("/", follow_redirects=False).status_code == 401
    assert sign_in_with_password(TestClient(app), "dave", GOOD).status_code == 401
    assert accept(TestClient(app), new_link, "a brand new passphrase").status_code == 303


def test_tokens_are_made_and_revoked_in_the_browser(site):
    app, _ = site
    c = TestClient(app)
    sign_in_with_password(c, "root", GOOD)
    page = c.get("/settings/tokens")
    assert page.status_code == 200 and 'id="no-tokens"' in page.text and "this browser" in page.text
    r = c.post("/settings/tokens", data={"name": "nightly", "csrf_token": csrf_of(page.text)})
    assert r.status_code == 201
    token = r.text.split('id="token-value">', 1)[1].split("<", 1)[0]
    assert token.startswith("graft_")
    api = {"Authorization": f"Bearer {token}"}
    assert TestClient(app).get("/api/v1/jobs", headers=api).status_code == 200
    page = c.get("/settings/tokens")
    assert token not in page.text and 'data-token="nightly"' in page.text  # shown once only
    with app.state.sessions() as s:
        tid = s.scalar(select(ApiToken.id).where(ApiToken.name == "nightly"))
    assert c.post(f"/settings/tokens/{tid}/revoke", data={"csrf_token": csrf_of(page.text)},
                  follow_redirects=False).status_code == 303
    assert TestClient(app).get("/api/v1/jobs", headers=api).status_code == 401
    # another user's token cannot be revoked by id
    with app.state.sessions() as s:
        other = auth.create_user(s, "frank")
        auth.create_token(s, other, "theirs")
        theirs = s.scalar(select(ApiToken.id).where(ApiToken.name == "theirs"))
    r = c.post(f"/settings/tokens/{theirs}/revoke", data={"csrf_token": csrf_of(page.text)})
    assert r.status_code == 404
    # sessions: a second browser's session is listed and ended from the first
    second = TestClient(app)
    sign_in_with_password(second, "root", GOOD)
    page = c.get("/settings/tokens")
    with app.state.sessions() as s:
        sessions = s.scalars(select(ApiToken).where(ApiToken.kind == "session")).all()
        other_session = max(t.id for t in sessions)
    assert len(sessions) == 2
    c.post(f"/settings/tokens/{other_session}/revoke", data={"csrf_token": csrf_of(page.text)})
    assert second.get("/", follow_redirects=False).status_code == 401 and c.get("/").status_code == 200


def test_graft_user_create_prints_the_invite_link_last(tmp_path):
    env = {**os.environ, "GRAFT_DATA_DIR": str(tmp_path / "data"), "GRAFT_PUBLIC_URL": "https://team.example:8443"}
    graft = Path(sys.executable).with_name("graft")
    p = subprocess.run([str(graft), "user", "create", "alice", "--admin"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    link = p.stdout.strip().splitlines()[-1]
    assert link.startswith("https://team.example:8443/invite?token=graft_")
    listed = subprocess.run([str(graft), "user", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert "alice\tadmin\tinvited" in listed.stdout
    again = subprocess.run([str(graft), "user", "create", "alice"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert again.returncode == 2 and "already exists" in again.stderr
    p2 = subprocess.run([str(graft), "user", "invite", "alice"], capture_output=True, text=True, env=env, timeout=120)
    assert p2.returncode == 0 and p2.stdout.strip().splitlines()[-1] != link
