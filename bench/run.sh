#!/usr/bin/env bash
# Load leanauth's POST /oauth2/token with wrk, on loopback.
#
# Usage: bench/run.sh              (what `make bench` runs) leanauth alone on SQLite with a large
#                                  registry (see scale): a hot customer, random customers and
#                                  `api` tokens; prints req/s, p50, p99, errors and ratios.
#        bench/run.sh peers [NAME...]   (or PEERS=1) leanauth and the peer servers side by side,
#                                  through the peers harness's run-all.sh in PEERS_DIR (NAMEs:
#                                  peers to run).
#        bench/run.sh backends     leanauth on SQLite, then on PostgreSQL (BENCH_POSTGRES_URL,
#                                  an admin URL; a throwaway database is made and dropped).
#        bench/run.sh features     the server before throttling, quotas and the audit trail
#                                  (BENCH_BASELINE, a git revision) against the server now.
#        bench/run.sh against REV  the server at git revision REV against the server now,
#                                  with the same settings and bench app (a change's cost).
#        bench/run.sh scale        a large registry (SCALE_APPS apps, SCALE_CUSTOMERS customers,
#                                  bench/seed.py): customer tokens for random customers, for one
#                                  hot customer and api tokens, alternating on one server, on
#                                  SQLite and PostgreSQL (SCALE_BACKENDS); ratios, RSS, start-up.
#        bench/run.sh tail         latency under load: api tokens as fast as CONNS connections
#                                  go (full load), then paced at half that rate (bench/paced.lua);
#                                  p50, p90 and p99 of each, for ROUNDS rounds.
#        backends and features alternate the two servers for ROUNDS (3) rounds and compare
#        the medians.
# Env:   DURATION=15s CONNS=32 WRK_THREADS=2 PORT=18090 (peers: run-all's PORT, default 18080)
#        BENCH_DIR=/tmp/leanauth-bench (data/ is wiped and re-made each run; raw wrk output in
#        results/, server log in server.log)
#        PEERS_DIR (peers only: the harness's directory, with run-all.sh and one directory a
#        peer) PEERS_WORKDIR=/tmp/leanauth-peers PEERS_WARM=1
# Exit status: non-zero when the server does not start, a request fails or the server logs an error.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SERVE="$HERE/serve.sh"
export BENCH_DIR=${BENCH_DIR:-/tmp/leanauth-bench}
export LEANAUTH=${LEANAUTH:-$ROOT/.venv/bin/leanauth}
PYTHON=$(dirname "$LEANAUTH")/python
DURATION=${DURATION:-15s}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-2}
PEERS_DIR=${PEERS_DIR:-}
export PEERS_WORKDIR=${PEERS_WORKDIR:-/tmp/leanauth-peers}

MODE=self
case "${1:-}" in
  peers | backends | features | against | scale | tail)
    MODE=$1
    shift
    ;;
  *) [ "${PEERS:-0}" = 1 ] && MODE=peers ;;
esac

# --- processes this script started: each in its own process group (setsid), so that stopping
# it also stops its children (uvicorn workers, node cluster workers, npm) and nothing else.
STARTED=()
stop_group() {
  local pid=$1
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
  fi
  # Whatever is left of the group (the leader ignored TERM, or orphaned children) is killed.
  kill -KILL -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local pid
  for pid in "${STARTED[@]}"; do stop_group "$pid"; done
  STARTED=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_group LOG CMD...: run CMD in the background in a new session; sets STARTED_PID.
start_group() {
  local log=$1
  shift
  # A background job of a non-interactive shell is not a group leader, so setsid does not
  # fork: $! is CMD's PID and its process group ID.
  setsid "$@" >"$log" 2>&1 </dev/null &
  STARTED_PID=$!
  STARTED+=("$STARTED_PID")
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_wrk() {
  command -v wrk >/dev/null && return 0
  echo "installing wrk (apt-get)" >&2
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; then
    # The package lists may be missing or stale: refresh them once, then retry.
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  fi
  command -v wrk >/dev/null
}

# post URL BODY-FILE: the HTTP status of one token request ("000" when nothing answers).
post() {
  curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST "$1" \
    -H 'Content-Type: application/x-www-form-urlencoded' --data-binary "@$2" || true
}

# --- wrk output parsing
wrk_field() { # wrk_field FILE rps|p50|p99|n|non2xx|sockerr
  local f=$1
  case $2 in
    rps) awk '/^Requests\/sec:/{print $2}' "$f" ;;
    p50) awk '$1=="50%"{print $2}' "$f" ;;
    p99) awk '$1=="99%"{print $2}' "$f" ;;
    n) awk '/requests in/{print $1}' "$f" ;;
    non2xx) awk -F': *' '/Non-2xx or 3xx responses/{n=$2} END{print n+0}' "$f" ;;
    # "Socket errors: connect 0, read 0, write 0, timeout 0": the sum of the four.
    sockerr) awk '/Socket errors:/{gsub(/,/,""); print $4+$6+$8+$10; f=1} END{if(!f)print 0}' "$f" ;;
  esac
}

# start_bench LABEL [VAR=VALUE...]: prepare a data dir and start serve.sh (VARs set for it) on
# PORT; returns once both bodies get a token. Sets BENCH_SERVER (its PID) and BENCH_URL.
start_bench() {
  local label=$1
  shift
  local port=${PORT:-18090}
  BENCH_URL="http://127.0.0.1:${port}/oauth2/token"
  if port_in_use "$port"; then
    echo "port $port is in use: set PORT" >&2
    exit 1
  fi
  mkdir -p "$BENCH_DIR/results"
  env "$@" "$SERVE" --prepare
  start_group "$BENCH_DIR/server-${label}.log" env "$@" BENCH_REUSE=1 "$SERVE" "$port"
  BENCH_SERVER=$STARTED_PID
  local code=000
  for _ in $(seq 1 60); do
    code=$(post "$BENCH_URL" "$BENCH_DIR/data/api.body")
    [ "$code" = 200 ] && break
    kill -0 "$BENCH_SERVER" 2>/dev/null || break
    sleep 0.5
  done
  if [ "$code" != 200 ]; then
    echo "${label} not ready (last HTTP $code); log: $BENCH_DIR/server-${label}.log" >&2
    tail -n 20 "$BENCH_DIR/server-${label}.log" >&2
    exit 1
  fi
  # Both bodies must give a token before anything is measured.
  code=$(post "$BENCH_URL" "$BENCH_DIR/data/customer.body")
  if [ "$code" != 200 ]; then
    echo "customer token request: HTTP $code" >&2
    exit 1
  fi
}

# measure LABEL [VAR=VALUE...]: serve (start_bench), load api then customer tokens; append
# rows to ROWS and the api req/s to RPS[LABEL].
declare -A RPS=()
A_VARS=()
ROWS=()
FAILED=0
measure() {
  local label=$1
  start_bench "$@"
  local url=$BENCH_URL server=$BENCH_SERVER results="$BENCH_DIR/results"
  local scope out errs
  for scope in api customer; do
    out="$results/${label}-${scope}.txt"
    echo "== ${label}: wrk -t${WRK_THREADS} -c${CONNS} -d${DURATION}: ${scope} tokens" >&2
    WRK_BODY=$(<"$BENCH_DIR/data/${scope}.body") \
      wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$HERE/token.lua" "$url" >"$out"
    errs=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" sockerr)))
    [ "$errs" -eq 0 ] || FAILED=1
    [ "$scope" = api ] && RPS[$label]="${RPS[$label]:-} $(wrk_field "$out" rps)"
    ROWS+=("$(printf '%-22s %-10s %10s %10s %10s %8s %10s' "$label" "$scope" \
      "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$errs" \
      "$(wrk_field "$out" n)")")
  done
  stop_group "$server"
  STARTED=()
  if grep -qiE 'error|traceback' "$BENCH_DIR/server-${label}.log"; then
    echo "the server logged errors: $BENCH_DIR/server-${label}.log" >&2
    FAILED=1
  fi
}

print_rows() {
  echo
  echo "POST /oauth2/token, 2 workers; wrk -t${WRK_THREADS} -c${CONNS} -d${DURATION}" \
    "--latency on loopback; wrk shares the $(nproc) cores with the server; $(date -u +%FT%TZ)"
  printf '%-22s %-10s %10s %10s %10s %8s %10s\n' server scope req/s p50 p99 errors requests
  printf '%s\n' "${ROWS[@]}"
  echo "raw wrk output: $BENCH_DIR/results/"
}

median() { tr ' ' '\n' | grep . | sort -g | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}'; }

ratio() { # ratio A B: median api req/s of A over B's, over the rounds
  local a b
  a=$(median <<<"${RPS[$1]}")
  b=$(median <<<"${RPS[$2]}")
  awk -v a="$a" -v b="$b" -v na="$1" -v nb="$2" -v ra="${RPS[$1]}" -v rb="${RPS[$2]}" \
    'BEGIN{printf "%s / %s, median api req/s: %.2f (%s / %s; rounds:%s /%s)\n", na, nb, a/b, a, b, ra, rb}'
}

# compare A B [VARS for B...]: ROUNDS (default 3) alternating runs of the servers A and B, so
# that drift in the machine's speed falls on both alike. A's VARs come from A_VARS.
compare() {
  local a=$1 b=$2
  shift 2
  local round
  for round in $(seq 1 "${ROUNDS:-3}"); do
    echo "== round ${round}" >&2
    measure "$a" "${A_VARS[@]}"
    measure "$b" "$@"
  done
}

# make bench: one server on SQLite with a large registry (SCALE_APPS, SCALE_CUSTOMERS): api
# tokens, and customer tokens for random customers (what LinkSDK traffic looks like) beside
# one hot customer.
run_self() {
  ROUNDS=${ROUNDS:-1} measure_scale leanauth
  print_rows
  scale_ratios leanauth
  return "$FAILED"
}

# The same server on SQLite and on PostgreSQL, one after the other: the token path never
# touches the database, so the two should match.
run_backends() {
  local admin=${BENCH_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
  local name=leanauth_bench_$$ round
  for round in $(seq 1 "${ROUNDS:-3}"); do
    echo "== round ${round}" >&2
    measure sqlite
    # A fresh database each round: each round's data dir has a new key-encryption key.
    postgres_database "$admin" "$name" create
    measure postgresql BENCH_DATABASE_URL="${admin%/*}/${name}"
    postgres_database "$admin" "$name" drop
  done
  print_rows
  ratio postgresql sqlite
  return "$FAILED"
}

postgres_database() { # postgres_database ADMIN_URL NAME create|drop
  "$PYTHON" - "$@" <<'PYEOF'
import sys, psycopg
admin, name, action = sys.argv[1:]
with psycopg.connect(admin, autocommit=True) as conn:
    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    if action == "create":
        conn.execute(f'CREATE DATABASE "{name}"')
PYEOF
}

# The server before the credential-lifecycle work (no throttle, quotas or audit trail) and
# the server now, with a quota on the bench app so the quota check runs on every token.
run_features() {
  local rev=${BENCH_BASELINE:-643e945}
  local tree="$BENCH_DIR/baseline"
  rm -rf "$tree"
  git -C "$ROOT" archive --format=tar --prefix=baseline/ "$rev" | tar -C "$BENCH_DIR" -xf -
  A_VARS=(BENCH_SRC="$tree/src")
  compare "baseline-${rev}" features \
    BENCH_APP_OPTIONS="--quota-hourly 1000000000 --quota-daily 1000000000"
  print_rows
  ratio features "baseline-${rev}"
  return "$FAILED"
}

to_ms() { # to_ms 9.71ms|350.00us|1.02s: milliseconds
  awk -v v="$1" 'BEGIN{n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /[0-9]s$/ && v !~ /ms$/) n*=1000; print n}'
}

# measure_scale LABEL [VAR=VALUE...]: a data dir seeded with a large registry, one server, and
# ROUNDS rounds of hot-customer, random-customer and api loads on it. Req/s go to
# RPS[LABEL-KIND] and p99s (ms) to P99[LABEL-KIND].
declare -A P99=() CPU=()
# CPU time (clock ticks) the children of process $1 (a server's workers) have used.
workers_ticks() {
  local pid total=0
  for pid in $(ps -o pid= --ppid "$1"); do
    [ -r "/proc/$pid/stat" ] && total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}
measure_scale() {
  local label=$1
  shift
  local port=${PORT:-18090} kind round
  local url="http://127.0.0.1:${port}/oauth2/token" results="$BENCH_DIR/results" data="$BENCH_DIR/data"
  mkdir -p "$results"
  env "$@" "$SERVE" --prepare
  local database="sqlite:///${data}/leanauth.db" var
  for var in "$@"; do
    case $var in BENCH_DATABASE_URL=*) database=${var#BENCH_DATABASE_URL=} ;; esac
  done
  LEANAUTH_DATABASE_URL=$database "$PYTHON" "$HERE/seed.py" --apps "${SCALE_APPS:-10000}"     --customers "${SCALE_CUSTOMERS:-1000000}" --ids-out "$data/customer-ids.txt"     --client-id "$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["client_id"])'       "$data/app.json")"
  sed 's/scope=api$/scope=customer./' "$data/api.body" >"$data/customer-prefix.body"
  # The hot customer goes through the same wrk script as the random ones, so that wrk (which
  # shares the cores) spends the same on building each request in both.
  "$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["customer_id"])' \
    "$data/customer.json" >"$data/hot-customer-id.txt"
  local began=$SECONDS
  start_group "$BENCH_DIR/server-${label}.log" env "$@" BENCH_REUSE=1 "$SERVE" "$port"
  local server=$STARTED_PID code=000
  for _ in $(seq 1 240); do
    code=$(post "$url" "$data/api.body")
    [ "$code" = 200 ] && break
    kill -0 "$server" 2>/dev/null || break
    sleep 0.25
  done
  [ "$code" = 200 ] || { echo "${label} not ready: $BENCH_DIR/server-${label}.log" >&2; exit 1; }
  echo "== ${label}: ready $((SECONDS - began)) s after start" >&2
  for round in $(seq 1 "${ROUNDS:-3}"); do
    for kind in hot random api; do
      local out="$results/scale-${label}-${kind}-${round}.txt"
      echo "== ${label} round ${round}: ${kind}" >&2
      local ticks_before
      ticks_before=$(workers_ticks "$server")
      case $kind in
        hot) WRK_BODY_PREFIX=$(<"$data/customer-prefix.body") WRK_IDS=$data/hot-customer-id.txt \
          wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$HERE/random_customer.lua" \
          "$url" >"$out" ;;
        api) WRK_BODY=$(<"$data/api.body") wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" \
          --latency -s "$HERE/token.lua" "$url" >"$out" ;;
        random) WRK_BODY_PREFIX=$(<"$data/customer-prefix.body") WRK_IDS=$data/customer-ids.txt \
          wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$HERE/random_customer.lua" \
          "$url" >"$out" ;;
      esac
      local errs=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" sockerr)))
      [ "$errs" -eq 0 ] || FAILED=1
      CPU[$label-$kind]="${CPU[$label-$kind]:-} $(awk -v t=$(($(workers_ticks "$server") - ticks_before)) \
        -v n="$(wrk_field "$out" n)" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", t / hz * 1e6 / n}')"
      RPS[$label-$kind]="${RPS[$label-$kind]:-} $(wrk_field "$out" rps)"
      P99[$label-$kind]="${P99[$label-$kind]:-} $(to_ms "$(wrk_field "$out" p99)")"
      ROWS+=("$(printf '%-22s %-10s %10s %10s %10s %8s %10s' "$label" "$kind" \
        "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$errs" \
        "$(wrk_field "$out" n)")")
    done
  done
  # Customers created during the run, each asked a token for at once (on whichever connection,
  # so often the other worker): every answer must be a success.
  local out="$results/scale-${label}-fresh.txt" api_token
  api_token=$(curl -s -X POST "$url" -H 'Content-Type: application/x-www-form-urlencoded' \
    --data-binary "@$data/api.body" | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  echo "== ${label}: customers created during the run" >&2
  WRK_BODY_PREFIX=$(<"$data/customer-prefix.body") WRK_API_TOKEN=$api_token \
    wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$HERE/fresh_customer.lua" \
    "$url" >"$out"
  local errs=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" sockerr)))
  [ "$errs" -eq 0 ] || FAILED=1
  ROWS+=("$(printf '%-22s %-10s %10s %10s %10s %8s %10s' "$label" "fresh" \
    "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$errs" \
    "$(wrk_field "$out" n)")")
  echo "== ${label}: worker RSS (MB): $(ps -o rss= --ppid "$server" | awk '{printf "%.0f ", $1/1024}')" \
    "supervisor: $(ps -o rss= -p "$server" | awk '{printf "%.0f", $1/1024}')" >&2
  stop_group "$server"
  STARTED=()
}

scale_ratios() { # scale_ratios LABEL
  local label=$1
  ratio "$label-random" "$label-hot"
  ratio "$label-api" "$label-hot" | sed 's/^/(for scale) /'
  local random hot
  random=$(median <<<"${P99[$label-random]}")
  hot=$(median <<<"${P99[$label-hot]}")
  awk -v r="$random" -v h="$hot" -v l="$label" \
    'BEGIN{printf "%s p99, random / hot customer: %.2f (%s ms / %s ms)\n", l, r/h, r, h}'
  # Server CPU per request moves less with the machine's other load than req/s does.
  random=$(median <<<"${CPU[$label-random]}")
  hot=$(median <<<"${CPU[$label-hot]}")
  awk -v r="$random" -v h="$hot" -v l="$label" -v rr="${CPU[$label-random]}" -v hr="${CPU[$label-hot]}" \
    'BEGIN{printf "%s worker CPU per request, hot / random customer: %.2f (%s us / %s us; rounds:%s /%s)\n", l, h/r, h, r, hr, rr}'
}

run_scale() {
  local admin=${BENCH_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
  local name=leanauth_scale_$$ backend
  for backend in ${SCALE_BACKENDS:-sqlite postgresql}; do
    if [ "$backend" = postgresql ]; then
      postgres_database "$admin" "$name" create
      measure_scale postgresql BENCH_DATABASE_URL="${admin%/*}/${name}"
      postgres_database "$admin" "$name" drop
    else
      measure_scale sqlite
    fi
  done
  print_rows
  for backend in ${SCALE_BACKENDS:-sqlite postgresql}; do scale_ratios "$backend"; done
  return "$FAILED"
}

# The server at another revision against the server now, alike in everything else.
run_against() {
  local rev=${1:?usage: bench/run.sh against REV}
  local tree="$BENCH_DIR/baseline"
  rm -rf "$tree"
  mkdir -p "$BENCH_DIR"
  git -C "$ROOT" archive --format=tar --prefix=baseline/ "$rev" | tar -C "$BENCH_DIR" -xf -
  A_VARS=(BENCH_SRC="$tree/src")
  compare "at-${rev}" now
  print_rows
  ratio now "at-${rev}"
  return "$FAILED"
}

# Start each peer once, unhurried, before run-all.sh: their first start installs dependencies
# (npm ci, pip), which can outlast run-all's 60 s readiness window. Uses the peers' own start.sh
# in run-all's writable copy, so run-all then finds the dependencies in place.
warm_peers() {
  local port=${PORT:-18080} dir name pid code
  mkdir -p "$PEERS_WORKDIR"
  # The same copy run-all.sh makes (sources only; installed dependencies stay in the copy).
  (cd "$PEERS_DIR" && tar --exclude node_modules --exclude .venv --exclude results \
    --exclude instance -cf - .) | tar -C "$PEERS_WORKDIR" -xf -
  for dir in "$PEERS_WORKDIR"/*/; do
    [ -x "$dir/start.sh" ] || continue
    name=$(basename "$dir")
    if port_in_use "$port"; then
      echo "port $port is in use: set PORT" >&2
      exit 1
    fi
    echo "== warming ${name} (first start installs its dependencies)" >&2
    start_group "$PEERS_WORKDIR/${name}.warm.log" "$dir/start.sh" "$port"
    pid=$STARTED_PID
    code=000
    # Up to 15 minutes; any HTTP answer means it is up.
    for _ in $(seq 1 900); do
      code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:${port}/" || true)
      [ "$code" != 000 ] && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    [ "$code" != 000 ] || echo "   ${name} did not come up; see $PEERS_WORKDIR/${name}.warm.log" >&2
    stop_group "$pid"
    STARTED=()  # warm-ups run one at a time: nothing else is running
  done
}

run_peers() {
  local names=("$@")
  # run-all.sh runs only the named servers when given names: keep leanauth in.
  [ ${#names[@]} -eq 0 ] || names=(leanauth "${names[@]}")
  if [ "${PEERS_WARM:-1}" = 1 ]; then
    warm_peers
  fi
  SELF_BODY=$(<"$BENCH_DIR/data/api.body")
  # run-all.sh keeps results of earlier runs: only files newer than this stamp are this run's.
  touch "$BENCH_DIR/run-all.stamp"
  # run-all.sh runs SELF_START with `bash -c` and PORT set; BENCH_REUSE makes serve.sh use the
  # credentials prepared above (and in SELF_BODY) instead of making new ones.
  start_group "$BENCH_DIR/run-all.log" env BENCH_REUSE=1 SELF_NAME=leanauth \
    SELF_START="exec $(printf '%q' "$SERVE") \$PORT" SELF_PATH=/oauth2/token \
    SELF_BODY="$SELF_BODY" DURATION="$DURATION" CONNS="$CONNS" WRK_THREADS="$WRK_THREADS" \
    bash "$PEERS_DIR/run-all.sh" "${names[@]}"
  local pid=$STARTED_PID status=0
  # The log is shown as it grows; run-all.sh is bounded (60 s readiness + DURATION per server).
  tail -n +1 -f "$BENCH_DIR/run-all.log" --pid="$pid" >&2 &
  wait "$pid" || status=$?
  wait $! 2>/dev/null || true
  STARTED=()
  [ "$status" -eq 0 ] || return "$status"

  local ours="$PEERS_WORKDIR/results/leanauth.txt" theirs="$PEERS_WORKDIR/results/oidc-provider.txt"
  if [ "$ours" -nt "$BENCH_DIR/run-all.stamp" ] && [ "$theirs" -nt "$BENCH_DIR/run-all.stamp" ]; then
    local a b
    a=$(wrk_field "$ours" rps)
    b=$(wrk_field "$theirs" rps)
    awk -v a="$a" -v b="$b" 'BEGIN{printf "leanauth / oidc-provider req/s: %.2fx (%s / %s)\n", a/b, a, b}'
    echo "leanauth errors: $(($(wrk_field "$ours" non2xx) + $(wrk_field "$ours" sockerr)))"
  fi
  echo "raw wrk output: $PEERS_WORKDIR/results/"
}

ensure_wrk
# Other load on the machine skews every figure: show it, so that a reader can judge a run.
echo "load average before the run: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)" >&2
# Latency under load, one server: per round a full load (CONNS connections, each sending its
# next request as soon as the last is answered) and an open load paced at half the full load's
# rate. A closed load at full speed measures queueing as much as the server; the paced one
# shows the pauses a client meets when the server is not saturated.
run_tail() {
  start_bench tail
  local round out full half
  local rows=()
  for round in $(seq 1 "${ROUNDS:-3}"); do
    out="$BENCH_DIR/results/tail-full-${round}.txt"
    echo "== round ${round}: full load" >&2
    WRK_BODY=$(<"$BENCH_DIR/data/api.body") \
      wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$HERE/token.lua" "$BENCH_URL" >"$out"
    full=$(wrk_field "$out" rps)
    rows+=("$(tail_row "full" "$out")")
    half=$(awk -v r="$full" 'BEGIN{printf "%d", r / 2}')
    out="$BENCH_DIR/results/tail-half-${round}.txt"
    echo "== round ${round}: paced at ${half} req/s" >&2
    WRK_BODY=$(<"$BENCH_DIR/data/api.body") RATE=$half CONNS=$CONNS \
      wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$HERE/paced.lua" "$BENCH_URL" >"$out"
    rows+=("$(tail_row "half (${half}/s)" "$out")")
  done
  stop_group "$BENCH_SERVER"
  STARTED=()
  echo
  echo "POST /oauth2/token (api), 2 workers; wrk -t${WRK_THREADS} -c${CONNS} -d${DURATION}" \
    "on loopback, sharing the $(nproc) cores; $(date -u +%FT%TZ)"
  printf '%-18s %10s %10s %10s %10s %8s\n' load req/s p50 p90 p99 errors
  printf '%s\n' "${rows[@]}"
  return "$FAILED"
}

tail_row() { # tail_row LABEL WRK-OUTPUT
  local errs
  errs=$(($(wrk_field "$2" non2xx) + $(wrk_field "$2" sockerr)))
  [ "$errs" -eq 0 ] || FAILED=1
  printf '%-18s %10s %10s %10s %10s %8s' "$1" "$(wrk_field "$2" rps)" "$(wrk_field "$2" p50)" \
    "$(awk '$1=="90%"{print $2}' "$2")" "$(wrk_field "$2" p99)" "$errs"
}

case "$MODE" in
  peers)
    [ -x "$PEERS_DIR/run-all.sh" ] || { echo "set PEERS_DIR to the peers harness (run-all.sh)" >&2; exit 2; }
    "$SERVE" --prepare
    run_peers "$@"
    ;;
  backends) run_backends ;;
  features) run_features ;;
  against) run_against "$@" ;;
  scale) run_scale ;;
  tail) run_tail ;;
  *) run_self ;;
esac
