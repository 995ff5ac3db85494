"""`srcompress serve` (the embedded default: API + a real Celery worker, no other service needed) and
`srcompress keys create|list|revoke`. ``register(subparsers)`` adds them to the top-level parser
(srcompress.cli)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from store.queue import WORKER_APP, worker_command
from store.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


def settings_env(settings: Settings) -> dict[str, str]:
    """SRCOMPRESS_* variables that make another process (the worker) see exactly these settings."""
    env = {}
    for name in Settings.model_fields:
        value: Any = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"SRCOMPRESS_{name.upper()}"] = str(value)
    return env


def worker_available() -> bool:
    import importlib.util

    return importlib.util.find_spec(WORKER_APP) is not None


def ensure_first_key(settings: Settings) -> str | None:
    """Create a key named 'default' when the database has none; returns its raw value (else None)."""
    from sqlalchemy import func, select

    from store.apikeys import create_api_key
    from store.db import make_engine, session_factory
    from store.tables import ApiKey

    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine).begin() as session:
            if session.execute(select(func.count()).select_from(ApiKey)).scalar_one():
                return None
            return create_api_key(session, "default")[1]
    finally:
        engine.dispose()


def _die_with_parent() -> None:
    """In the worker child: get SIGTERM when `serve` dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app
    from store.db import migrate

    overrides = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = Settings(**overrides)
    migrate(settings.database_url)
    first_key = ensure_first_key(settings)

    worker: subprocess.Popen[bytes] | None = None
    if args.no_worker:
        print("srcompress: API only (--no-worker): jobs wait until a worker runs", file=sys.stderr)
    elif not worker_available():
        print(f"srcompress: {WORKER_APP} is not installed; jobs stay queued", file=sys.stderr)
    else:
        env = {**os.environ, **settings_env(settings)}
        pool = "solo" if args.worker_concurrency == 1 else "prefork"
        command = worker_command(pool, args.worker_concurrency)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        worker = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            preexec_fn=_die_with_parent,
        )

    url = f"http://{args.host}:{args.port}"
    print(f"srcompress API on {url}  (docs: {url}/docs; data in {settings.data_dir})", flush=True)
    if first_key:
        print(f"first API key (shown once): {first_key}", flush=True)
    # uvicorn re-raises SIGTERM after its graceful shutdown; turn it into SystemExit so that the
    # `finally` below still stops the worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown: the running task is released
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def _key_sessions() -> tuple[Any, Any]:
    from store.db import make_engine, migrate, session_factory

    settings = Settings()
    migrate(settings.database_url)
    engine = make_engine(settings.database_url)
    return engine, session_factory(engine)


def cmd_keys_create(args: argparse.Namespace) -> None:
    from store.apikeys import create_api_key

    engine, sessions = _key_sessions()
    try:
        with sessions.begin() as session:
            row, raw_key = create_api_key(session, args.name)
    finally:
        engine.dispose()
    print(f"webhook signing secret of this key (shown only this once): {row.webhook_secret}", file=sys.stderr)
    print(f"created key {row.id} ({args.name}); it is shown only this once:", file=sys.stderr)
    print(raw_key)


def cmd_keys_list(_args: argparse.Namespace) -> None:
    from sqlalchemy import select

    from store.tables import ApiKey

    engine, sessions = _key_sessions()
    try:
        with sessions() as session:
            for row in session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars():
                state = "revoked" if row.revoked else "active"
                print(f"{row.id}  src_{row.prefix}_…  {state:<8} {row.created_at:%Y-%m-%d %H:%M}  {row.name}")
    finally:
        engine.dispose()


def cmd_keys_revoke(args: argparse.Namespace) -> None:
    from core.errors import UserError
    from store.apikeys import revoke_api_key

    engine, sessions = _key_sessions()
    try:
        with sessions.begin() as session:
            if not revoke_api_key(session, args.key_id):
                raise UserError(f"no API key with id {args.key_id}")
    finally:
        engine.dispose()
    print(f"revoked {args.key_id}")


def cmd_keys_rotate_webhook_secret(args: argparse.Namespace) -> None:
    from core.errors import UserError
    from store.apikeys import rotate_webhook_secret

    engine, sessions = _key_sessions()
    try:
        with sessions.begin() as session:
            secret = rotate_webhook_secret(session, args.key_id)
            if secret is None:
                raise UserError(f"no active API key with id {args.key_id}")
    finally:
        engine.dispose()
    print(f"new webhook signing secret of {args.key_id} (shown only this once):", file=sys.stderr)
    print(secret)


def register(subparsers: Any) -> None:
    """Add `serve` and `keys` to core's `srcompress` parser."""
    p = subparsers.add_parser(
        "serve",
        help="run the API and a Celery worker (SQLite + local blobs + a server-less broker by default)",
        description="Run the API and a real Celery worker. Settings come from SRCOMPRESS_* variables; "
        "the defaults need no other service.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, help="root of the embedded database, blobs and broker")
    p.add_argument("--no-worker", action="store_true", help="run the API only")
    p.add_argument("--worker-concurrency", type=int, default=1, help="jobs run at once by the worker")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    keys = subparsers.add_parser("keys", help="manage API keys", description="Manage API keys.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("create", help="create a key and print it once")
    p.add_argument("name")
    p.set_defaults(func=cmd_keys_create)
    p = keys_sub.add_parser("list", help="list keys (never their values)")
    p.set_defaults(func=cmd_keys_list)
    p = keys_sub.add_parser("revoke", help="revoke a key by id")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_revoke)
    p = keys_sub.add_parser(
        "rotate-webhook-secret", help="give a key a new webhook signing secret and print it once"
    )
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_rotate_webhook_secret)
