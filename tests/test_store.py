"""Settings, engine setup, tables and the job state machine, on SQLite and on a real Postgres."""

import os
import threading
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from store import apikeys, jobs, leases
from store.db import init_db, make_engine, read_session_factory, session_factory
from store.settings import Settings
from store.tables import Base, Job, JobEvent, Model
from tests.service_helpers import unavailable
from tests.stores import postgres_unavailable_reason, throwaway_postgres_database

pytestmark = [pytest.mark.service]  # needs PostgreSQL/Redis/S3 or starts processes

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
LEASE = 60


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_url():
    reason = postgres_unavailable_reason()
    if reason:
        unavailable(reason)
    with throwaway_postgres_database() as url:
        engine = make_engine(url)
        init_db(engine)
        engine.dispose()
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
        init_db(engine)
    else:
        engine = make_engine(request.getfixturevalue("postgres_url"))
        with engine.begin() as connection:  # a clean slate per test in the module's database
            names = ", ".join(table.name for table in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names} CASCADE"))
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine):
    return session_factory(engine)


def new_job(sessions, **kwargs) -> str:
    with sessions.begin() as session:
        job, created = jobs.create_job(session, config={"preset": "edsr-baseline"}, now=T0, **kwargs)
        assert created
        return job.id


def states_of_events(session: Session, job_id: str) -> list[tuple[int, str]]:
    rows = session.execute(
        select(JobEvent.seq, JobEvent.state).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    )
    return [tuple(row) for row in rows]


# --- settings and engine ----------------------------------------------------------------------------


def test_settings_defaults_need_no_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("SRCOMPRESS_")]:
        monkeypatch.delenv(name)
    settings = Settings()
    data_dir = tmp_path.resolve() / ".srcompress"
    assert settings.data_dir == data_dir
    assert settings.database_url == f"sqlite:///{data_dir / 'srcompress.db'}"
    assert settings.blob_backend == "local" and settings.blob_dir == data_dir / "blobs"
    assert settings.broker_url.startswith("sqla+sqlite:///")
    assert (settings.lease_seconds, settings.heartbeat_seconds, settings.max_attempts) == (60, 10, 3)
    assert settings.max_running_jobs_per_key == 2 and settings.idempotency_ttl_seconds == 86400
    assert settings.max_upload_bytes == 20 * 2**20 and settings.max_pixels == 4096 * 4096
    assert (settings.upscale_concurrency, settings.upscale_queue) == (1, 8)
    undocumented = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undocumented == []


def test_settings_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SRCOMPRESS_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("SRCOMPRESS_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    monkeypatch.setenv("SRCOMPRESS_BLOB_BACKEND", "s3")
    monkeypatch.setenv("SRCOMPRESS_S3_SECRET_KEY", "hidden")
    monkeypatch.setenv("SRCOMPRESS_LEASE_SECONDS", "30")
    settings = Settings()
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.blob_backend == "s3" and settings.lease_seconds == 30
    assert settings.blob_dir == (tmp_path / "d" / "blobs").resolve()
    assert "hidden" not in repr(settings) and settings.s3_secret_key.get_secret_value() == "hidden"
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings(lease_seconds=10, heartbeat_seconds=10)
    with pytest.raises(ValidationError):
        Settings(blob_backend="ftp")


def test_sqlite_connections_get_wal_foreign_keys_and_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")  # the folder is created
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


def test_datetimes_come_back_aware_utc(sessions):
    tokyo = timezone(timedelta(hours=9))
    with sessions.begin() as session:
        model = Model(name="m", family="edsr", scale=2, source="upload", created_at=T0.astimezone(tokyo))
        session.add(model)
    with sessions() as session:
        loaded = session.get(Model, model.id)
        assert loaded.created_at == T0 and loaded.created_at.utcoffset() == timedelta(0)
        assert loaded.config == {} and loaded.deleted_at is None
    with pytest.raises(Exception, match="naive datetime"), sessions.begin() as session:
        session.add(Model(name="n", family="edsr", scale=2, source="upload", created_at=datetime(2026, 1, 1)))


def test_deleting_a_job_cascades_to_its_events(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as session:
        session.delete(session.get(Job, job_id))
    with sessions() as session:
        assert session.execute(select(JobEvent).where(JobEvent.job_id == job_id)).first() is None


def test_api_keys_store_only_a_hash(sessions):
    with sessions.begin() as session:
        row, raw = apikeys.create_api_key(session, "ci")
    assert raw.startswith(f"src_{row.prefix}_") and row.key_hash != raw and len(row.key_hash) == 64
    with sessions.begin() as session:
        assert apikeys.find_api_key(session, raw).id == row.id
        assert apikeys.find_api_key(session, raw + "x") is None
        assert apikeys.revoke_api_key(session, row.id)
    with sessions() as session:
        assert apikeys.find_api_key(session, raw) is None


# --- state machine ----------------------------------------------------------------------------------


def test_transition_table():
    assert jobs.allowed_transitions("queued") == (*jobs.RUNNING_STATES, "failed", "canceled")
    assert jobs.is_allowed("pruning", "compressing") and jobs.is_allowed("pruning", "distilling")
    assert jobs.is_allowed("distilling", "queued") and jobs.is_allowed("exporting", "succeeded")
    assert not jobs.is_allowed("distilling", "pruning")  # never backwards
    assert not jobs.is_allowed("pruning", "pruning")
    assert not jobs.is_allowed("queued", "succeeded")  # nothing ran
    for final in jobs.TERMINAL_STATES:
        assert jobs.allowed_transitions(final) == ()
    with pytest.raises(ValueError):
        jobs.allowed_transitions("paused")


def test_full_run_appends_one_event_per_change(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as session:
        assert leases.claim(session, job_id, "w1", LEASE, now=T0)
        assert session.get(Job, job_id).state == "preparing"  # claimed: out of queued at once
        for minute, stage in enumerate(jobs.STAGES, start=1):
            job = jobs.transition(session, job_id, stage, worker_id="w1", now=T0 + timedelta(minutes=minute))
            assert (job.state, job.stage, job.progress) == (stage, stage, 0.0)
        jobs.report_progress(session, job_id, 1.7, worker_id="w1", metrics={"psnr": 37.9}, now=T0)
        finished = T0 + timedelta(minutes=10)
        jobs.transition(session, job_id, "succeeded", worker_id="w1", metrics={"psnr": 37.9}, now=finished)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job.state == "succeeded" and job.progress == 1.0 and job.metrics == {"psnr": 37.9}
        assert job.lease_owner is None and job.lease_expires_at is None and job.attempts == 1
        assert job.started_at == T0 and job.finished_at == T0 + timedelta(minutes=10)
        events = states_of_events(session, job_id)
        expected_states = ["queued", *jobs.RUNNING_STATES, jobs.STAGES[-1], "succeeded"]
        assert events == list(enumerate(expected_states, start=1))
        progress = jobs.events_after(session, job_id)[-2]
        assert (progress.fraction, progress.metrics, progress.stage) == (1.0, {"psnr": 37.9}, jobs.STAGES[-1])


def test_illegal_transitions_are_rejected_and_change_nothing(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as session:
        jobs.transition(session, job_id, "distilling", now=T0)
    for bad in ("pruning", "distilling", "no-such-state"):
        with pytest.raises(jobs.IllegalTransition), sessions.begin() as session:
            jobs.transition(session, job_id, bad, now=T0)
    with sessions.begin() as session:
        jobs.transition(session, job_id, "failed", error_code="oom", error_message="CUDA OOM", now=T0)
    with (
        pytest.raises(jobs.IllegalTransition, match="from failed to evaluating"),
        sessions.begin() as session,
    ):
        jobs.transition(session, job_id, "evaluating", now=T0)
    with pytest.raises(jobs.JobNotFound), sessions.begin() as session:
        jobs.transition(session, "no-such-job", "pruning", now=T0)
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.stage, job.error_code) == ("failed", "distilling", "oom")
        assert states_of_events(session, job_id) == [(1, "queued"), (2, "distilling"), (3, "failed")]


def test_a_worker_without_the_lease_cannot_write(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as session:
        assert leases.claim(session, job_id, "w1", LEASE, now=T0)
        jobs.transition(session, job_id, "pruning", worker_id="w1", now=T0)
    with pytest.raises(jobs.LeaseLost), sessions.begin() as session:
        jobs.transition(session, job_id, "compressing", worker_id="w2", now=T0)
    with pytest.raises(jobs.LeaseLost), sessions.begin() as session:
        jobs.report_progress(session, job_id, 0.5, worker_id="w2", now=T0)
    with pytest.raises(jobs.LeaseLost), sessions.begin() as session:
        leases.heartbeat(session, job_id, "w2", LEASE, now=T0)
    with sessions() as session:
        assert session.get(Job, job_id).state == "pruning"


def test_sse_replay_returns_events_after_an_id(sessions):
    job_id = new_job(sessions)
    other_id = new_job(sessions)
    with sessions.begin() as session:
        jobs.transition(session, job_id, "pruning", now=T0)
        for step in range(1, 4):
            jobs.report_progress(session, job_id, step / 4, message=f"step {step}", now=T0)
    with sessions() as session:
        everything = jobs.events_after(session, job_id)
        assert [e.seq for e in everything] == [1, 2, 3, 4, 5] and all(e.job_id == job_id for e in everything)
        later = jobs.events_after(session, job_id, after_id=everything[2].id)
        assert [(e.fraction, e.message) for e in later] == [(0.5, "step 2"), (0.75, "step 3")]
        assert len(jobs.events_after(session, other_id)) == 1


def test_idempotency_key_replays_or_conflicts(sessions):
    with sessions.begin() as session:
        key, _ = apikeys.create_api_key(session, "client")
    first = dict(owner_key_id=key.id, idempotency_key="abc", request_hash="h1", idempotency_ttl_seconds=3600)
    with sessions.begin() as session:
        job, created = jobs.create_job(session, config={}, now=T0, **first)
        assert created
    with sessions.begin() as session:
        again, created = jobs.create_job(session, config={}, now=T0 + timedelta(minutes=59), **first)
        assert (again.id, created) == (job.id, False)
    with pytest.raises(jobs.IdempotencyConflict), sessions.begin() as session:
        jobs.create_job(session, config={}, now=T0, **{**first, "request_hash": "h2"})
    with sessions.begin() as session:  # after the TTL the key starts a new job
        fresh, created = jobs.create_job(session, config={}, now=T0 + timedelta(hours=2), **first)
        assert created and fresh.id != job.id
        assert jobs.count_active_jobs(session, key.id) == 2


def test_concurrent_requests_with_one_idempotency_key_make_one_job(sessions):
    with sessions.begin() as session:
        key, _ = apikeys.create_api_key(session, "client")
    request = dict(owner_key_id=key.id, idempotency_key="same", request_hash="h", config={}, now=T0)
    session_a = sessions()
    session_a.begin()
    job_a, created_a = jobs.create_job(session_a, **request)
    results = {}

    def second_request():
        with sessions.begin() as session_b:
            job_b, created_b = jobs.create_job(session_b, **request)
            results["b"] = (job_b.id, created_b)

    thread = threading.Thread(target=second_request)
    thread.start()
    thread.join(0.3)
    session_a.commit()
    session_a.close()
    thread.join(30)
    assert created_a and results["b"] == (job_a.id, False)
    with sessions() as session:
        assert jobs.count_active_jobs(session, key.id) == 1


# --- leases -----------------------------------------------------------------------------------------


def test_only_one_of_two_concurrent_claims_wins(sessions, engine):
    """Session A claims and keeps its transaction open; B's claim must wait for A, then lose."""
    job_id = new_job(sessions)
    read_sessions = read_session_factory(engine)
    results = {}
    session_a = sessions()
    session_a.begin()
    results["a"] = leases.claim(session_a, job_id, "worker-a", LEASE, now=T0)

    def claim_b():
        with sessions.begin() as session_b:
            results["b"] = leases.claim(session_b, job_id, "worker-b", LEASE, now=T0)

    thread = threading.Thread(target=claim_b)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()  # B waits for A: on A's row lock (Postgres) or the write lock (SQLite)
    with read_sessions() as reader:  # readers are not blocked meanwhile and do not see A's claim
        assert reader.get(Job, job_id).lease_owner is None
    session_a.commit()
    session_a.close()
    thread.join(30)
    assert not thread.is_alive()
    assert results == {"a": True, "b": False}
    with sessions() as session:
        job = session.get(Job, job_id)
        assert (job.lease_owner, job.attempts) == ("worker-a", 1)


def test_racing_claimers_have_exactly_one_winner(sessions):
    job_id = new_job(sessions)
    barrier = threading.Barrier(4)
    winners, errors = [], []

    def worker(name):
        try:
            barrier.wait()
            with sessions.begin() as session:
                if leases.claim(session, job_id, name, LEASE, now=T0):
                    winners.append(name)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(winners) == 1


def test_claim_next_hands_out_distinct_jobs(sessions):
    first, second = new_job(sessions), new_job(sessions)
    session_a = sessions()
    session_a.begin()
    got_a = leases.claim_next(session_a, "a", LEASE, now=T0)
    got = {}

    def other():
        with sessions.begin() as session_b:
            job = leases.claim_next(session_b, "b", LEASE, now=T0)
            got["b"] = job.id if job else None

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(0.3)
    session_a.commit()
    session_a.close()
    thread.join(30)
    assert {got_a.id, got["b"]} == {first, second}
    with sessions.begin() as session:
        assert leases.claim_next(session, "c", LEASE, now=T0) is None


def test_heartbeat_renews_the_lease_and_reports_cancel(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as session:
        leases.claim(session, job_id, "w1", LEASE, now=T0)
        jobs.transition(session, job_id, "distilling", worker_id="w1", now=T0)
        assert leases.heartbeat(session, job_id, "w1", LEASE, now=T0 + timedelta(seconds=50)) is False
        # The old expiry (T0+60) has passed, the renewed one (T0+110) has not.
        assert leases.reap_expired(session, max_attempts=3, now=T0 + timedelta(seconds=100)) == []
        job = jobs.request_cancel(session, job_id, now=T0 + timedelta(seconds=101))
        assert job.state == "distilling" and job.cancel_requested
        assert leases.heartbeat(session, job_id, "w1", LEASE, now=T0 + timedelta(seconds=102)) is True
        jobs.transition(session, job_id, "canceled", worker_id="w1", now=T0 + timedelta(seconds=103))
    with pytest.raises(jobs.LeaseLost), sessions.begin() as session:
        leases.heartbeat(session, job_id, "w1", LEASE, now=T0 + timedelta(seconds=104))
    with sessions() as session:
        assert [state for _, state in states_of_events(session, job_id)][-3:] == ["distilling"] * 2 + [
            "canceled"
        ]


def test_cancel_queued_job_at_once_and_refuse_finished(sessions):
    queued_id, done_id = new_job(sessions), new_job(sessions)
    with sessions.begin() as session:
        assert jobs.request_cancel(session, queued_id, now=T0).state == "canceled"
        assert jobs.request_cancel(session, queued_id, now=T0).state == "canceled"  # idempotent
        assert not leases.claim(session, queued_id, "w1", LEASE, now=T0)
        jobs.transition(session, done_id, "evaluating", now=T0)
        jobs.transition(session, done_id, "succeeded", now=T0)
    with pytest.raises(jobs.IllegalTransition, match="already succeeded"), sessions.begin() as session:
        jobs.request_cancel(session, done_id, now=T0)


def test_lost_workers_requeue_then_fail_worker_lost(sessions):
    job_id = new_job(sessions)
    max_attempts = 3
    clock = T0
    for attempt in range(1, max_attempts + 1):
        with sessions.begin() as session:
            assert leases.claim(session, job_id, f"w{attempt}", LEASE, now=clock)
            jobs.transition(session, job_id, "pruning", worker_id=f"w{attempt}", now=clock)
        with sessions.begin() as session:
            assert leases.expired_leases(session, clock + timedelta(seconds=LEASE - 1)) == []
            clock += timedelta(seconds=LEASE + 1)
            assert [job.id for job in leases.expired_leases(session, clock)] == [job_id]
            reaped = leases.reap_expired(session, max_attempts, now=clock)
            assert [(job.id, job.attempts) for job in reaped] == [(job_id, attempt)]
        with sessions() as session:
            job = session.get(Job, job_id)
            expected = "queued" if attempt < max_attempts else "failed"
            assert (job.state, job.lease_owner, job.attempts) == (expected, None, attempt)
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job.error_code == jobs.WORKER_LOST and "3 times" in job.error_message
        assert leases.reap_expired(session, max_attempts, now=clock + timedelta(hours=1)) == []
        assert not leases.claim(session, job_id, "w4", LEASE, now=clock)
        messages = [e.message for e in jobs.events_after(session, job_id)]
        assert (
            messages.count("worker lost; re-queued") == 2 and messages[-1] == "worker lost; no attempts left"
        )


def test_a_late_worker_cannot_resume_after_its_job_was_requeued(sessions):
    job_id = new_job(sessions)
    with sessions.begin() as session:
        leases.claim(session, job_id, "slow", LEASE, now=T0)
        jobs.transition(session, job_id, "pruning", worker_id="slow", now=T0)
        leases.reap_expired(session, 3, now=T0 + timedelta(seconds=LEASE + 1))
        assert leases.claim(session, job_id, "fresh", LEASE, now=T0 + timedelta(seconds=LEASE + 2))
        # The resumed job may re-enter at the stage of its last checkpoint.
        jobs.transition(
            session, job_id, "distilling", worker_id="fresh", now=T0 + timedelta(seconds=LEASE + 3)
        )
    with pytest.raises(jobs.LeaseLost), sessions.begin() as session:
        jobs.transition(
            session, job_id, "compressing", worker_id="slow", now=T0 + timedelta(seconds=LEASE + 4)
        )
    with sessions.begin() as session:
        leases.release(session, job_id, "fresh", now=T0 + timedelta(seconds=LEASE + 5))
        job = session.get(Job, job_id)
        assert (job.state, job.lease_owner, job.attempts) == ("queued", None, 1)  # release keeps the attempt
