#!/usr/bin/env bash
# The production topology of docker-compose.yml, from local processes (Docker cannot run here):
# the local Postgres and Redis, an S3 endpoint from moto's server mode, Alembic migrations, the API
# (uvicorn) and N Celery workers. Every setting is an SRCOMPRESS_* variable (store.settings.Settings);
# set one before calling to override the default below (tests point it at a throwaway database).
#
#   scripts/stack.sh start     start everything, print the environment it used (also in $STACK_DIR/env)
#   scripts/stack.sh stop      stop what `start` started (by the process ids it recorded)
#   scripts/stack.sh status    which of the started processes are alive
#   scripts/stack.sh env       print the environment (source it to talk to the stack from a shell)
#
# Knobs: WORKERS (1), WORKER_POOL (prefork | solo), API_PORT (8000), S3_PORT (9000), STACK_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BIN=$REPO/.venv/bin

WORKERS=${WORKERS:-1}
WORKER_POOL=${WORKER_POOL:-prefork}
API_PORT=${API_PORT:-8000}
S3_PORT=${S3_PORT:-9000}
STACK_DIR=${STACK_DIR:-$REPO/.srcompress/stack}

export SRCOMPRESS_DATA_DIR="${SRCOMPRESS_DATA_DIR:-$STACK_DIR/data}"
export SRCOMPRESS_WORK_DIR="${SRCOMPRESS_WORK_DIR:-$SRCOMPRESS_DATA_DIR/work}"
export SRCOMPRESS_DATABASE_URL="${SRCOMPRESS_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/srcompress}"
export SRCOMPRESS_BROKER_URL="${SRCOMPRESS_BROKER_URL:-redis://127.0.0.1:6379/0}"
export SRCOMPRESS_BLOB_BACKEND="${SRCOMPRESS_BLOB_BACKEND:-s3}"
export SRCOMPRESS_S3_ENDPOINT_URL="${SRCOMPRESS_S3_ENDPOINT_URL:-http://127.0.0.1:$S3_PORT}"
export SRCOMPRESS_S3_BUCKET="${SRCOMPRESS_S3_BUCKET:-srcompress}"
export SRCOMPRESS_S3_ACCESS_KEY="${SRCOMPRESS_S3_ACCESS_KEY:-srcompress}"
export SRCOMPRESS_S3_SECRET_KEY="${SRCOMPRESS_S3_SECRET_KEY:-srcompress-secret}"
export SRCOMPRESS_S3_REGION="${SRCOMPRESS_S3_REGION:-us-east-1}"
export SRCOMPRESS_LEASE_SECONDS="${SRCOMPRESS_LEASE_SECONDS:-60}"
export SRCOMPRESS_HEARTBEAT_SECONDS="${SRCOMPRESS_HEARTBEAT_SECONDS:-10}"
export SRCOMPRESS_MAX_ATTEMPTS="${SRCOMPRESS_MAX_ATTEMPTS:-3}"

print_env() {
  env | grep '^SRCOMPRESS_' | sort | sed 's/^/export /'
}

# wait_until SECONDS WHAT COMMAND...: poll COMMAND every 0.5 s.
wait_until() {
  local seconds=$1 what=$2
  shift 2
  local tries=$((seconds * 2))
  while ! "$@" >/dev/null 2>&1; do
    tries=$((tries - 1))
    if [ "$tries" -le 0 ]; then
      echo "stack: timed out waiting for $what" >&2
      return 1
    fi
    sleep 0.5
  done
}

# launch NAME COMMAND...: run in its own session (so `stop` can end it and its children), log, pid file.
launch() {
  local name=$1
  shift
  setsid "$@" >"$STACK_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$STACK_DIR/$name.pid"
}

http_ok() {
  "$BIN/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1"
}

create_database() {
  # CREATE DATABASE for SRCOMPRESS_DATABASE_URL if it does not exist (connecting to 'postgres').
  "$BIN/python" - <<'PY'
import os
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

url = make_url(os.environ["SRCOMPRESS_DATABASE_URL"])
if url.get_backend_name() == "postgresql":
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        found = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": url.database})
        if found.first() is None:
            connection.execute(text(f'CREATE DATABASE "{url.database}"'))
    admin.dispose()
PY
}

start() {
  mkdir -p "$STACK_DIR" "$SRCOMPRESS_DATA_DIR"
  if [ -n "$(ls "$STACK_DIR"/*.pid 2>/dev/null)" ]; then
    echo "stack: already started from $STACK_DIR (run '$0 stop' first)" >&2
    exit 1
  fi
  bash scripts/services.sh # the local Postgres and Redis, if they are down

  if [ "$SRCOMPRESS_BLOB_BACKEND" = "s3" ] && [[ "$SRCOMPRESS_S3_ENDPOINT_URL" == http://127.0.0.1:$S3_PORT* ]]; then
    launch s3 "$BIN/moto_server" -H 127.0.0.1 -p "$S3_PORT"
    wait_until 30 "the S3 endpoint (moto)" http_ok "$SRCOMPRESS_S3_ENDPOINT_URL/moto-api/"
  fi
  create_database
  "$BIN/alembic" upgrade head
  "$BIN/python" -c "from store.blobs import make_blob_store; from store.settings import Settings; make_blob_store(Settings())"

  launch api "$BIN/uvicorn" api.app:app --host 127.0.0.1 --port "$API_PORT"
  for i in $(seq 1 "$WORKERS"); do
    launch "worker$i" "$BIN/celery" -A worker.app worker --pool "$WORKER_POOL" --concurrency 1 \
      -Q srcompress.jobs --without-gossip --without-mingle -n "worker$i@%h" --loglevel INFO
  done
  wait_until 60 "the API on port $API_PORT" http_ok "http://127.0.0.1:$API_PORT/healthz"
  for i in $(seq 1 "$WORKERS"); do
    wait_until 60 "worker$i" grep -q "ready\." "$STACK_DIR/worker$i.log"
  done
  print_env >"$STACK_DIR/env"
  echo "export API_URL=http://127.0.0.1:$API_PORT" >>"$STACK_DIR/env"
  cat "$STACK_DIR/env"
  echo "stack: started (logs and pids in $STACK_DIR)" >&2
}

stop() {
  local pidfile pid
  for pidfile in "$STACK_DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    # The process leads its own session/group (setsid): end the group, i.e. prefork children too.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for pidfile in "$STACK_DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  echo "stack: stopped" >&2
}

status() {
  local pidfile
  for pidfile in "$STACK_DIR"/*.pid; do
    [ -e "$pidfile" ] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then state=running; else state=dead; fi
    echo "$(basename "$pidfile" .pid) $(cat "$pidfile") $state"
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) print_env ;;
  *)
    echo "usage: $0 [start|stop|status|env]" >&2
    exit 2
    ;;
esac
