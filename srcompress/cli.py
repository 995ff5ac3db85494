"""The `srcompress` command line: core's ML commands, the service's `serve` and `keys`, and `worker`.

This is the one place where the rooms meet on the command line; core, api and worker each register
their own commands and import nothing above them. A `UserError` (bad preset, missing file, a checkpoint
that does not fit, ...) is printed as one line on stderr with exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from api.cli import register as register_api
from core.cli import register as register_core
from core.errors import UserError
from worker.cli import register as register_worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srcompress", description="Compress deep image super-resolution models and serve them."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    register_core(sub)
    register_api(sub)
    register_worker(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as error:
        print(f"srcompress: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("srcompress: interrupted", file=sys.stderr)
        return 130
    return 0
