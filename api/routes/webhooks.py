"""Webhooks: rotate the caller's signing secret (shown once), and list a job's deliveries (what was
sent, how often, and what went wrong). How webhooks are signed and sent: store/webhooks.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.crud import owned_job
from api.deps import CurrentCaller, ReadSession, ServicesDep
from api.errors import ApiError, error_responses
from store.apikeys import rotate_webhook_secret
from store.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, deliveries

router = APIRouter(prefix="/v1", tags=["webhooks"], responses=error_responses(401, 404))


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="shown only in this answer; store it where your receiver can read it")
    key_id: str
    signature_header: str = SIGNATURE_HEADER
    timestamp_header: str = TIMESTAMP_HEADER


class DeliveryOut(BaseModel):
    id: int
    event: str
    url: str
    status: str = Field(description="pending | delivered | failed (attempts exhausted)")
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    delivered_at: datetime | None


@router.post(
    "/webhooks/secret",
    status_code=201,
    response_model=WebhookSecretOut,
    summary="Rotate the caller's webhook signing secret",
)
def rotate_secret(services: ServicesDep, caller: CurrentCaller) -> Any:
    """A new secret signs every webhook of this key from now on (retries of earlier events too); the
    old one stops at once. The secret is in this answer only."""
    with services.sessions.begin() as session:
        secret = rotate_webhook_secret(session, caller.key_id)
    if secret is None:  # revoked between authentication and here
        raise ApiError(401, "unauthorized", "invalid or revoked API key")
    return WebhookSecretOut(secret=secret, key_id=caller.key_id)


@router.get("/jobs/{job_id}/webhooks", response_model=list[DeliveryOut], summary="A job's webhook deliveries")
def list_deliveries(job_id: str, session: ReadSession, caller: CurrentCaller) -> Any:
    owned_job(session, caller, job_id)
    return [DeliveryOut.model_validate(row, from_attributes=True) for row in deliveries(session, job_id)]
