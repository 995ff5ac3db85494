"""``srcompress worker``: start a Celery worker process (with its reaper thread) for compression jobs.

Settings come from the environment (``SRCOMPRESS_*``, see store.settings); the same variables must be
given to the API so that both talk to one database, broker and blob store.
"""

from __future__ import annotations

import argparse

from store.queue import worker_args


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.app import app

    app.worker_main(worker_args(args.pool, loglevel=args.loglevel, hostname=args.hostname))


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``worker`` to the ``srcompress`` command line."""
    parser = subparsers.add_parser(
        "worker",
        help="run a compression worker (Celery, one job at a time, with the lease reaper)",
        description="Run a Celery worker that takes compression jobs one at a time and re-queues jobs of "
        "lost workers. Configure with SRCOMPRESS_* environment variables (database, broker, blobs).",
    )
    parser.add_argument(
        "--pool",
        choices=("prefork", "solo"),
        default="prefork",
        help="prefork (default): each job in a fresh child process; solo: in the worker process itself",
    )
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    parser.add_argument("--hostname", default=None, help="Celery node name (default celery@<host>)")
    parser.set_defaults(func=cmd_worker)
    return parser
