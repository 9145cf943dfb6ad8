"""Users, passwords and tokens. Tokens are random; only their sha256 is stored, and the lookup result is
compared in constant time. Kinds: "api" (long-lived bearer), "login" (one-time sign-in link), "invite" (a
one-time link that sets the password, valid INVITE_TTL), "session" (a browser sign-in's cookie). A disabled
user's tokens and sessions stop working at once."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, joinedload

from app.core.errors import BadRequest, Conflict, NotFound, TooManyRequests, Unauthorized
from app.db.models import ApiToken, User
from app.services import passwords, throttle
from domain import clock

LOGIN_TTL = dt.timedelta(hours=24)
INVITE_TTL = dt.timedelta(days=7)


utcnow = clock.utcnow


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")


def create_user(session: Session, name: str, admin: bool = False, email: str | None = None) -> User:
    """A new user with a personal workspace and no password yet (send them an invite link)."""
    name = name.strip()
    if not NAME_RE.match(name):
        raise BadRequest("a user name needs 1 to 100 characters: letters, digits and . _ @ - (starting with a "
                         "letter or digit)")
    if session.scalar(select(User).where(func.lower(User.name) == name.lower())):
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name, is_admin=admin, email=email)
    session.add(user)
    session.flush()
    from app.services import workspaces

    workspaces.personal(session, user)
    session.commit()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}: create it with `graft user create {name}`")
    return user


def ensure_user(session: Session, name: str, admin: bool = False) -> User:
    return session.scalar(select(User).where(User.name == name)) or create_user(session, name, admin=admin)


def create_token(session: Session, user: User, name: str, kind: str = "api",
                 ttl: dt.timedelta | None = None) -> str:
    """Returns the token itself; it cannot be recovered later."""
    token = f"graft_{secrets.token_urlsafe(32)}"
    session.add(ApiToken(user_id=user.id, name=name, kind=kind, token_hash=hash_token(token), prefix=token[:12],
                         expires_at=utcnow() + ttl if ttl else None))
    session.commit()
    return token


_aware = clock.as_utc


def lookup(session: Session, token: str, kinds: tuple[str, ...]) -> ApiToken | None:
    if not token or len(token) > 200:
        return None
    h = hash_token(token)
    # the user comes in the same query: every authenticated request runs this
    row = session.scalar(select(ApiToken).options(joinedload(ApiToken.user)).where(ApiToken.token_hash == h))
    if row is None or not hmac.compare_digest(row.token_hash, h) or row.kind not in kinds or row.user.disabled:
        return None
    exp = _aware(row.expires_at)
    if exp is not None and exp < utcnow():
        return None
    return row


def authenticate(session: Session, token: str, kinds: tuple[str, ...] = ("api",)) -> User | None:
    row = lookup(session, token, kinds)
    if row is None:
        return None
    last = _aware(row.last_used_at)
    if last is None or utcnow() - last > dt.timedelta(minutes=5):
        row.last_used_at = utcnow()
        session.commit()
    return row.user


def exchange_login(session: Session, login_token: str, session_ttl: dt.timedelta) -> str | None:
    """Spend a one-time sign-in token; returns a new cookie-session token, or None."""
    row = lookup(session, login_token, ("login",))
    if row is None:
        return None
    user = row.user
    session.execute(delete(ApiToken).where(ApiToken.id == row.id))
    session.commit()
    return start_session(session, user, session_ttl)


def start_session(session: Session, user: User, session_ttl: dt.timedelta, agent: str = "") -> str:
    """A browser sign-in: the session cookie's token (named after the browser, for the sessions list)."""
    return create_token(session, user, (agent or "browser session")[:100], kind="session", ttl=session_ttl)


def invite_link(session: Session, user: User, public_url: str) -> str:
    """A one-time link (valid INVITE_TTL) that lets `user` set a password and signs them in; an older
    invite of theirs stops working."""
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "invite"))
    token = create_token(session, user, "invite link", kind="invite", ttl=INVITE_TTL)
    return f"{public_url.rstrip('/')}/invite?token={token}"


def invited(session: Session, token: str) -> User | None:
    """The user an unused, unexpired invite is for."""
    row = lookup(session, token, ("invite",))
    return row.user if row is not None else None


def accept_invite(session: Session, token: str, password: str, confirm: str, session_ttl: dt.timedelta,
                  agent: str = "") -> str:
    """Set the invited user's password (checked against the rules) and sign them in: returns a session token.
    The invite is spent; the user's earlier sessions end."""
    row = lookup(session, token, ("invite",))
    if row is None:
        raise Unauthorized("this invite link has expired or was already used: ask an admin for a new one")
    user = row.user
    passwords.check(password, confirm, user.name)
    user.password_hash = passwords.hash_password(password)
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind.in_(("invite", "session"))))
    session.commit()
    return start_session(session, user, session_ttl, agent)


def sign_in(session: Session, username: str, password: str, address: str, session_ttl: dt.timedelta,
            agent: str = "") -> str:
    """Check a username and password (throttled per username and per address); returns a session token.
    Every failure is logged, without the password, and says the same thing whatever was wrong."""
    wait = throttle.retry_after(session, username, address)
    if wait:
        raise TooManyRequests(f"too many failed sign-ins: try again in {wait} s", wait)
    user = session.scalar(select(User).where(func.lower(User.name) == (username or "").strip().lower()))
    ok = passwords.verify(password or "", user.password_hash if user is not None else None)
    if not ok or user is None:
        why = "no such user" if user is None else "no password set" if user.password_hash is None else \
            "wrong password"
        throttle.record_failure(session, username, address, why)
        raise Unauthorized("wrong user name or password (a new user signs in first through their invite link)")
    if user.disabled:
        throttle.record_failure(session, username, address, "account disabled")
        raise Unauthorized("this account is disabled: ask an admin")
    throttle.clear(session, username)
    return start_session(session, user, session_ttl, agent)


def set_disabled(session: Session, user: User, disabled: bool) -> None:
    """Disable (sessions end, tokens stop working) or re-enable a user."""
    user.disabled = disabled
    if disabled:
        session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind.in_(("session", "invite"))))
    session.commit()


def reset(session: Session, user: User, public_url: str) -> str:
    """Forget the user's password and end their sessions; returns a new invite link."""
    user.password_hash = None
    session.execute(delete(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == "session"))
    session.commit()
    return invite_link(session, user, public_url)


def tokens(session: Session, user: User, kind: str) -> list[ApiToken]:
    """The user's unexpired tokens of one kind ("api", "session"), newest first."""
    rows = session.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.kind == kind)
                           .order_by(ApiToken.id.desc())).all()
    now = utcnow()
    return [r for r in rows if r.expires_at is None or _aware(r.expires_at) > now]


def revoke_id(session: Session, user: User, token_id: int, kinds: tuple[str, ...]) -> None:
    """Revoke one of the user's own tokens or sessions by id (404 when it is not theirs)."""
    n = session.execute(delete(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user.id,
                                               ApiToken.kind.in_(kinds))).rowcount  # type: ignore[attr-defined]
    session.commit()
    if not n:
        raise NotFound(f"no token or session {token_id} of yours")


def revoke(session: Session, token: str) -> None:
    session.execute(delete(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    session.commit()
