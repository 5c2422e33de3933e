#!/usr/bin/env bash
# TLS termination and passthrough (issue #16), meshd side by side with HAProxy, on loopback.
# See docs/BENCHMARKS.md, "TLS termination and passthrough (issue #16)".
#
#   benches/compare/tls.sh                      # 3 rounds x 5 s per measurement, ~4 minutes
#   DUR=2 ROUNDS=1 benches/compare/tls.sh       # smoke run
#
# Workloads (every round runs each target once per workload, interleaved; medians):
#   hs_full    full TLS handshakes: a new connection per request, no session reuse (tls.py hs:
#              HS_PROCS client processes, each connect -> handshake -> GET / -> close)
#   hs_wrk     wrk -H 'Connection: close' over https: a new connection per request, but wrk
#              keeps its SSL objects, so it resumes sessions where the server allows it
#   bulk_term  wrk, BULK_CONNS keep-alive TLS connections downloading a BULK_MB file
#   bulk_pt    the same download through meshd passthrough (backend nginx `listen ssl`) and
#              meshd plain TCP (backend nginx http), and straight to nginx (direct_tls,
#              direct_plain)
# Targets: meshd_term (meshd [service.tls] mode = "terminate"), haproxy (`bind ... ssl crt`,
# mode tcp, plain to the backend), meshd_pt, meshd_plain, direct_tls, direct_plain.
# One proxy thread each (meshd --threads 1, HAProxy nbthread 1) on PROXY_CPUS; clients and
# backends on LOAD_CPUS. The same certificate for both proxies; TLS 1.2+ offered, TLS 1.3
# negotiated by default clients; no ALPN.
#
# Environment (all optional):
#   DUR=5  ROUNDS=3  PROXY_CPUS=1  LOAD_CPUS=0
#   CERT=rsa2048     rsa2048 or ecdsa (P-256): the self-signed certificate both proxies use
#   HS_PROCS=8       client processes of hs_full;  WRK_CONNS=50 wrk connections of hs_wrk
#   BULK_CONNS=4     wrk connections of the bulk workloads;  BULK_MB=100 file size (tmpfs)
#   WORKLOADS=hs_full,hs_wrk,bulk_term,bulk_pt
#   QUIET_WAIT=30 QUIET_PCT=10  wait before each measurement for the machine to be quiet
#   MESHD=path       the meshd binary (default: built into CARGO_TARGET_DIR=/tmp/bench-target)
#   OUT_DIR=bench-out   results: $OUT_DIR/tls.jsonl (one line per measurement), tls.md
#   PERF=1           after the rounds, perf record -g of each proxy during hs_full and
#                    bulk_term -> $OUT_DIR/tls-perf-*.txt
#   KEEP_WORK=1      keep the configs and logs
#
# Needs haproxy, nginx, wrk, openssl, python3 (as run.sh: installs wrk/haproxy/nginx when
# missing, unless NO_INSTALL=1). Everything runs on 127.0.0.1 and is bounded in time; every
# process started here is stopped on every exit path.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benches/compare"
cd "$ROOT"
DUR="${DUR:-5}"
ROUNDS="${ROUNDS:-3}"
PROXY_CPUS="${PROXY_CPUS:-1}"
LOAD_CPUS="${LOAD_CPUS:-0}"
CERT="${CERT:-rsa2048}"
HS_PROCS="${HS_PROCS:-8}"
WRK_CONNS="${WRK_CONNS:-50}"
BULK_CONNS="${BULK_CONNS:-4}"
BULK_MB="${BULK_MB:-100}"
WORKLOADS="${WORKLOADS:-hs_full,hs_wrk,bulk_term,bulk_pt}"
OUT_DIR="${OUT_DIR:-$ROOT/bench-out}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/bench-target}"
if (( ROUNDS <= 1 )); then QUIET_WAIT="${QUIET_WAIT:-0}"; fi
QUIET_WAIT="${QUIET_WAIT:-30}"
QUIET_PCT="${QUIET_PCT:-10}"
PY="$(command -v python3)"

say() { printf '[tls.sh] %s\n' "$*" >&2; }

need=()
for t in haproxy nginx wrk openssl taskset; do command -v "$t" >/dev/null || need+=("$t"); done
if (( ${#need[@]} )); then
  if [[ -n "${NO_INSTALL:-}" || $EUID -ne 0 ]]; then say "missing: ${need[*]}"; exit 1; fi
  pkgs=("${need[@]/taskset/util-linux}")
  pkgs=("${pkgs[@]/nginx/nginx-light}")
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
if [[ -z "${MESHD:-}" ]]; then
  say "building meshd (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  cargo build --release --quiet --bin meshd
  MESHD="$CARGO_TARGET_DIR/release/meshd"
fi

# Ports: backend nginx http / ssl; meshd terminate / passthrough / plain / admin; HAProxy.
B_HTTP=18480 B_TLS=18481 M_TERM=18490 M_PT=18491 M_PLAIN=18492 M_ADMIN=18499 H_TERM=18495
for p in $B_HTTP $B_TLS $M_TERM $M_PT $M_PLAIN $M_ADMIN $H_TERM; do
  if ss -Htln "sport = :$p" | grep -q .; then say "port $p is in use"; exit 1; fi
done

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mkdir -p "$OUT_DIR"
OUT="$OUT_DIR/tls.jsonl"
: >"$OUT"
WORK="$(mktemp -d /tmp/meshd-tls.XXXXXX)"
SHM="$(mktemp -d /dev/shm/meshd-tls.XXXXXX)"
PIDS=()
MPID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [[ -n "$MPID" ]]; then kill -TERM -- "-$MPID" 2>/dev/null || true; fi
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 30); do  # meshd drains for up to drain_timeout (1 s)
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$SHM"
  if [[ -n "${KEEP_WORK:-}" || $rc -ne 0 ]]; then say "logs and configs: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# --- certificate: one self-signed certificate for both proxies and the nginx backend -----
case "$CERT" in
  rsa2048) openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench.test \
             -addext subjectAltName=DNS:bench.test -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null ;;
  ecdsa)   openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
             -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
             -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null ;;
  *) say "CERT=$CERT: rsa2048 or ecdsa"; exit 2 ;;
esac
cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/haproxy.pem"
head -c "$((BULK_MB * 1024 * 1024))" /dev/zero | tr '\0' 'x' >"$SHM/big"
chmod 755 "$SHM" "$WORK"; chmod 644 "$SHM/big" "$WORK/cert.pem"  # nginx workers run as nobody

# --- configs -------------------------------------------------------------------------------
mkdir -p "$WORK/tmp"
cat >"$WORK/backend.conf" <<EOF
daemon off;
master_process on;
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    sendfile on;
    client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
    uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
    default_type text/plain;
    ssl_certificate $WORK/cert.pem;
    ssl_certificate_key $WORK/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22 leaves TLS 1.3 out by default
    server {
        listen 127.0.0.1:$B_HTTP backlog=4096;
        listen 127.0.0.1:$B_TLS ssl backlog=4096;
        location = /big { alias $SHM/big; }
        location / { return 200 "ok\n"; }
    }
}
EOF
cat >"$WORK/meshd.toml" <<EOF
[admin]
listen = "127.0.0.1:$M_ADMIN"

[log]
access_log = false

[defaults]
balance = "round_robin"
drain_timeout = "1s"
backlog = 4096
connect_timeout = "5s"

[[service]]
name = "term"
listen = ["127.0.0.1:$M_TERM"]
backends = [{ addr = "127.0.0.1:$B_HTTP" }]
[service.health]
check = "none"
[service.tls]
mode = "terminate"
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[[service]]
name = "pt"
listen = ["127.0.0.1:$M_PT"]
backends = [{ addr = "127.0.0.1:$B_TLS" }]
[service.health]
check = "none"
[service.tls]
mode = "passthrough"
sni_default = true

[[service]]
name = "plain"
listen = ["127.0.0.1:$M_PLAIN"]
backends = [{ addr = "127.0.0.1:$B_HTTP" }]
[service.health]
check = "none"
EOF
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 5000
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    backlog 4096
frontend f_tls
    bind 127.0.0.1:$H_TERM ssl crt $WORK/haproxy.pem
    default_backend b_http
backend b_http
    server s1 127.0.0.1:$B_HTTP
EOF

# --- processes -----------------------------------------------------------------------------
start() { # name cpus argv...
  local name="$1" cpus="$2"; shift 2
  taskset -c "$cpus" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  eval "PID_$name=$!"
}
wait_port() {
  for _ in $(seq 100); do ss -Htln "sport = :$1" | grep -q . && return 0; sleep 0.1; done
  say "nothing listens on $1 (see $WORK/*.log)"; exit 1
}
start backend "$LOAD_CPUS" nginx -e "$WORK/backend.err" -p "$WORK" -c "$WORK/backend.conf"
RUST_LOG=warn start meshd "$PROXY_CPUS" "$MESHD" --config "$WORK/meshd.toml" --threads 1
start haproxy "$PROXY_CPUS" haproxy -db -f "$WORK/haproxy.cfg"
for p in $B_HTTP $B_TLS $M_TERM $M_PT $M_PLAIN $H_TERM; do wait_port "$p"; done
# shellcheck disable=SC2154
say "meshd pid $PID_meshd, haproxy pid $PID_haproxy, backend nginx pid $PID_backend"
say "$("$MESHD" --version 2>/dev/null || echo meshd) | $(haproxy -v | head -1) | $(openssl version)"
say "certificate $CERT; proxy cpus $PROXY_CPUS, clients and backends cpus $LOAD_CPUS; $ROUNDS round(s) x $DUR s"
for t in "meshd_term $M_TERM" "haproxy $H_TERM" "meshd_pt $M_PT"; do
  set -- $t
  say "$1: negotiated $("$PY" "$HERE/tls.py" cipher 127.0.0.1 "$2"); resumption with a session offered: $("$PY" "$HERE/tls.py" resume 127.0.0.1 "$2")"
done
say "bulk check: $(curl -sk -o /dev/null -w '%{size_download} B via meshd_term, ' https://127.0.0.1:$M_TERM/big)$(curl -sk -o /dev/null -w '%{size_download} B via haproxy, ' https://127.0.0.1:$H_TERM/big)$(curl -sk -o /dev/null -w '%{size_download} B via meshd_pt' https://127.0.0.1:$M_PT/big)"

measure() { # round workload target pid argv...
  local r="$1" w="$2" t="$3" pid="$4"; shift 4
  "$PY" "$HERE/tls.py" quiet "$QUIET_PCT" "$QUIET_WAIT"
  # In its own process group, so that the trap stops the client too.
  MEASURE_TIMEOUT=$((DUR + 60)) setsid "$PY" "$HERE/tls.py" measure "$OUT" "$r" "$w" "$t" "$pid" -- taskset -c "$LOAD_CPUS" "$@" &
  MPID=$!
  wait "$MPID"
  MPID=""
}
WRK=(wrk -t1 -d"${DUR}s" --latency --timeout 5s)
for r in $(seq "$ROUNDS"); do
  for w in ${WORKLOADS//,/ }; do
    case "$w" in
      hs_full)
        measure "$r" "$w" meshd_term "$PID_meshd" "$PY" "$HERE/tls.py" hs 127.0.0.1 $M_TERM "$DUR" "$HS_PROCS"
        measure "$r" "$w" haproxy "$PID_haproxy" "$PY" "$HERE/tls.py" hs 127.0.0.1 $H_TERM "$DUR" "$HS_PROCS" ;;
      hs_wrk)
        measure "$r" "$w" meshd_term "$PID_meshd" "${WRK[@]}" -c"$WRK_CONNS" -H 'Connection: close' https://127.0.0.1:$M_TERM/
        measure "$r" "$w" haproxy "$PID_haproxy" "${WRK[@]}" -c"$WRK_CONNS" -H 'Connection: close' https://127.0.0.1:$H_TERM/ ;;
      bulk_term)
        measure "$r" "$w" meshd_term "$PID_meshd" "${WRK[@]}" -c"$BULK_CONNS" https://127.0.0.1:$M_TERM/big
        measure "$r" "$w" haproxy "$PID_haproxy" "${WRK[@]}" -c"$BULK_CONNS" https://127.0.0.1:$H_TERM/big ;;
      bulk_pt)
        measure "$r" "$w" meshd_pt "$PID_meshd" "${WRK[@]}" -c"$BULK_CONNS" https://127.0.0.1:$M_PT/big
        measure "$r" "$w" meshd_plain "$PID_meshd" "${WRK[@]}" -c"$BULK_CONNS" http://127.0.0.1:$M_PLAIN/big
        measure "$r" "$w" direct_tls 0 "${WRK[@]}" -c"$BULK_CONNS" https://127.0.0.1:$B_TLS/big
        measure "$r" "$w" direct_plain 0 "${WRK[@]}" -c"$BULK_CONNS" http://127.0.0.1:$B_HTTP/big ;;
      *) say "unknown workload $w"; exit 2 ;;
    esac
  done
done

"$PY" "$HERE/tls.py" summary "$OUT" | tee "$OUT_DIR/tls.md"

if [[ -n "${PERF:-}" ]] && command -v perf >/dev/null; then
  for t in "meshd $PID_meshd $M_TERM" "haproxy $PID_haproxy $H_TERM"; do
    set -- $t
    perf record -g -o "$WORK/perf-$1-hs.data" -p "$2" -- sleep "$DUR" >/dev/null 2>&1 &
    prec=$!
    taskset -c "$LOAD_CPUS" "$PY" "$HERE/tls.py" hs 127.0.0.1 "$3" "$DUR" "$HS_PROCS" >/dev/null
    wait "$prec" || true
    perf report -i "$WORK/perf-$1-hs.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null \
      | grep -v '^$' | grep -E '^ +[0-9]' >"$OUT_DIR/tls-perf-$1-hs_full.txt" || true
    perf report -i "$WORK/perf-$1-hs.data" --no-children --sort dso --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' >>"$OUT_DIR/tls-perf-$1-hs_full.txt" || true
    perf record -g -o "$WORK/perf-$1-bulk.data" -p "$2" -- sleep "$DUR" >/dev/null 2>&1 &
    prec=$!
    taskset -c "$LOAD_CPUS" "${WRK[@]}" -c"$BULK_CONNS" "https://127.0.0.1:$3/big" >/dev/null
    wait "$prec" || true
    perf report -i "$WORK/perf-$1-bulk.data" --no-children --percent-limit 1.5 --stdio 2>/dev/null \
      | grep -v '^$' | grep -E '^ +[0-9]' >"$OUT_DIR/tls-perf-$1-bulk_term.txt" || true
    perf report -i "$WORK/perf-$1-bulk.data" --no-children --sort dso --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' >>"$OUT_DIR/tls-perf-$1-bulk_term.txt" || true
    say "perf: $OUT_DIR/tls-perf-$1-{hs_full,bulk_term}.txt"
  done
fi
