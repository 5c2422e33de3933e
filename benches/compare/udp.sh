#!/usr/bin/env bash
# DNS over UDP, queries per second: a client (dnsperf) straight to a DNS server (direct),
# through meshd (protocol = "udp", udp_responses = 1), and through nginx `stream` (`listen
# ... udp`, proxy_responses 1), on loopback; with the CPU time per query of the process in
# the middle (meshd, nginx with its workers; dnsmasq itself for direct), from /proc. See
# docs/BENCHMARKS.md, "UDP (DNS)".
#
#   benches/compare/udp.sh                  # 3 rounds x 5 s per target; medians
#   DUR=2 ROUNDS=1 benches/compare/udp.sh   # smoke run
#
# Environment (all optional):
#   DUR=5          seconds per measurement (dnsperf -l)
#   ROUNDS=3       rounds; each runs direct, meshd, nginx once, in that order
#   CLIENTS=4      dnsperf -c (client sockets: flows)
#   OUTSTANDING=100  dnsperf -q (queries in flight at once)
#   THREADS=1      meshd --threads, nginx worker_processes
#   MESHD=path     the meshd binary (default: target/release/meshd, built if missing)
#   OUT_DIR=bench-out  the raw dnsperf outputs and a udp.tsv table go there
#
# Needs dnsmasq, dnsperf, nginx and its stream module (Debian: dnsmasq-base, dnsperf,
# nginx-light, libnginx-mod-stream); as root it installs what is missing (not with
# NO_INSTALL=1), otherwise it says which is missing and exits 1. Every
# process started here is stopped on every exit path; everything is bounded in time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DUR="${DUR:-5}"
ROUNDS="${ROUNDS:-3}"
CLIENTS="${CLIENTS:-4}"
OUTSTANDING="${OUTSTANDING:-100}"
THREADS="${THREADS:-1}"
OUT_DIR="${OUT_DIR:-bench-out}"
MESHD="${MESHD:-$ROOT/target/release/meshd}"

DNSMASQ="$(command -v dnsmasq || echo /usr/sbin/dnsmasq)"
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
missing=()
[[ -x "$DNSMASQ" ]] || missing+=(dnsmasq-base)
command -v dnsperf >/dev/null || missing+=(dnsperf)
[[ -x "$NGINX" ]] || missing+=(nginx-light)
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
if (( ${#missing[@]} )) && [[ -z "${NO_INSTALL:-}" ]] && [[ $(id -u) -eq 0 ]]; then
  echo "udp.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  missing=()
  [[ -x "$(command -v dnsmasq || echo /usr/sbin/dnsmasq)" ]] || missing+=(dnsmasq-base)
  command -v dnsperf >/dev/null || missing+=(dnsperf)
  [[ -x "$(command -v nginx || echo /usr/sbin/nginx)" ]] || missing+=(nginx-light)
  [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
  DNSMASQ="$(command -v dnsmasq || echo /usr/sbin/dnsmasq)"
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
fi
if (( ${#missing[@]} )); then
  echo "udp.sh: missing: ${missing[*]} (apt-get install ${missing[*]}; as root this script installs them unless NO_INSTALL=1)" >&2
  exit 1
fi
if [[ ! -x "$MESHD" ]]; then
  echo "udp.sh: building meshd (release)" >&2
  cargo build --release --bin meshd >&2
fi

mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() {
  python3 -c 'import socket
while True:
    t=socket.socket(); t.bind(("127.0.0.1",0)); p=t.getsockname()[1]
    try:
        u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.bind(("127.0.0.1",p)); u.close()
        u=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); u.bind(("127.0.0.2",p)); u.close()
    except OSError: continue
    print(p); break'
}

wait_udp_answer() { # port: until a query through it is answered (10 s)
  for _ in $(seq 100); do
    if dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/q.txt" -n 1 -t 1 2>/dev/null | grep -q 'Queries completed: *1 '; then
      return 0
    fi
    sleep 0.1
  done
  echo "udp.sh: nothing answers on port $1" >&2
  return 1
}

printf 'who.test A\n' > "$WORK/q.txt"

# The DNS server: dnsmasq answering who.test from its own table (no upstream).
BACKEND_PORT="$(free_port)"
"$DNSMASQ" --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
  --bind-interfaces --listen-address=127.0.0.2 --port="$BACKEND_PORT" --pid-file= \
  --user=root --address=/who.test/10.0.0.2 --cache-size=0 2>"$WORK/dnsmasq.log" &
PIDS+=($!)

MESHD_PORT="$(free_port)"
ADMIN_PORT="$(free_port)"
cat > "$WORK/mesh.toml" <<EOF
[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[service]]
name = "dns"
protocol = "udp"
listen = ["127.0.0.1:$MESHD_PORT"]
backends = ["127.0.0.2:$BACKEND_PORT"]
udp_responses = 1
[service.health]
check = "none"
EOF
RUST_LOG=warn "$MESHD" --config "$WORK/mesh.toml" --threads "$THREADS" 2>"$WORK/meshd.log" &
PIDS+=($!)

NGINX_PORT="$(free_port)"
cat > "$WORK/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $THREADS;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.log warn;
events { worker_connections 65536; }
stream {
  server {
    listen 127.0.0.1:$NGINX_PORT udp;
    proxy_pass 127.0.0.2:$BACKEND_PORT;
    proxy_responses 1;
    proxy_timeout 10s;
  }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -e "$WORK/nginx.log" &
PIDS+=($!)
NGINX_PID=$!
MESHD_PID=${PIDS[1]}
DNSMASQ_PID=${PIDS[0]}

# CPU time (ms) of a process and its children (nginx's workers), from /proc.
cpu_ms() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
    [[ -r /proc/$p/stat ]] || continue
    total=$((total + $(awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$p/stat")))
  done
  echo $((total * 1000 / $(getconf CLK_TCK)))
}

declare -A PORT=([direct]="$BACKEND_PORT" [meshd]="$MESHD_PORT" [nginx]="$NGINX_PORT")
declare -A SERVER=([direct]=127.0.0.2 [meshd]=127.0.0.1 [nginx]=127.0.0.1)
for t in direct meshd nginx; do
  if [[ $t == direct ]]; then
    for _ in $(seq 100); do
      dnsperf -s 127.0.0.2 -p "$BACKEND_PORT" -d "$WORK/q.txt" -n 1 -t 1 2>/dev/null | grep -q 'Queries completed: *1 ' && break
      sleep 0.1
    done
  else
    wait_udp_answer "${PORT[$t]}"
  fi
done

declare -A QPS LOST LAT CPU
declare -A PROXY_PID=([direct]="$DNSMASQ_PID" [meshd]="$MESHD_PID" [nginx]="$NGINX_PID")
for r in $(seq "$ROUNDS"); do
  for t in direct meshd nginx; do
    out="$OUT_DIR/udp-$t-$r.txt"
    c0="$(cpu_ms "${PROXY_PID[$t]}")"
    timeout $((DUR + 30)) dnsperf -s "${SERVER[$t]}" -p "${PORT[$t]}" -d "$WORK/q.txt" \
      -c "$CLIENTS" -q "$OUTSTANDING" -l "$DUR" -t 2 > "$out" 2>&1 || true
    c1="$(cpu_ms "${PROXY_PID[$t]}")"
    q="$(awk '/Queries per second:/ {print $4}' "$out")"
    n="$(awk '/Queries completed:/ {print $3}' "$out")"
    lost="$(awk '/Queries lost:/ {print $3}' "$out")"
    lat="$(awk '/Average Latency/ {print $4}' "$out")"
    # CPU per query of the process in the middle (dnsmasq itself for direct), in µs.
    cpu="$(echo "($c1 - $c0) * 1000 / (${n:-0} + 0.000001)" | bc -l)"
    QPS[$t]+="${q:-0} "
    LOST[$t]+="${lost:-?} "
    LAT[$t]+="${lat:-0} "
    CPU[$t]+="$cpu "
    printf 'round %s %s: %s q/s, lost %s, avg latency %s s, %.2f us CPU per query\n' \
      "$r" "$t" "${q:-?}" "${lost:-?}" "${lat:-?}" "$cpu" >&2
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
{
  printf 'target\tqueries_per_s\tavg_latency_ms\tcpu_us_per_query\tlost_per_round\n'
  for t in direct meshd nginx; do
    q="$(echo "${QPS[$t]}" | median)"
    l="$(echo "${LAT[$t]}" | median)"
    c="$(echo "${CPU[$t]}" | median)"
    printf '%s\t%.0f\t%.3f\t%.2f\t%s\n' "$t" "$q" "$(echo "$l * 1000" | bc -l)" "$c" "${LOST[$t]% }"
  done
} | tee "$OUT_DIR/udp.tsv"
