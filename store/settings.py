"""Service settings, read from the environment (prefix ``SRCOMPRESS_``) or passed explicitly.

Everything has a default that needs no server: SQLite for the database, a directory for blobs and a
SQLite-backed kombu transport for Celery, all under ``data_dir`` (``./.srcompress``). Production points
``database_url`` at Postgres, ``blob_backend`` at S3 and ``broker_url`` at Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1024 * 1024
GIB = 1024 * MIB


def default_data_dir() -> Path:
    """``./.srcompress`` under the working directory, made absolute so derived URLs stay valid."""
    return Path.cwd() / ".srcompress"


class Settings(BaseSettings):
    """All knobs of the API, the workers and the storage layer. ``Settings()`` reads the environment."""

    model_config = SettingsConfigDict(env_prefix="SRCOMPRESS_", extra="ignore", validate_default=True)

    # --- where things live -------------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Root of the embedded defaults: SQLite database, local blobs, broker, work dirs.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL. Empty: sqlite:///<data_dir>/srcompress.db. Production: "
        "postgresql+psycopg://user@host:5432/db (schema managed by Alembic).",
    )
    work_dir: Path | None = Field(
        default=None,
        description="Scratch directory for job work dirs on a worker. Empty: <data_dir>/work.",
    )

    # --- blobs -------------------------------------------------------------------------------------
    blob_backend: Literal["local", "s3"] = Field(
        default="local", description="'local' stores blobs under blob_dir; 's3' in s3_bucket."
    )
    blob_dir: Path | None = Field(
        default=None, description="Root directory of the local blob store. Empty: <data_dir>/blobs."
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint (MinIO, moto, ...); None means AWS's default endpoint for s3_region.",
    )
    s3_bucket: str = Field(default="srcompress", description="Bucket for all blobs; created if missing.")
    s3_access_key: SecretStr | None = Field(
        default=None, description="S3 access key id; None falls back to boto3's credential chain."
    )
    s3_secret_key: SecretStr | None = Field(
        default=None, description="S3 secret access key; None falls back to boto3's credential chain."
    )
    s3_region: str = Field(default="us-east-1", description="S3 region (also used to sign URLs).")

    # --- queue -------------------------------------------------------------------------------------
    broker_url: str = Field(
        default="",
        description="Celery broker URL. Empty: sqla+sqlite:///<data_dir>/broker.db (kombu's SQLAlchemy "
        "transport, needs no server). Production: redis://127.0.0.1:6379/0.",
    )

    # --- job leases and retries --------------------------------------------------------------------
    lease_seconds: int = Field(
        default=60, gt=0, description="A worker's claim on a job lasts this long unless renewed."
    )
    heartbeat_seconds: int = Field(
        default=10, gt=0, description="How often a worker renews its lease (must be < lease_seconds)."
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="A job whose worker vanished is re-queued until it has been "
        "started this many times, then failed with error code 'worker_lost'.",
    )
    max_running_jobs_per_key: int = Field(
        default=2, ge=1, description="Unfinished (queued or running) jobs one API key may have."
    )
    checkpoint_retention_seconds: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        description="How long a finished job's checkpoints/work dir stay in blob storage.",
    )
    idempotency_ttl_seconds: int = Field(
        default=86400, ge=0, description="An Idempotency-Key replays the same job for this long."
    )

    # --- uploads and /upscale ----------------------------------------------------------------------
    max_upload_bytes: int = Field(default=20 * MIB, gt=0, description="Largest accepted upload (20 MiB).")
    max_pixels: int = Field(
        default=4096 * 4096, gt=0, description="Largest accepted input image, width x height (16 MP)."
    )
    upscale_concurrency: int = Field(
        default=1, ge=1, description="/upscale inferences that run at the same time in one API process."
    )
    upscale_queue: int = Field(
        default=8, ge=0, description="/upscale requests that may wait for a slot before 503 is returned."
    )
    model_cache_bytes: int = Field(
        default=1 * GIB, ge=0, description="Memory budget of the loaded-model LRU cache for /upscale."
    )
    upscale_backend: Literal["auto", "eager", "channels_last", "sdpa", "bf16", "fp16", "onnxruntime"] = Field(
        default="auto",
        description="/upscale inference path. auto: a model is served eagerly until the fastest path within "
        "0.05 dB of fp32 has been measured for it (once per model and machine, in the background; the "
        "decision is cached under data_dir/cache). A model's exported formats (int8, fp16, OpenVINO, "
        "NCNN) are candidates too when their recorded quality cost is within "
        "upscale_max_quality_cost_db.",
    )
    upscale_max_quality_cost_db: float = Field(
        default=0.05,
        ge=0,
        description="An exported format serves /upscale automatically only if it loses at most this much "
        "PSNR-Y against fp32 (its recorded quality_cost_db); precision=int8 opts in whatever the cost.",
    )

    # --- webhooks (store.webhooks, worker/webhooks.py) ---------------------------------------------------
    webhook_allow_private: bool = Field(
        default=False,
        description="Let webhooks go to loopback, private, link-local and other non-public addresses "
        "(a local receiver in development or tests). Off: such URLs are refused at submit and at send time.",
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, description="POSTs of one webhook event before it is given up (recorded as failed)."
    )
    webhook_retry_seconds: float = Field(
        default=5.0, gt=0, description="Wait before the first retry of a failed webhook; doubles per attempt."
    )
    webhook_timeout_seconds: float = Field(
        default=10.0, gt=0, description="How long one webhook POST may take (connect + response)."
    )
    webhook_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often a worker's webhook sender looks for due deliveries."
    )

    @model_validator(mode="after")
    def _fill_derived_paths(self) -> Settings:
        # Derived defaults depend on data_dir, which may itself come from the environment.
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'srcompress.db'}"
        if self.blob_dir is None:
            self.blob_dir = self.data_dir / "blobs"
        if self.work_dir is None:
            self.work_dir = self.data_dir / "work"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than lease_seconds "
                f"({self.lease_seconds}), or every lease expires between two heartbeats"
            )
        return self
