"""Request and response bodies of the /v1 API (pydantic v2). Responses are built from store rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.job import JobParams
from core.results import FormatResult
from store.models import model_files
from store.tables import Dataset, Job, JobEvent, Model
from store.webhooks import WEBHOOK_EVENTS

SAMPLE_DATASET_ID = "sample"
Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    items: list[Item]
    total: int
    limit: int
    offset: int

    @classmethod
    def of_rows(
        cls, session: Session, table: Any, where: list[Any], to_item: Any, limit: int, offset: int
    ) -> Page[Item]:
        """One page of `table`'s rows matching `where`, newest first (id breaks ties), as items."""
        total = session.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
        newest_first = select(table).where(*where).order_by(table.created_at.desc(), table.id)
        rows = session.execute(newest_first.limit(limit).offset(offset)).scalars()
        return cls(items=[to_item(row) for row in rows], total=total, limit=limit, offset=offset)


# --- models -----------------------------------------------------------------------------------------


class PresetOut(BaseModel):
    name: str
    family: str
    scale: int
    params: int
    macs: int
    gmacs: float
    lr_size: tuple[int, int]


class ModelOut(BaseModel):
    id: str
    name: str
    family: str
    scale: int
    config: dict[str, Any]
    source: str
    params: int | None
    macs: int | None
    metrics: dict[str, Any] | None
    weights_sha256: str | None
    files: list[str]
    formats: list[FormatResult] = Field(
        default_factory=list,
        description="deployable formats with their verification figures; those with ok=false are "
        "not offered (reason says why)",
    )
    created_at: datetime

    @classmethod
    def of(cls, row: Model) -> ModelOut:
        files = [name for name, key in model_files(row).items() if key]
        return cls(
            id=row.id,
            name=row.name,
            family=row.family,
            scale=row.scale,
            config=row.config or {},
            source=row.source,
            params=row.params,
            macs=row.macs,
            metrics=row.metrics,
            weights_sha256=row.weights_sha256,
            files=files,
            formats=row.formats or [],
            created_at=row.created_at,
        )


class DownloadOut(BaseModel):
    name: str
    url: str
    size: int | None = None
    expires_seconds: int | None = None


# --- datasets ---------------------------------------------------------------------------------------


class DatasetOut(BaseModel):
    id: str
    name: str
    kind: str
    image_count: int
    total_bytes: int
    builtin: bool
    created_at: datetime

    @classmethod
    def of(cls, row: Dataset) -> DatasetOut:
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            image_count=row.image_count,
            total_bytes=row.total_bytes,
            builtin=row.owner_key_id is None,
            created_at=row.created_at,
        )


# --- jobs -------------------------------------------------------------------------------------------


class JobCreate(JobParams):
    """core's JobParams, with the teacher and the data named by id instead of by path."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    teacher_model_id: str = Field(min_length=1, max_length=36, description="id of an uploaded model")
    train_dataset_ids: list[str] = Field(
        default_factory=lambda: [SAMPLE_DATASET_ID], min_length=1, max_length=16
    )
    val_dataset_ids: list[str] = Field(
        default_factory=lambda: [SAMPLE_DATASET_ID], min_length=1, max_length=16
    )
    # Service concerns, not core's: stored on the job row, never in its JobParams config.
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="http(s) URL POSTed (signed) on start, each stage, success, failure and cancellation",
    )
    webhook_events: list[Literal[WEBHOOK_EVENTS]] | None = Field(  # type: ignore[valid-type]
        None, min_length=1, max_length=len(WEBHOOK_EVENTS), description="the events to POST (default: all)"
    )

    def params(self) -> JobParams:
        return JobParams.model_validate(self.model_dump(include=set(JobParams.model_fields)))


class JobError(BaseModel):
    code: str | None
    message: str | None


class JobOut(BaseModel):
    id: str
    state: str
    stage: str | None
    progress: float
    config: dict[str, Any]
    teacher_model_id: str | None
    dataset_ids: list[Any]
    metrics: dict[str, Any] | None
    error: JobError | None
    result_model_id: str | None
    attempts: int
    cancel_requested: bool
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: Job) -> JobOut:
        error = None
        if row.error_code or row.error_message:
            error = JobError(code=row.error_code, message=row.error_message)
        return cls(
            id=row.id,
            state=row.state,
            stage=row.stage,
            progress=row.progress,
            config=row.config or {},
            teacher_model_id=row.teacher_model_id,
            dataset_ids=list(row.dataset_ids or []),
            metrics=row.metrics,
            error=error,
            result_model_id=row.result_model_id,
            attempts=row.attempts,
            cancel_requested=row.cancel_requested,
            webhook_url=row.webhook_url,
            webhook_events=row.webhook_events,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            updated_at=row.updated_at,
        )


class EventOut(BaseModel):
    id: int
    seq: int
    state: str
    stage: str | None
    attempt: int = Field(
        description="the job's attempt (1, 2, ... after a lost worker) this event belongs to"
    )
    fraction: float | None
    metrics: dict[str, Any] | None
    message: str | None
    created_at: datetime

    @classmethod
    def of(cls, row: JobEvent) -> EventOut:
        return cls(
            id=row.id,
            seq=row.seq,
            state=row.state,
            stage=row.stage,
            attempt=row.attempt,
            fraction=row.fraction,
            metrics=row.metrics,
            message=row.message,
            created_at=row.created_at,
        )


class ArtifactOut(BaseModel):
    name: str
    content_type: str
    size: int
    url: str
