"""Who may see what, defined once: a user sees the datasets and jobs they own. Every lookup of a dataset or
job by id goes through `get_visible`, every listing filters with `visible_to`, and an object that is not
visible is reported exactly like one that does not exist (404), so ids never tell one user about another's
data. Torch-free."""
from __future__ import annotations

from typing import Any, Protocol, TypeVar

from sqlalchemy.orm import Session

from app.db.models import MAX_ID, User


class _Owned(Protocol):
    owner_id: Any


T = TypeVar("T", bound=_Owned)


def visible_to(model: Any, user: User) -> Any:
    """The WHERE clause of the rows of `model` (Dataset, Job) that `user` may see."""
    return model.owner_id == user.id


def get_visible(session: Session, model: type[T], user: User, obj_id: int) -> T | None:
    """The row of `model` with id `obj_id` when `user` may see it, else None (missing or another's: the same)."""
    obj = session.get(model, obj_id) if 1 <= obj_id <= MAX_ID else None
    return obj if obj is not None and obj.owner_id == user.id else None
