"""Time, in UTC, defined once: what every tier stamps rows with and how a stored time is read back.

SQLite hands back naive datetimes (stored as UTC), PostgreSQL aware ones in the session's zone: `as_utc`
makes either an aware UTC datetime, so that comparisons and what the API and pages show never mix zones."""
from __future__ import annotations

import datetime as dt
from typing import overload


def utcnow() -> dt.datetime:
    """Now, aware, in UTC."""
    return dt.datetime.now(dt.UTC)


@overload
def as_utc(t: dt.datetime) -> dt.datetime: ...
@overload
def as_utc(t: None) -> None: ...
def as_utc(t: dt.datetime | None) -> dt.datetime | None:
    """A stored time as an aware UTC datetime (naive ones are UTC); None stays None."""
    if t is None:
        return None
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t.astimezone(dt.UTC)


def iso_utc(t: dt.datetime | None) -> str | None:
    """ISO 8601 in UTC with its offset ("2026-12-02T13:05:04+00:00"), or None."""
    u = as_utc(t)
    return u.isoformat() if u is not None else None
