#!/usr/bin/env bash
# The whole test suite: install, make sure the local services are up, lint, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache  # the rooms' import rules
# No block of 6 or more lines repeated in the non-test code.
.venv/bin/pylint --disable=all --enable=duplicate-code --min-similarity-lines=6 --score=n core api worker store srcompress
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
if [ "$rc" -eq 5 ]; then echo "no tests ran"; exit 1; fi
exit "$rc"
