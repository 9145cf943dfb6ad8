"""The database: the record of users, datasets, jobs, their metrics and artifacts.

ORM models only; the API's Pydantic schemas live in app/api/schemas.py.
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.sql.expression import false as sa_false

from domain.clock import utcnow


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime(timezone=True)}


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class JobKind(str, enum.Enum):
    train = "train"  # a training run: spec is a RunSpec
    probe = "probe"  # a backbone comparison: spec is a ProbeSpec
    label_issues = "label_issues"  # a search for wrong labels: spec is a LabelIssueSpec
    batch_predict = "batch_predict"  # predictions over a folder of images (app.services.batch_predict)


FINAL_STATUSES = (JobStatus.succeeded.value, JobStatus.failed.value, JobStatus.cancelled.value)
MAX_ID = 2**31 - 1  # ids are INTEGER columns: a larger number from a client can name no row


class Role(str, enum.Enum):
    """A member's role in a workspace: each includes the ones before it."""

    viewer = "viewer"  # see, download, predict
    editor = "editor"  # also upload, train, cancel, delete
    owner = "owner"  # also manage members


ROLE_RANK = {Role.viewer.value: 1, Role.editor.value: 2, Role.owner.value: 3}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # argon2id (pwdlib); None until the user sets a password through an invite link
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    email: Mapped[str | None] = mapped_column(String(254), default=None, unique=True)
    # single sign-on: the provider's issuer and subject of the account linked to this user
    oidc_issuer: Mapped[str | None] = mapped_column(String(500), default=None)
    oidc_subject: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Workspace(Base):
    """Datasets, jobs and their models belong to a workspace. Every user has a personal one
    (`personal_user_id`); admins create shared ones and add members."""

    __tablename__ = "workspaces"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    personal_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), default=None,
                                                         unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Membership(Base):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("workspace_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16), default=Role.viewer.value)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    workspace: Mapped[Workspace] = relationship()
    user: Mapped[User] = relationship()


class SignInFailure(Base):
    """A failed sign-in (no password kept): the throttle counts them per username and per client address."""

    __tablename__ = "sign_in_failures"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(100), index=True)
    address: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class ApiToken(Base):
    """A bearer token. Only its sha256 is stored; `kind` "api" is long-lived, "login" is the one-time
    sign-in token that `graft serve` prints, "session" backs a browser cookie."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(16), default="api")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    user: Mapped[User] = relationship()


class Dataset(Base):
    __tablename__ = "datasets"
    NAME_MAX = 200
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)  # who made it
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(500))  # relative to the data directory
    layout: Mapped[str] = mapped_column(String(200), default="")
    classes: Mapped[list[Any]] = mapped_column(default=list)
    counts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"train": {cls: n}, "val": {cls: n}}
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    num_images: Mapped[int] = mapped_column(default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # versions (app.services.versions): the dataset this one was made from, the first of its family (None for
    # that first one itself), the number within the family (1: the upload), and what changed from the parent
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), index=True,
                                                  default=None)
    lineage_id: Mapped[int | None] = mapped_column(Integer, index=True, default=None)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    changes: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    # "multiclass" (folder layouts) or "multilabel" (a labels.csv manifest: `classes` are its labels, `counts`
    # the images that carry each); label_stats (multi-label only): {"labels_per_image": mean, "no_label": n,
    # "images": {"train": n, "val": n}, "cooccurrence": {"labels": [...], "matrix": [[images with both]]}}
    # (app.services.doctor_manifest)
    task: Mapped[str] = mapped_column(String(16), default="multiclass", server_default="multiclass")
    label_stats: Mapped[dict[str, Any] | None] = mapped_column(default=None)

    @property
    def family_id(self) -> int:
        return self.lineage_id or self.id


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)  # who started it
    workspace_id: Mapped[int] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value, index=True)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    celery_task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    current_epoch: Mapped[int] = mapped_column(Integer, default=0)
    total_epochs: Mapped[int] = mapped_column(Integer, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    best_val_acc: Mapped[float | None] = mapped_column(Float, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    # times a worker started the job (the claim counts it); identifies the run that owns a 'running' row
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # "train": a training run (spec is a RunSpec); "probe": a backbone comparison (spec is a ProbeSpec);
    # "label_issues": a search for wrong labels (spec is a LabelIssueSpec). No constraint: a new kind needs no migration
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.train.value, server_default=JobKind.train.value)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    dataset: Mapped[Dataset] = relationship()

    @property
    def dataset_version(self) -> int:
        """The version of its dataset the job trained on (1: the upload; see app.services.versions)."""
        return self.dataset.version if self.dataset is not None else 1


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(32))
    train_loss: Mapped[float] = mapped_column(Float)
    train_acc: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float] = mapped_column(Float)
    val_acc: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    images_per_s: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    elapsed: Mapped[float] = mapped_column(Float)
    eta: Mapped[float] = mapped_column(Float)
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """Append-only events of a job (status changes, epochs, messages): the SSE stream replays them
    by id, so a client reconnecting with Last-Event-ID misses nothing."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # status | epoch | message
    data: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # model | metrics | ...
    path: Mapped[str] = mapped_column(String(500))  # relative to the data directory
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


# ---------------------------------------------------------------- the default workspace


@event.listens_for(OrmSession, "before_flush")
def _default_workspace(session: OrmSession, flush_context: Any, instances: Any) -> None:
    """A new dataset or job without a workspace goes to its owner's personal workspace (made when the owner
    has none yet: users from before workspaces, or made directly)."""
    for obj in list(session.new):
        if isinstance(obj, Dataset | Job) and obj.workspace_id is None and obj.owner_id is not None:
            obj.workspace_id = _personal_workspace_id(session, obj.owner_id)


def _personal_workspace_id(session: OrmSession, user_id: int) -> int:
    from sqlalchemy import insert, select

    with session.no_autoflush:
        wid = session.scalar(select(Workspace.id).where(Workspace.personal_user_id == user_id))
        if wid is None:  # inside a flush: rows go in through the connection, not the unit of work
            conn = session.connection()
            name = conn.scalar(select(User.name).where(User.id == user_id)) or f"user {user_id}"
            now = utcnow()
            wid = conn.execute(insert(Workspace).values(name=name[:100], personal_user_id=user_id,
                                                        created_at=now)).inserted_primary_key[0]  # type: ignore[index]
            conn.execute(insert(Membership).values(workspace_id=wid, user_id=user_id, role=Role.owner.value,
                                                   created_at=now))
    return int(wid)
