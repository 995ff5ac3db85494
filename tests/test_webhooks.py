"""Webhooks against a real local receiver (an HTTP server in this process): signed with the key's secret
(and a replayed old timestamp refused by the documented check), one at a time per job in event order,
retried with backoff (a receiver failing twice gets the event on the third attempt, each failure a job
event), URLs checked at submit (422) and again at send time. The sender is worker/webhooks.py's, on
SQLite and on Postgres (service); the submit checks go through the real app (FastAPI's TestClient)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from store import jobs, webhooks
from store.apikeys import create_api_key
from store.db import init_db, make_engine, migrate, read_session_factory, session_factory
from store.settings import Settings
from store.tables import ApiKey, JobEvent, WebhookDelivery
from tests.service_helpers import REPO, unavailable, wait_for
from tests.stores import postgres_unavailable_reason, throwaway_postgres_database
from tests.webhook_receiver import Receiver, receiver_server
from worker.webhooks import WebhookSender, send_due

STAGES = ("preparing", "pruning", "compressing", "distilling", "evaluating", "exporting")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.service)])
def store(request, tmp_path):
    """(sessions, read_sessions, settings) on a fresh database (SQLite; a throwaway Postgres one, whose
    row locks the senders rely on); webhooks may reach 127.0.0.1."""
    with ExitStack() as stack:
        database_url = ""
        if request.param == "postgres":
            reason = postgres_unavailable_reason()
            if reason:
                unavailable(reason)
            database_url = stack.enter_context(throwaway_postgres_database())
        settings = Settings(
            data_dir=tmp_path,
            database_url=database_url,
            webhook_allow_private=True,
            webhook_retry_seconds=0.05,
            webhook_poll_seconds=0.05,
            webhook_timeout_seconds=5,
        )
        engine = make_engine(settings.database_url)
        init_db(engine)
        yield session_factory(engine), read_session_factory(engine), settings
        engine.dispose()


def new_job(sessions, url: str, events: list[str] | None = None) -> tuple[str, str]:
    """(job id, the owner key's webhook secret) of a queued job with a webhook."""
    with sessions.begin() as session:
        key, _ = create_api_key(session, "hooks")
        job, _ = jobs.create_job(
            session,
            config={"model": "rlfn_s", "scale": 2},
            owner_key_id=key.id,
            webhook_url=url,
            webhook_events=events,
        )
        return job.id, key.webhook_secret


def run_job(sessions, job_id: str, end: str = "succeeded") -> None:
    for state in (*STAGES, end):
        with sessions.begin() as session:
            jobs.transition(session, job_id, state)


@contextmanager
def sender(store) -> Iterator[WebhookSender]:
    sessions, read_sessions, settings = store
    thread = WebhookSender(sessions, settings, read_sessions)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def test_the_signature_verifies_and_a_replayed_old_timestamp_is_refused(store):
    sessions, _, settings = store
    receiver = Receiver()
    with receiver_server(receiver) as url:
        job_id, secret = new_job(sessions, url)
        with sessions.begin() as session:
            jobs.transition(session, job_id, "preparing")
        assert send_due(sessions, settings) == 1
    (request,) = receiver.requests
    headers, body = request["headers"], request["body"]
    timestamp, signature = headers[webhooks.TIMESTAMP_HEADER], headers[webhooks.SIGNATURE_HEADER]
    assert request["path"] == "/hooks/srcompress?team=1"
    assert headers[webhooks.EVENT_HEADER] == "job.started" and headers["Content-Type"] == "application/json"
    assert signature.startswith("v1=") and secret.startswith("whsec_")
    assert webhooks.verify_signature(secret, timestamp, signature, body)
    # The documented check refuses: an old request replayed later, another body, another secret.
    assert not webhooks.verify_signature(secret, timestamp, signature, body, now=int(timestamp) + 301)
    assert not webhooks.verify_signature(
        secret, timestamp, signature, body.replace(b"preparing", b"succeeded")
    )
    assert not webhooks.verify_signature("whsec_other", timestamp, signature, body)
    # Re-signing an old body with a fresh timestamp needs the secret: the old signature does not carry over.
    assert not webhooks.verify_signature(secret, str(int(timestamp) + 60), signature, body)

    payload = json.loads(body)
    assert payload["type"] == "job.started" and payload["job"]["id"] == job_id
    assert payload["job"]["state"] == "preparing" and payload["job"]["webhook_url"] == url


def test_the_body_is_the_job_resource():
    """The webhook's job is what GET /v1/jobs/{id} answers: the same fields, the same JSON values."""
    from api.schemas import JobOut
    from store.tables import Job, utcnow

    now = utcnow()
    job = Job(
        id="j",
        state="failed",
        stage="pruning",
        config={"scale": 2},
        dataset_ids=["sample"],
        progress=0.5,
        attempts=1,
        cancel_requested=False,
        error_code="internal",
        error_message="boom",
        created_at=now,
        updated_at=now,
        webhook_url="https://93.184.216.34/h",
        webhook_events=["job.failed"],
    )
    assert webhooks.job_resource(job) == JobOut.of(job).model_dump(mode="json")


def test_events_arrive_one_at_a_time_in_event_order(store):
    sessions, _, _ = store
    receiver = Receiver(delay=0.05)
    with receiver_server(receiver) as url:
        first, _ = new_job(sessions, url)
        second, _ = new_job(sessions, url)
        with sender(store):
            run_job(sessions, first)
            run_job(sessions, second, end="failed")
            wait_for(lambda: len(receiver.delivered()) == 14, 30, "14 deliveries")
    for job_id, end in ((first, "job.succeeded"), (second, "job.failed")):
        received = [p for p in receiver.delivered() if p["job"]["id"] == job_id]
        assert [p["type"] for p in received] == ["job.started", *["job.stage"] * 5, end]
        assert [p["job"]["state"] for p in received][:-1] == list(STAGES)
        # Each body is the job as it was at its event, in event order.
        assert [p["id"] for p in received] == sorted(
            (p["id"] for p in received), key=lambda i: int(i.split(".")[1])
        )
    # One at a time per job: two jobs may overlap, one job's events never do (checked per job below).
    with sessions() as session:
        for job_id in (first, second):
            rows = webhooks.deliveries(session, job_id)
            assert all(r.status == "delivered" and r.attempts == 1 for r in rows)
            sent = [r.delivered_at for r in rows]
            assert sent == sorted(sent)


def test_one_job_never_has_two_deliveries_in_flight(store):
    sessions, _, _ = store
    receiver = Receiver(delay=0.1)
    with receiver_server(receiver) as url:
        job_id, _ = new_job(sessions, url)
        run_job(sessions, job_id)  # all 7 events are due at once
        with sender(store), sender(store):  # two senders (two worker processes) compete
            wait_for(lambda: len(receiver.delivered()) == 7, 30, "7 deliveries")
    assert receiver.most_in_flight == 1
    assert [p["type"] for p in receiver.delivered()] == ["job.started", *["job.stage"] * 5, "job.succeeded"]


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_attempt(store):
    sessions, _, _ = store
    receiver = Receiver(statuses=[500, 503])
    with receiver_server(receiver) as url:
        job_id, _ = new_job(sessions, url)
        with sessions.begin() as session:
            jobs.transition(session, job_id, "preparing")
            jobs.transition(session, job_id, "pruning")
        with sender(store):
            wait_for(lambda: len(receiver.delivered()) == 2, 30, "both events delivered")
    attempts = receiver.requests
    assert [r["status"] for r in attempts] == [500, 503, 200, 200]
    # The same event three times, then the next one: a failing event holds back the job's later events.
    assert [json.loads(r["body"])["type"] for r in attempts] == ["job.started"] * 3 + ["job.stage"]
    assert len({r["headers"][webhooks.DELIVERY_HEADER] for r in attempts[:3]}) == 1
    with sessions() as session:
        first = webhooks.deliveries(session, job_id)[0]
        assert (first.status, first.attempts, first.last_error) == ("delivered", 3, None)
        messages = [e.message for e in jobs.events_after(session, job_id) if (e.metrics or {}).get("webhook")]
    assert len(messages) == 2
    assert messages[0].startswith("webhook job.started attempt 1/5 failed: HTTP 500; retry in 0.1 s")
    assert messages[1].startswith("webhook job.started attempt 2/5 failed: HTTP 503; retry in 0.1 s")


def test_after_the_last_attempt_the_event_is_given_up_and_the_next_one_goes(store):
    sessions, read_sessions, settings = store
    settings = settings.model_copy(update={"webhook_max_attempts": 2})
    receiver = Receiver(statuses=[500, 500])
    with receiver_server(receiver) as url:
        job_id, _ = new_job(sessions, url, events=["job.started", "job.canceled"])
        with sessions.begin() as session:
            jobs.transition(session, job_id, "preparing")
            jobs.transition(session, job_id, "pruning")  # job.stage: not wanted, not sent
            jobs.transition(session, job_id, "canceled")
        thread = WebhookSender(sessions, settings, read_sessions)
        thread.start()
        try:
            wait_for(lambda: len(receiver.requests) == 3, 30, "two failed attempts and the next event")
        finally:
            thread.stop()
    assert [json.loads(r["body"])["type"] for r in receiver.requests] == ["job.started"] * 2 + [
        "job.canceled"
    ]
    with sessions() as session:
        rows = webhooks.deliveries(session, job_id)
        assert [(r.event, r.status, r.attempts) for r in rows] == [
            ("job.started", "failed", 2),
            ("job.canceled", "delivered", 1),
        ]
        last = [e.message for e in jobs.events_after(session, job_id) if (e.metrics or {}).get("webhook")][-1]
    assert last.endswith("given up")


def test_the_address_is_checked_again_at_send_time(store):
    """A URL that passed at submit but resolves to a private address when sent is never connected to."""
    sessions, _, settings = store
    receiver = Receiver()
    with receiver_server(receiver) as url:
        job_id, _ = new_job(sessions, url)
        with sessions.begin() as session:
            jobs.transition(session, job_id, "preparing")
        strict = settings.model_copy(update={"webhook_allow_private": False})
        assert send_due(sessions, strict) == 1
    assert receiver.requests == []
    with sessions() as session:
        (row,) = webhooks.deliveries(session, job_id)
        assert row.status == "pending" and row.attempts == 1
        assert row.last_error.startswith(
            "refused: webhook_url host 127.0.0.1 is 127.0.0.1, a loopback address"
        )


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://93.184.216.34/hook", "must be http or https"),
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://localhost/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://192.168.0.10/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:10.0.0.1]/hook", "private"),
        ("http:///no-host", "names no host"),
        ("http://93.184.216.34:99999/hook", "bad port"),
    ],
)
def test_refused_urls(url, reason):
    with pytest.raises(webhooks.WebhookUrlRefused, match=reason):
        webhooks.check_webhook_url(url, allow_private=False)


def test_public_and_allowed_private_urls_pass():
    assert webhooks.check_webhook_url("https://93.184.216.34/x", allow_private=False)[:2] == (
        "93.184.216.34",
        443,
    )
    assert webhooks.check_webhook_url("http://127.0.0.1:9/x", allow_private=True)[1] == 9


# --- through the API --------------------------------------------------------------------------------


def teacher_id(client) -> str:
    import torch

    from core.models.build import create_model

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(create_model("rlfn_s", 2).state_dict(), buffer)
    response = client.post("/v1/models", files={"file": ("teacher.pth", buffer.getvalue())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_submit_refuses_bad_webhooks_with_422_and_stores_a_good_one_beside_the_params(app_client):
    client, _, _, _ = app_client
    body = {"model": "rlfn_s", "scale": 2, "teacher_model_id": teacher_id(client), "distill_iters": 2}
    for url, code in [
        ("http://127.0.0.1:9/hook", "webhook_url_refused"),
        ("http://10.0.0.7/hook", "webhook_url_refused"),
        ("file:///etc/passwd", "webhook_url_refused"),
    ]:
        refused = client.post("/v1/jobs", json={**body, "webhook_url": url})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == code
    bad_event = client.post(
        "/v1/jobs", json={**body, "webhook_url": "http://93.184.216.34/h", "webhook_events": ["x"]}
    )
    assert bad_event.status_code == 422
    assert client.post("/v1/jobs", json={**body, "webhook_events": ["job.failed"]}).status_code == 422
    assert client.get("/v1/jobs").json()["total"] == 0  # nothing was stored

    accepted = client.post(
        "/v1/jobs",
        json={**body, "webhook_url": "http://93.184.216.34/h", "webhook_events": ["job.succeeded"]},
    )
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert job["webhook_url"] == "http://93.184.216.34/h" and job["webhook_events"] == ["job.succeeded"]
    # A service concern: not in the job's JobParams config, which is what the worker runs.
    assert not {"webhook_url", "webhook_events"} & set(job["config"])
    assert client.get(f"/v1/jobs/{job['id']}/webhooks").json() == []


def test_a_key_without_a_secret_is_told_how_to_get_one(app_client):
    client, key_id, _, engine = app_client
    with session_factory(engine).begin() as session:
        session.get(ApiKey, key_id).webhook_secret = None  # a key made before webhooks existed
    body = {"model": "rlfn_s", "scale": 2, "teacher_model_id": "x", "webhook_url": "http://93.184.216.34/h"}
    refused = client.post("/v1/jobs", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "webhook_secret_missing"
    assert "POST /v1/webhooks/secret" in refused.json()["error"]["message"]


def test_the_secret_rotates_through_the_api_and_the_cli(app_client, tmp_path):
    client, key_id, secret, engine = app_client
    rotated = client.post("/v1/webhooks/secret")
    assert rotated.status_code == 201, rotated.text
    new_secret = rotated.json()["secret"]
    assert new_secret.startswith("whsec_") and new_secret != secret
    with session_factory(engine)() as session:
        assert session.get(ApiKey, key_id).webhook_secret == new_secret

    env = {**os.environ, "SRCOMPRESS_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "srcompress", "keys", "rotate-webhook-secret", key_id]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=True)
    from_cli = result.stdout.strip()
    assert from_cli.startswith("whsec_") and from_cli not in (secret, new_secret)
    with session_factory(engine)() as session:
        assert session.get(ApiKey, key_id).webhook_secret == from_cli
    missing = subprocess.run(
        [*command[:-1], "no-such-key"], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no active API key" in missing.stderr


def test_deliveries_cascade_with_their_job(store):
    sessions, _, _ = store
    job_id, _ = new_job(sessions, "http://127.0.0.1:9/h")
    with sessions.begin() as session:
        jobs.transition(session, job_id, "preparing")
    with sessions.begin() as session:
        assert session.query(WebhookDelivery).count() == 1 and session.query(JobEvent).count() == 2
        session.delete(session.get(jobs.Job, job_id))
    with sessions() as session:
        assert session.query(WebhookDelivery).count() == 0


def test_migration_0004_matches_the_tables(tmp_path: Path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from store.tables import Base

    url = f"sqlite:///{tmp_path / 'm.db'}"
    migrate(url)
    engine = make_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()
    from alembic import command

    from store.db import alembic_config

    command.downgrade(alembic_config(url), "0003")  # the way back works too
    migrate(url)
