"""Passwords: argon2id hashes (pwdlib) and the rules a new password must meet. A password is never stored,
logged or echoed; only its hash is kept. Torch-free."""
from __future__ import annotations

from functools import lru_cache

from pwdlib import PasswordHash

from app.core.errors import BadRequest

MIN_LENGTH = 12
MAX_LENGTH = 1024  # argon2 takes any length; a cap keeps a request from making the server hash megabytes
COMMON_CHECKED = 30_000  # zxcvbn's list of the most common passwords, most common first

_hasher = PasswordHash.recommended()  # argon2id with pwdlib's (OWASP) parameters


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify(password: str, password_hash: str | None) -> bool:
    """Whether `password` matches; always does the work of one verification, so that a missing hash (no
    such user, no password yet) takes as long as a wrong password."""
    if password_hash is None:
        _hasher.verify(password[:MAX_LENGTH], _dummy_hash())
        return False
    try:
        return _hasher.verify(password[:MAX_LENGTH], password_hash)
    except Exception:  # an unreadable stored hash is no match
        return False


@lru_cache(maxsize=1)
def _dummy_hash() -> str:
    return _hasher.hash("graft-no-such-password")


@lru_cache(maxsize=1)
def _common() -> frozenset[str]:
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"][:COMMON_CHECKED])


def _is_common(low: str) -> bool:
    """A common password, or one made from a short common one by repeating it or adding digits and symbols
    ("passwordpassword", "password1234!", "1234567890123")."""
    common = _common()
    if low in common or low.strip() in common:
        return True
    base = low.strip().rstrip("0123456789!@#$%^&*.?_-+= ")
    if base in common or not base:
        return True
    half = len(low) // 2
    return len(low) % 2 == 0 and low[:half] == low[half:] and low[:half] in common


def problems(password: str, confirm: str | None = None, username: str | None = None) -> list[str]:
    """What is wrong with a new password, in words for the form (empty: it is fine)."""
    out = []
    if confirm is not None and password != confirm:
        out.append("the two passwords differ: type the same password twice")
    if len(password) < MIN_LENGTH:
        out.append(f"use at least {MIN_LENGTH} characters (a few words make a long password easy to remember)")
    elif len(password) > MAX_LENGTH:
        out.append(f"use at most {MAX_LENGTH} characters")
    low = password.lower()
    if _is_common(low):
        out.append("this is one of the most common passwords, which are tried first: choose another")
    elif username and username.lower() in low and len(low) - len(username) < MIN_LENGTH // 2:
        out.append("the password is mostly your user name: choose another")
    elif len(set(password)) <= 3:
        out.append("the password repeats a few characters: choose another")
    return out


def check(password: str, confirm: str | None = None, username: str | None = None) -> None:
    """Raise BadRequest with every problem of a new password."""
    found = problems(password, confirm, username)
    if found:
        raise BadRequest("; ".join(found), {"password": found})
