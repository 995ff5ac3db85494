"""The webhook sender: a thread in every worker process that POSTs the deliveries of store.webhooks' outbox.

Each pass (``send_due``) claims the due deliveries (at most one per job: a job's events go out one at a
time, in order), signs each with its key's current secret and POSTs it. Before connecting, the URL's
host is resolved and every address checked again (``store.webhooks.check_webhook_url``), and the
connection goes to an address that passed the check, never to a second lookup (DNS rebinding).
Redirects are not followed. A 2xx answer delivers the event; anything else (another status, a refused
address, a timeout) is a failed attempt, recorded as a job event and retried with backoff until
``webhook_max_attempts``. Jobs never wait for any of this: it runs beside them, on committed rows.

Started with the Celery worker (``worker_ready``; worker/app.py includes this module), like the reaper.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from store import jobs, webhooks
from store.settings import Settings
from store.tables import WebhookDelivery, utcnow

log = logging.getLogger("srcompress.webhooks")

MAX_RESPONSE_BYTES = 64 * 1024  # read (and drop) at most this much of a receiver's answer
CLAIM_MARGIN_SECONDS = 30.0  # a claim outlives one POST by this much; then another sender may take it
_sender: WebhookSender | None = None  # this worker process's sender (set by worker_ready)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an address checked beforehand; the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, with SNI and certificate checks for the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls)
        self.address = address

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)


def post(url: str, body: bytes, headers: dict[str, str], settings: Settings) -> str | None:
    """POST ``body`` to ``url``; None when the receiver answered 2xx, else what went wrong."""
    try:
        host, port, addresses = webhooks.check_webhook_url(url, allow_private=settings.webhook_allow_private)
    except webhooks.WebhookUrlRefused as error:
        return f"refused: {error}"
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    error = "no address"
    for address in addresses:
        connection = kind(host, port, str(address), settings.webhook_timeout_seconds)
        try:
            connection.request("POST", target, body=body, headers=headers)
            response = connection.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as failure:
            error = f"{type(failure).__name__}: {failure}"  # try the host's next address, if any
        finally:
            connection.close()
    return error


def anything_due(sessions: sessionmaker[Session]) -> bool:
    """A cheap read first, so an idle sender never takes SQLite's write lock."""
    with sessions() as session:
        stmt = select(
            exists().where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
        )
        return bool(session.execute(stmt).scalar())


def send_due(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    read_sessions: sessionmaker[Session] | None = None,
    send: Any = post,
) -> int:
    """One pass: every delivery due now, one per job, sent in turn. Returns how many were attempted."""
    if not anything_due(read_sessions or sessions):
        return 0
    claim_seconds = settings.webhook_timeout_seconds + CLAIM_MARGIN_SECONDS
    with sessions.begin() as session:
        due = [
            (d.id, d.job_id, d.event, d.url, d.payload)
            for d in webhooks.claim_due(session, claim_seconds=claim_seconds)
        ]
    for delivery_id, job_id, event, url, payload in due:
        with sessions() as session:
            secret = webhooks.signing_secret(session, job_id)
        if secret is None:
            error: str | None = "the job's API key has no webhook secret (rotate one)"
        else:
            body = json.dumps(payload, separators=(",", ":")).encode()
            error = send(url, body, webhooks.signed_headers(secret, body, event, delivery_id), settings)
        _record(sessions, settings, delivery_id, error)
    return len(due)


def _record(sessions: sessionmaker[Session], settings: Settings, delivery_id: int, error: str | None) -> None:
    with sessions.begin() as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        if delivery is None:  # the job was deleted meanwhile
            return
        retry_in = webhooks.record_attempt(
            session,
            delivery,
            error,
            max_attempts=settings.webhook_max_attempts,
            first_delay=settings.webhook_retry_seconds,
        )
        if error is None:
            return
        then = f"retry in {retry_in:.1f} s" if retry_in is not None else "given up"
        message = (
            f"webhook {delivery.event} attempt {delivery.attempts}/{settings.webhook_max_attempts} "
            f"failed: {error[:300]}; {then}"
        )
        log.warning("job %s: %s", delivery.job_id, message)
        job = jobs.lock_job(session, delivery.job_id)
        if job is not None:
            details = {"delivery": delivery.id, "event": delivery.event, "attempt": delivery.attempts}
            jobs.append_event(
                session, job, metrics={"webhook": {**details, "status": delivery.status}}, message=message
            )


class WebhookSender(threading.Thread):
    """Calls ``send_due`` every ``webhook_poll_seconds`` until ``stop()``; errors are logged, not fatal."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: Settings,
        read_sessions: sessionmaker[Session] | None = None,
    ) -> None:
        super().__init__(name="srcompress-webhooks", daemon=True)
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.settings = settings
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.settings.webhook_poll_seconds):
            try:
                send_due(self.sessions, self.settings, read_sessions=self.read_sessions)
            except Exception:
                log.exception("webhook pass failed; retrying")

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=30)


@worker_ready.connect
def start_sender(**_kwargs: Any) -> None:
    global _sender
    from store.db import make_engine, read_session_factory, session_factory

    settings = Settings()
    engine = make_engine(settings.database_url)
    _sender = WebhookSender(session_factory(engine), settings, read_session_factory(engine))
    _sender.start()


@worker_shutdown.connect
def stop_sender(**_kwargs: Any) -> None:
    if _sender is not None:
        _sender.stop()
