#!/usr/bin/env bash
# An end-to-end check of meshd as a Prometheus target, with a real Prometheus server
# (Debian's `prometheus` package, installed by scripts/setup.sh):
#   1. starts a demo HTTP backend (`meshd backend`) and meshd on loopback: service "web"
#      (the backend plus a dead address) and service "lonely" (only a dead address);
#   2. starts Prometheus with a temporary config that scrapes meshd every second and loads
#      deploy/prometheus/meshd.rules.yml (evaluated every second);
#   3. sends 20 HTTP requests through meshd;
#   4. queries Prometheus' HTTP API for up{job="meshd"}, meshd_connections_total and
#      meshd_backend_up, and for the MeshdServiceNoHealthyBackend alert on "lonely", and
#      prints what it answered.
# Exits 0 when Prometheus scraped meshd (up == 1), saw all 20 connections and evaluated the
# alert; 1 otherwise. Bounded (about 10 s; every wait has a deadline) and it stops every
# process it started.
#
#   scripts/prometheus-check.sh                    # uses target/release or target/debug
#   MESHD_BIN=/path/to/meshd scripts/prometheus-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BIN=${MESHD_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/meshd ]; then BIN=target/release/meshd
  elif [ -x target/debug/meshd ]; then BIN=target/debug/meshd
  else cargo build --quiet && BIN=target/debug/meshd
  fi
fi
command -v prometheus >/dev/null || { echo "prometheus not found: run scripts/setup.sh" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl not found" >&2; exit 1; }

TMP=$(mktemp -d -t meshd-prom-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# Six loopback ports that are free now.
read -r BACKEND DEAD LISTEN ADMIN PROM LONELY < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(6)]
for s in ss: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in ss])
for s in ss: s.close()')

# Polls "$@" every 0.2 s until it succeeds or $1 seconds pass.
wait_for() {
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 0.2
  done
}

"$BIN" backend --listen "127.0.0.1:$BACKEND" --name b1 --mode http >"$TMP/backend.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/mesh.toml" <<EOF
[admin]
listen = "127.0.0.1:$ADMIN"

[[service]]
name = "web"
listen = ["127.0.0.1:$LISTEN"]
balance = "round_robin"
backends = [{ addr = "127.0.0.1:$BACKEND" }, { addr = "127.0.0.1:$DEAD" }]
[service.health]
check = "http"
path = "/healthz"
interval = "200ms"
timeout = "200ms"
rise = 1
fall = 1

[[service]]
name = "lonely"
listen = ["127.0.0.1:$LONELY"]
backends = [{ addr = "127.0.0.1:$DEAD" }]
[service.health]
check = "tcp"
interval = "200ms"
timeout = "200ms"
EOF
"$BIN" --config "$TMP/mesh.toml" >"$TMP/meshd.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/deploy/prometheus/meshd.rules.yml
scrape_configs:
  - job_name: meshd
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
EOF
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/data" \
  --web.listen-address="127.0.0.1:$PROM" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)

fail() {
  echo "FAIL: $*" >&2
  for f in meshd.log prometheus.log; do echo "--- $f" >&2; tail -n 20 "$TMP/$f" >&2 || true; done
  exit 1
}

wait_for 15 curl -fsS "http://127.0.0.1:$ADMIN/readyz" || fail "meshd not ready"
wait_for 15 curl -fsS "http://127.0.0.1:$PROM/-/ready" || fail "prometheus not ready"
# Traffic once the backend passed its health check.
wait_for 10 curl -fsS "http://127.0.0.1:$LISTEN/" || fail "no answer through meshd"
for _ in $(seq 19); do curl -fsS "http://127.0.0.1:$LISTEN/" >/dev/null || fail "request through meshd failed"; done

# GET /api/v1/query?query=$1, printed as "series = value" lines.
query() {
  curl -fsS --get "http://127.0.0.1:$PROM/api/v1/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["status"] == "success", d
for r in d["data"]["result"]:
    m = dict(r["metric"]); name = m.pop("__name__", "")
    labels = ",".join(k + "=\"" + v + "\"" for k, v in sorted(m.items()))
    print(name + "{" + labels + "} = " + r["value"][1])'
}
value() { query "$1" | awk '{print $NF}' | head -n 1; }
ge() { [ -n "$(value "$1")" ] && python3 -c "import sys; sys.exit(0 if float('$(value "$1")') >= $2 else 1)"; }

wait_for 15 ge 'up{job="meshd"}' 1 || fail "Prometheus never scraped meshd successfully"
wait_for 15 ge 'sum(meshd_connections_total{job="meshd",service="web"})' 20 \
  || fail "Prometheus did not see the 20 connections"
wait_for 45 ge 'count(ALERTS{alertname="MeshdServiceNoHealthyBackend",service="lonely"})' 1 \
  || fail "the alert rules were not evaluated against meshd's series"

echo "prometheus: $(prometheus --version 2>&1 | head -n 1)"
echo "meshd: $("$BIN" --version)"
echo "# target health (GET /api/v1/targets)"
curl -fsS "http://127.0.0.1:$PROM/api/v1/targets" | python3 -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print(t["labels"]["job"], t["scrapeUrl"], "health=" + t["health"], "lastError=" + repr(t["lastError"]))'
echo '# up{job="meshd"}'
query 'up{job="meshd"}'
echo '# meshd_connections_total (after 20 requests to "web")'
query 'meshd_connections_total{job="meshd"}'
echo '# meshd_backend_up'
query 'meshd_backend_up{job="meshd"}'
echo '# ALERTS (rules from deploy/prometheus/meshd.rules.yml)'
query 'ALERTS'
echo "OK: Prometheus scraped meshd, saw every connection and evaluated the alert rules"
