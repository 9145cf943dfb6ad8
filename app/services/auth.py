"""Users and tokens. Tokens are random; only their sha256 is stored, and the lookup result is compared
in constant time. Kinds: "api" (long-lived bearer), "login" (one-time sign-in link), "session" (cookie)."""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, joinedload

from app.core.errors import BadRequest, Conflict, NotFound
from app.db.models import ApiToken, User
from domain import clock

LOGIN_TTL = dt.timedelta(hours=24)


utcnow = clock.utcnow


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_user(session: Session, name: str) -> User:
    name = name.strip()
    if not name or len(name) > 100:
        raise BadRequest("a user name needs 1 to 100 characters")
    if session.scalar(select(User).where(User.name == name)):
        raise Conflict(f"user {name!r} already exists")
    user = User(name=name)
    session.add(user)
    session.commit()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}: create it with `graft user create {name}`")
    return user


def ensure_user(session: Session, name: str) -> User:
    return session.scalar(select(User).where(User.name == name)) or create_user(session, name)


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
    if row is None or not hmac.compare_digest(row.token_hash, h) or row.kind not in kinds:
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
    return create_token(session, user, "browser session", kind="session", ttl=session_ttl)


def revoke(session: Session, token: str) -> None:
    session.execute(delete(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    session.commit()
