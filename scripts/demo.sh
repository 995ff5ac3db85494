#!/usr/bin/env bash
# The main job on the embedded default, end to end on the bundled sample images (no ../shared needed):
# install, then compress a small random-init teacher... see README for the real-teacher command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/demo}
.venv/bin/python -m core.demo "$OUT"
