"""Webhooks: which state changes a job tells its ``webhook_url``, how a POST is signed and verified, which
URLs may receive one, and the outbox the sender (worker/webhooks.py) works through.

Events: ``job.started`` (a worker took the job: queued -> preparing, again after a re-queue),
``job.stage`` (each later stage), ``job.succeeded``, ``job.failed``, ``job.canceled``. The body is
``{"id", "type", "created_at", "job"}`` where ``job`` is the job resource as ``GET /v1/jobs/{id}`` shows
it, as it was at the event.

Delivery is a transactional outbox: ``store.jobs.transition`` calls ``record_event`` in the transaction
of the state change, so an event is stored exactly when the change is, and the job never waits for a
receiver. A job's deliveries go out one at a time in event order (``claim_due`` only hands out the
oldest unfinished delivery of each job), each retried with exponential backoff up to
``webhook_max_attempts`` times.

Signatures (as Stripe and Replicate do): ``Srcompress-Timestamp: <unix seconds>`` and
``Srcompress-Signature: v1=<hex HMAC-SHA256 of "{timestamp}.{body}" under the key's webhook secret>``.
A receiver recomputes it over the raw body and refuses a timestamp older than a few minutes, so that a
captured request cannot be replayed later: ``verify_signature`` is that check.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic_core import to_jsonable_python
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core.errors import UserError
from store.tables import ApiKey, Job, JobEvent, WebhookDelivery, utcnow

WEBHOOK_EVENTS = ("job.started", "job.stage", "job.succeeded", "job.failed", "job.canceled")
TIMESTAMP_HEADER = "Srcompress-Timestamp"
SIGNATURE_HEADER = "Srcompress-Signature"
EVENT_HEADER = "Srcompress-Event"
DELIVERY_HEADER = "Srcompress-Delivery"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_SECONDS = 300  # what verify_signature accepts between signing and checking
MAX_RETRY_DELAY_SECONDS = 3600.0
DELIVERY_STATUSES = ("pending", "delivered", "failed")


class WebhookUrlRefused(UserError):
    """A webhook URL that may not receive requests (scheme, host, or an address not on the internet)."""


# --- signing ------------------------------------------------------------------------------------------


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for ``body`` sent at ``timestamp`` (unix seconds)."""
    message = str(int(timestamp)).encode() + b"." + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """The receiver's check: the headers' signature matches ``body`` under ``secret`` and the timestamp
    is within ``tolerance_seconds`` of ``now`` (a replayed old request fails here even though its
    signature is genuine). Compares in constant time; several ``v1=`` values (comma-separated) may be sent."""
    if not timestamp or not signature:
        return False
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent_at) > tolerance_seconds:
        return False
    expected = sign(secret, sent_at, body)
    return any(hmac.compare_digest(expected, candidate.strip()) for candidate in signature.split(","))


def signed_headers(secret: str, body: bytes, event: str, delivery_id: int, now: float | None = None) -> dict:
    """Every header of a webhook POST."""
    timestamp = int(time.time() if now is None else now)
    return {
        "Content-Type": "application/json",
        "User-Agent": "srcompress-webhooks/1",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        EVENT_HEADER: event,
        DELIVERY_HEADER: str(delivery_id),
    }


# --- which URLs ---------------------------------------------------------------------------------------


def refusal_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not go to ``address`` (None: it is a public internet address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for reason, flag in (
        # The most specific name first: loopback and link-local addresses are private ones too.
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("unspecified", address.is_unspecified),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if flag:
            return reason
    return None if address.is_global else "not globally routable"


def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as error:  # unknown name, too long a label, a NUL
        raise WebhookUrlRefused(f"webhook host {host!r} does not resolve: {error}") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


def check_webhook_url(
    url: str, *, allow_private: bool
) -> tuple[str, int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(host, port, addresses) of a URL a webhook may go to, else WebhookUrlRefused. Run at submit time
    and again before every send: a name may resolve elsewhere by then (DNS rebinding), so the sender
    connects to the addresses checked here, never to a second lookup."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlRefused(f"webhook_url must be http or https, got {parts.scheme or 'no'} scheme")
    try:
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:  # a port out of range or not a number
        raise WebhookUrlRefused(f"webhook_url has a bad port: {error}") from None
    if not host:
        raise WebhookUrlRefused("webhook_url names no host")
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = refusal_reason(address)
            if reason:
                raise WebhookUrlRefused(
                    f"webhook_url host {host} is {address}, a {reason} address; webhooks go to public "
                    "addresses only (SRCOMPRESS_WEBHOOK_ALLOW_PRIVATE=true allows others)"
                )
    return host, port, addresses


# --- the outbox ---------------------------------------------------------------------------------------


def event_for(old_state: str, new_state: str) -> str | None:
    """The webhook event of a state change (None: a re-queue, which tells nothing new)."""
    if new_state == "queued":
        return None
    if f"job.{new_state}" in WEBHOOK_EVENTS:  # succeeded, failed, canceled
        return f"job.{new_state}"
    return "job.started" if old_state == "queued" else "job.stage"


def job_resource(job: Job) -> dict[str, Any]:
    """The job as ``GET /v1/jobs/{id}`` shows it (api.schemas.JobOut; a test keeps the two alike)."""
    error = None
    if job.error_code or job.error_message:
        error = {"code": job.error_code, "message": job.error_message}
    resource = {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": job.progress,
        "config": job.config or {},
        "teacher_model_id": job.teacher_model_id,
        "dataset_ids": list(job.dataset_ids or []),
        "metrics": job.metrics,
        "error": error,
        "result_model_id": job.result_model_id,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "webhook_url": job.webhook_url,
        "webhook_events": job.webhook_events,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "updated_at": job.updated_at,
    }
    return to_jsonable_python(resource)


def record_event(session: Session, job: Job, old_state: str, event: JobEvent) -> WebhookDelivery | None:
    """Store the delivery a state change owes the job's webhook, if it has one and wants this event."""
    name = event_for(old_state, job.state)
    if not job.webhook_url or name is None or (job.webhook_events and name not in job.webhook_events):
        return None
    payload = {
        "id": f"{job.id}.{event.seq}",
        "type": name,
        "created_at": to_jsonable_python(event.created_at),
        "job": job_resource(job),
    }
    delivery = WebhookDelivery(
        job_id=job.id,
        event=name,
        url=job.webhook_url,
        payload=payload,
        status="pending",
        attempts=0,
        next_attempt_at=event.created_at,
        created_at=event.created_at,
    )
    session.add(delivery)
    session.flush()
    return delivery


def claim_due(
    session: Session, *, claim_seconds: float, limit: int = 20, now: datetime | None = None
) -> list[WebhookDelivery]:
    """Claim the deliveries due now, at most one per job (its oldest unfinished one), for
    ``claim_seconds``: another sender skips them meanwhile, and takes them over if this one dies."""
    now = now or utcnow()
    heads = (
        select(func.min(WebhookDelivery.id))
        .where(WebhookDelivery.status == "pending")
        .group_by(WebhookDelivery.job_id)
    )
    stmt = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(heads),
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.claimed_until.is_(None), WebhookDelivery.claimed_until < now),
        )
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    due = list(session.execute(stmt).scalars())
    for delivery in due:
        delivery.claimed_until = now + timedelta(seconds=claim_seconds)
    session.flush()
    return due


def signing_secret(session: Session, job_id: str) -> str | None:
    """The webhook secret of the key that owns the job (None: the key is gone or has none)."""
    stmt = select(ApiKey.webhook_secret).join(Job, Job.owner_key_id == ApiKey.id).where(Job.id == job_id)
    return session.execute(stmt).scalar_one_or_none()


def retry_delay(attempts: int, first_delay: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: first_delay, x2, x4, ..."""
    return min(first_delay * 2 ** max(attempts - 1, 0), MAX_RETRY_DELAY_SECONDS)


def record_attempt(
    session: Session,
    delivery: WebhookDelivery,
    error: str | None,
    *,
    max_attempts: int,
    first_delay: float,
    now: datetime | None = None,
) -> float | None:
    """Store how an attempt went: delivered (``error`` None), retried later, or failed for good once
    ``max_attempts`` were made. Returns the seconds until the retry (None: no retry)."""
    now = now or utcnow()
    delivery.attempts += 1
    delivery.claimed_until = None
    delivery.last_error = error
    if error is None:
        delivery.status, delivery.delivered_at = "delivered", now
        session.flush()
        return None
    if delivery.attempts >= max_attempts:
        delivery.status = "failed"
        session.flush()
        return None
    delay = retry_delay(delivery.attempts, first_delay)
    delivery.next_attempt_at = now + timedelta(seconds=delay)
    session.flush()
    return delay


def deliveries(session: Session, job_id: str) -> list[WebhookDelivery]:
    """A job's deliveries in event order."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
    return list(session.execute(stmt).scalars())
