#!/usr/bin/env bash
# Create .venv and install srcompress with everything it needs (torch first, pinned to the CPU wheel
# so that no dependency resolves a multi-GB CUDA build). Safe to run again; quiet unless it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() { "$@" >"$log" 2>&1 || { cat "$log"; echo "setup: failed: $*" >&2; exit 1; }; }
[ -x .venv/bin/python ] || run "$PY" -m venv .venv
.venv/bin/python -c "import torch" 2>/dev/null || run .venv/bin/python -m pip install "torch==2.13.0"
run .venv/bin/python -m pip install -e ".[test]"
# The dashboard's browser tests drive Debian's chromium through its chromedriver (no browser download;
# under CI=true they fail without it).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  apt_install() { $sudo apt-get install -y --no-install-recommends chromium chromium-driver; }
  apt_install >"$log" 2>&1 || { run $sudo apt-get update; run apt_install; }
fi
