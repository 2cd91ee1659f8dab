#!/usr/bin/env bash
# Server CPU time per token request: leanauth at git revision REV against leanauth now, one
# worker each, alternating for ROUNDS rounds. On a shared machine req/s moves by ±15% from run
# to run; the server's CPU time per request moves less (±8% seen), so the mean of a few
# alternating rounds shows a change's cost of a few percent where wrk's req/s cannot.
#
# Usage: bench/cpu-per-request.sh REV        Env: ROUNDS=4 DURATION=8s CONNS=8 PORT=18099
#        (BENCH_DIR=/tmp/leanauth-cpu-bench: data, logs and wrk output; the data dir is re-made)
set -euo pipefail

REV=${1:?usage: bench/cpu-per-request.sh REV}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
export BENCH_DIR=${BENCH_DIR:-/tmp/leanauth-cpu-bench} WORKERS=1
PORT=${PORT:-18099}
URL="http://127.0.0.1:${PORT}/oauth2/token"
HZ=$(getconf CLK_TCK)
SERVER=

stop() {
  [ -n "$SERVER" ] || return 0
  kill -TERM -- "-$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=
}
trap stop EXIT

# utime + stime of a process and its children (the supervisor's workers), living ones.
cpu_ticks() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

load() { # load SECONDS OUTPUT
  WRK_BODY=$(<"$BENCH_DIR/data/api.body") \
    wrk -t1 -c"${CONNS:-8}" -d"$1" -s "$HERE/token.lua" "$URL" >"$2"
}

measure() { # measure LABEL [VAR=VALUE...]: prints the server's CPU µs per request
  local label=$1
  shift
  env "$@" "$HERE/serve.sh" --prepare >/dev/null
  setsid env "$@" BENCH_REUSE=1 "$HERE/serve.sh" "$PORT" >"$BENCH_DIR/server-$label.log" 2>&1 &
  SERVER=$!
  local code=000
  for _ in $(seq 1 60); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -X POST --data-binary "@$BENCH_DIR/data/api.body" \
      -H 'content-type: application/x-www-form-urlencoded' "$URL" || true)
    [ "$code" = 200 ] && break
    sleep 0.5
  done
  [ "$code" = 200 ] || { echo "$label did not start: $BENCH_DIR/server-$label.log" >&2; exit 1; }
  # serve.sh execs the server: its process (and, since the supervisor starts workers as its
  # children, theirs) serves the requests.
  load 3s /dev/null
  local before after requests
  before=$(cpu_ticks "$SERVER")
  load "${DURATION:-8s}" "$BENCH_DIR/$label.wrk"
  after=$(cpu_ticks "$SERVER")
  requests=$(grep -o '[0-9]* requests in' "$BENCH_DIR/$label.wrk" | cut -d' ' -f1)
  stop
  awk -v l="$label" -v t=$((after - before)) -v n="$requests" -v hz="$HZ" \
    'BEGIN{printf "%-14s %8d requests %8.1f us CPU/request\n", l, n, t / hz * 1e6 / n}'
}

mkdir -p "$BENCH_DIR"
rm -rf "$BENCH_DIR/baseline"
git -C "$ROOT" archive --format=tar --prefix=baseline/ "$REV" | tar -C "$BENCH_DIR" -xf -
for round in $(seq 1 "${ROUNDS:-4}"); do
  measure "at-$REV" BENCH_SRC="$BENCH_DIR/baseline/src"
  measure now
done
