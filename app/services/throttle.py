"""The sign-in throttle. Failed sign-ins are recorded (username and client address, never the password) and
counted over a window: after USER_FREE failures for one username, that username waits a short lock that
doubles with each further failure (so a guesser gets a few tries an hour, while the real user, from any
address, waits at most USER_MAX_LOCK); after ADDRESS_FREE failures from one address, that address waits
ADDRESS_LOCK whatever username it tries. A successful sign-in clears the username's failures. Torch-free;
the counts live in the database, so every web process sees the same ones."""
from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.db.models import SignInFailure
from domain.clock import as_utc, utcnow

log = logging.getLogger("graft.signin")

WINDOW = dt.timedelta(minutes=15)
USER_FREE = 5
USER_FIRST_LOCK_S = 30
USER_MAX_LOCK_S = 300
ADDRESS_FREE = 20
ADDRESS_LOCK_S = 300


def _key(username: str) -> str:
    return (username or "").strip().lower()[:100]


def retry_after(session: Session, username: str, address: str) -> int:
    """Seconds before this username or address may try again (0: now)."""
    now = utcnow()
    since = now - WINDOW
    waits = [0.0]
    for column, value, free in ((SignInFailure.username, _key(username), USER_FREE),
                                (SignInFailure.address, address[:64], ADDRESS_FREE)):
        n, last = session.execute(select(func.count(), func.max(SignInFailure.created_at))
                                  .where(column == value, SignInFailure.created_at >= since)).one()
        if n >= free and last is not None:
            if column is SignInFailure.username:
                lock = min(USER_MAX_LOCK_S, USER_FIRST_LOCK_S * 2 ** (n - free))
            else:
                lock = ADDRESS_LOCK_S
            waits.append((as_utc(last) + dt.timedelta(seconds=lock) - now).total_seconds())
    return max(0, int(max(waits) + 0.999))


def record_failure(session: Session, username: str, address: str, why: str) -> None:
    """Count a failed sign-in and log it (without the password). Commits."""
    session.add(SignInFailure(username=_key(username), address=address[:64]))
    # old rows are of no use to the counts
    session.execute(delete(SignInFailure).where(SignInFailure.created_at < utcnow() - 2 * WINDOW))
    session.commit()
    log.warning("failed sign-in for user %r from %s: %s", _key(username), address, why)


def clear(session: Session, username: str) -> None:
    session.execute(delete(SignInFailure).where(SignInFailure.username == _key(username)))
    session.commit()
