#!/usr/bin/env bash
# The main job on the embedded default (SQLite, a local blob directory, a server-less broker and a
# local Celery worker): install, start `srcompress serve`, then as a user over HTTP: upload a teacher,
# compress it on the bundled sample images, follow the progress, download the model, upscale with it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/demo}
PORT=${PORT:-8765}
export SRCOMPRESS_DATA_DIR="$OUT/service"
mkdir -p "$OUT"
KEY=$(.venv/bin/srcompress keys create demo 2>/dev/null)
.venv/bin/srcompress serve --port "$PORT" >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
  sleep 0.5
done
echo "srcompress serve is up on http://127.0.0.1:$PORT (log: $OUT/serve.log)"
.venv/bin/python scripts/demo.py --url "http://127.0.0.1:$PORT" --key "$KEY" --out "$OUT"
