"""The service's tables (SQLAlchemy 2 typed declarative). Alembic owns the production schema; the
migration in migrations/versions must match this metadata (tests/test_migrations.py checks it).

Conventions
- Ids of api keys, models, datasets and jobs are uuid4 strings; job_events and artifacts use integer
  autoincrement ids (SSE replays events by id, so they must grow monotonically).
- Timestamps are timezone-aware UTC on every backend (``UTCDateTime``): SQLite has no time zone, so
  they are stored as naive UTC there and tagged UTC again on the way out.
- JSON columns are replaced, never mutated in place (the ORM does not see in-place edits).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so that migrations can refer to (and drop) them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_SOURCES = ("upload", "job", "builtin")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend; naive datetimes are rejected (they are ambiguous)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        value = value.astimezone(timezone.utc)
        # SQLite stores text without an offset; comparisons there are textual, so keep one format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class ApiKey(Base):
    """A client credential. Only the sha256 of the key is stored; ``prefix`` identifies it in lists."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the full key
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    # Signs this key's webhooks (store.webhooks). Kept in clear: the sender needs it to sign; shown to the
    # user once when made (key creation, rotation).
    webhook_secret: Mapped[str | None] = mapped_column(String(128))


class Model(Base):
    """A super-resolution model: uploaded, built in, or produced by a compression job."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(32))  # 'edsr' | 'swinir' | 'rlfn'
    scale: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)  # architecture hyper-parameters
    source: Mapped[str] = mapped_column(String(16))  # one of MODEL_SOURCES
    params: Mapped[int | None] = mapped_column(BigInteger)
    macs: Mapped[int | None] = mapped_column(BigInteger)  # at the size stated in metrics/config
    metrics: Mapped[dict[str, Any] | None] = mapped_column()
    weights_key: Mapped[str | None] = mapped_column(String(1024))  # blob keys
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    config_key: Mapped[str | None] = mapped_column(String(1024))
    onnx_key: Mapped[str | None] = mapped_column(String(1024))
    # Exported formats with their verification figures (core.quantize.FormatResult as JSON); files are
    # stored beside the weights under models/{id}/.
    formats: Mapped[list[Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column()  # soft delete: jobs may still refer to it

    __table_args__ = (Index(None, "owner_key_id", "created_at"),)


class Dataset(Base):
    """A set of training or evaluation images stored under ``blob_prefix``."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16))  # e.g. 'train' | 'eval'
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    total_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    blob_prefix: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index(None, "owner_key_id", "created_at"),)


class Job(Base):
    """A compression job. ``state`` moves only through store.jobs.transition (the state machine)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_key_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16), default="queued")  # one of store.jobs.JOB_STATES
    stage: Mapped[str | None] = mapped_column(String(32))  # last pipeline stage entered
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # fraction of the current stage, 0..1
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    teacher_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    dataset_ids: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any] | None] = mapped_column()
    report: Mapped[dict[str, Any] | None] = mapped_column()
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    result_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))  # sha256 of the request body
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker claimed the job
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Where the job's state changes are POSTed (store.webhooks), and which of them (None: all).
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        # Idempotent submission: one job per (key, Idempotency-Key).
        UniqueConstraint("owner_key_id", "idempotency_key"),
        # Listing a key's jobs and counting its unfinished ones.
        Index(None, "owner_key_id", "state"),
        Index(None, "owner_key_id", "created_at"),
        # Workers looking for queued jobs.
        Index(None, "state", "created_at"),
    )


class JobEvent(Base):
    """One progress or state-change record; the SSE stream replays them in id order."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the job
    state: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(32))
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # the job's attempt
    fraction: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any] | None] = mapped_column()
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "seq"), Index(None, "job_id", "id"))


class Artifact(Base):
    """A file a job produced (report, plots, ONNX, ...), stored in the blob store under ``blob_key``."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    blob_key: Mapped[str] = mapped_column(String(1024))
    content_type: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "name"),)


class WebhookDelivery(Base):
    """One webhook POST to make (an outbox row, written in the transaction of the state change it tells).

    A job's deliveries go out one at a time in ``id`` order: the next waits until this one is
    ``delivered`` or ``failed`` (attempts exhausted). ``payload`` is the job as it was at the event.
    """

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(32))  # one of store.webhooks.WEBHOOK_EVENTS
    url: Mapped[str] = mapped_column(String(2048))
    payload: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    claimed_until: Mapped[datetime | None] = mapped_column()  # a sender is on it until then
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index(None, "job_id", "id"), Index(None, "status", "next_attempt_at"))
