#!/usr/bin/env bash
# Run leanauth for a benchmark, in the FOREGROUND, on 127.0.0.1:PORT.
#
# Usage: bench/serve.sh PORT        prepare a fresh data dir, then exec the server
#        bench/serve.sh --prepare   prepare a fresh data dir and exit (no server)
#
# The data dir ($BENCH_DIR/data; BENCH_DIR defaults to /tmp/leanauth-bench) gets an SQLite
# database, the key files, one bench app (scopes api,customer), one customer of it, and the
# token request bodies:
#   api.body       grant_type=client_credentials, client_secret_post, scope=api
#   customer.body  the same with scope=customer.<customer_id>
#   app.json, customer.json   what the CLI printed
# With BENCH_REUSE=1 an already prepared dir is used as it is: run.sh prepares it first so that
# it knows the request bodies before a harness (the peers' run-all.sh) starts the server.
#
# Env: BENCH_DIR, BENCH_REUSE, WORKERS (default 2), LEANAUTH (the CLI, default: the repo's venv),
#      BENCH_DATABASE_URL (an empty PostgreSQL database instead of SQLite),
#      BENCH_SRC (serve the leanauth source tree at this path instead: a baseline checkout),
#      BENCH_APP_OPTIONS (extra `apps create` options, e.g. quotas).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
LEANAUTH=${LEANAUTH:-$ROOT/.venv/bin/leanauth}
PYTHON=$(dirname "$LEANAUTH")/python
BENCH_DIR=${BENCH_DIR:-/tmp/leanauth-bench}
DATA=$BENCH_DIR/data
# Marks a dir this script made: only such a dir (or an empty one) is ever wiped.
MARKER=.leanauth-bench
READY=ready

usage() {
  echo "usage: $0 PORT | --prepare" >&2
  exit 2
}

[ $# -eq 1 ] || usage
MODE=serve
PORT=
case "$1" in
  --prepare) MODE=prepare ;;
  *[!0-9]* | '') usage ;;
  *) PORT=$1 ;;
esac

# Production-like settings, loopback only. Every LEANAUTH_* setting the server reads is set here
# so that the caller's environment cannot change what is measured.
export LEANAUTH_DATABASE_URL=${BENCH_DATABASE_URL:-"sqlite:///${DATA}/leanauth.db"}
export LEANAUTH_HOST=127.0.0.1
export LEANAUTH_LOG_LEVEL=warning
# No balancer to take the node out first: stop at once when the bench is done.
export LEANAUTH_DRAIN_SECONDS=0
unset LEANAUTH_ISSUER LEANAUTH_KEY_ENCRYPTION_KEY LEANAUTH_REDIS_URL
# The key file lives in the data dir whatever the database (PostgreSQL has no "beside").
export LEANAUTH_KEY_ENCRYPTION_KEY_FILE=$DATA/leanauth.kek
if [ -n "${BENCH_SRC:-}" ]; then
  # Another source tree on the same venv: `python -m leanauth` imports it first.
  export PYTHONPATH=$BENCH_SRC
fi
leanauth() { "$PYTHON" -m leanauth "$@"; }

# Print a form-encoded token request body for client_id/client_secret from app.json and a scope.
form_body() {
  "$PYTHON" - "$DATA/app.json" "$1" <<'EOF'
import json, sys
from urllib.parse import urlencode
app = json.load(open(sys.argv[1]))
print(urlencode({
    "grant_type": "client_credentials",
    "client_id": app["client_id"],
    "client_secret": app["client_secret"],
    "scope": sys.argv[2],
}), end="")
EOF
}

prepare() {
  if [ -e "$DATA" ]; then
    if [ ! -e "$DATA/$MARKER" ] && [ -n "$(ls -A "$DATA")" ]; then
      echo "serve.sh: $DATA exists and was not made by serve.sh; refusing to wipe it" >&2
      exit 1
    fi
    rm -rf "$DATA"
  fi
  mkdir -p "$DATA"
  chmod 700 "$DATA"  # it holds the key-encryption key and a client secret
  touch "$DATA/$MARKER"
  leanauth init --json >"$DATA/init.json"
  # shellcheck disable=SC2086 # BENCH_APP_OPTIONS is a list of options
  leanauth apps create --name bench --scopes api,customer ${BENCH_APP_OPTIONS:-} --json \
    >"$DATA/app.json"
  local client_id
  client_id=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_id"])' \
    "$DATA/app.json")
  leanauth customers create --app "$client_id" --app-user-id bench-user-1 --json \
    >"$DATA/customer.json"
  local customer_id
  customer_id=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["customer_id"])' \
    "$DATA/customer.json")
  form_body api >"$DATA/api.body"
  form_body "customer.${customer_id}" >"$DATA/customer.body"
  touch "$DATA/$READY"
}

if [ "${BENCH_REUSE:-0}" = 1 ] && [ -e "$DATA/$READY" ]; then
  : # prepared by the caller: keep its credentials
else
  prepare
fi

if [ "$MODE" = prepare ]; then
  exit 0
fi

export LEANAUTH_PORT=$PORT
# exec: the caller's PID is the server's (uvicorn's supervisor), so it can stop it by PID.
exec "$PYTHON" -m leanauth serve --host 127.0.0.1 --port "$PORT" --workers "${WORKERS:-2}"
