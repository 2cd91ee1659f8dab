#!/usr/bin/env bash
# Run N leanauth nodes on one PostgreSQL (and optionally one Redis), as a load balancer
# would see them: one port per node, each node with its own worker processes.
#
# Usage: deploy/run-cluster.sh [NODES] [FIRST_PORT]        (defaults: 2 nodes from port 8101)
# Needs: LEANAUTH_DATABASE_URL=postgresql://..., LEANAUTH_KEY_ENCRYPTION_KEY (the same on every
# node); optional LEANAUTH_REDIS_URL, LEANAUTH_ISSUER (the load balancer's public URL),
# WORKERS (processes per node, default 2). Ctrl-C or SIGTERM stops every node.
# Put a load balancer in front and set LEANAUTH_TRUSTED_PROXIES to its address, or every
# client counts as the balancer for the brute-force throttle.
set -euo pipefail

NODES=${1:-2}
FIRST_PORT=${2:-8101}
WORKERS=${WORKERS:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
LEANAUTH=${LEANAUTH:-$HERE/.venv/bin/leanauth}

: "${LEANAUTH_DATABASE_URL:?set LEANAUTH_DATABASE_URL=postgresql://...}"
: "${LEANAUTH_KEY_ENCRYPTION_KEY:?set LEANAUTH_KEY_ENCRYPTION_KEY (32 bytes, hex or base64), the same on every node}"

# Migrations once, before any node starts (nodes refuse an outdated schema).
"$LEANAUTH" db upgrade

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap stop_all EXIT INT TERM

for i in $(seq 0 $((NODES - 1))); do
  port=$((FIRST_PORT + i))
  "$LEANAUTH" serve --host 127.0.0.1 --port "$port" --workers "$WORKERS" &
  pids+=("$!")
done

# Health checks: what a load balancer polls before sending traffic to a node.
for i in $(seq 0 $((NODES - 1))); do
  port=$((FIRST_PORT + i))
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null || { echo "node on $port failed" >&2; exit 1; }
  echo "node $((i + 1)) ready: http://127.0.0.1:$port"
done
wait
