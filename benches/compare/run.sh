#!/usr/bin/env bash
# Side-by-side comparison of meshd with HAProxy (with and without splice) and nginx stream,
# plus a direct (no proxy) baseline, on loopback. See docs/BENCHMARKS.md.
#
#   benches/compare/run.sh                     # default: 3 rounds x 5 s per measurement
#   DUR=1 ROUNDS=1 benches/compare/run.sh      # smoke run, under 2 minutes once meshd is built
#   benches/compare/run.sh profile             # syscalls per connection (strace -c), CPU per
#                                              # request (perf stat), hot symbols (perf record),
#                                              # TCP segments per request (/proc/net/snmp) for
#                                              # each proxy, and the cost of one system call
#                                              # (perf bench syscall basic) -> $OUT_DIR/profile/
#                                              # (PROXIES=meshd,haproxy,... PROFILE_CONNS=5000)
#
# Environment (all optional):
#   DUR=5            seconds per measurement (wrk -d, iperf3 -t)
#   ROUNDS=3         rounds; each round runs every target once per workload, in a fixed order
#                    (direct, meshd, HAProxy, HAProxy+splice, nginx); the table shows medians
#   THREADS=1        worker threads of every proxy: meshd --threads (1 = a current-thread
#                    runtime; TOKIO_WORKER_THREADS for builds without the flag), HAProxy
#                    nbthread, nginx worker_processes
#   PROXY_CPUS=1     taskset CPU list for the proxy under test
#   LOAD_CPUS=0      taskset CPU list for wrk / iperf3 -c / the idle client
#   BACKEND_CPUS=0   taskset CPU list for the backends (nginx http, iperf3 -s, the idle sink)
#   BACKEND_WORKERS=1  nginx worker_processes of the HTTP backend
#   HAPROXY_SPLICE=forced  HAProxy+splice uses `option splice-request` + `splice-response`
#                    (forced); `auto` = `option splice-auto`, which on loopback mostly keeps
#                    recv/send (see docs/BENCHMARKS.md)
#   WRK_CONNS=50     wrk connections
#   IDLE_CONNS=10000 idle connections held through each proxy (capped by the open-files limit:
#                    the proxy needs two descriptors per connection)
#   TARGETS=direct,meshd,haproxy,haproxy_splice,nginx   WORKLOADS=keepalive,close,bulk,idle
#   MESHD=path       use this meshd binary instead of building one
#   CARGO_TARGET_DIR where to build meshd (default /tmp/bench-target)
#   OUT_DIR=bench-out   OUT=$OUT_DIR/compare.json   PNG=${OUT%.json}.png
#   QUIET_WAIT=60    before each measurement wait up to this many seconds for the machine to
#                    be quiet (total CPU busy < QUIET_PCT=10 % of a core); 0 = do not wait.
#                    With ROUNDS=1 (smoke) the defaults are QUIET_WAIT=0 RETRIES=0.
#                    Every measurement also records the CPU that processes other than the
#                    benchmark's used meanwhile; above FOREIGN_MAX=15 (% of a core) the
#                    measurement is taken again, up to RETRIES=3 times.
#   NO_INSTALL=1     do not apt-get anything
#
# Everything runs on 127.0.0.1 and is bounded in time; every process started here is
# stopped on every exit path.
set -euo pipefail

CMD="${1:-run}"
case "$CMD" in run|profile) ;; *) echo "usage: $0 [run|profile]" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benches/compare"
cd "$ROOT"

DUR="${DUR:-5}"
ROUNDS="${ROUNDS:-3}"
THREADS="${THREADS:-1}"
NCPU="$(nproc)"
if [[ -z "${PROXY_CPUS:-}" ]]; then
  if (( NCPU >= 2 )) && (( THREADS == 1 )); then PROXY_CPUS=1; else PROXY_CPUS="0-$((NCPU - 1))"; fi
fi
LOAD_CPUS="${LOAD_CPUS:-0}"
BACKEND_CPUS="${BACKEND_CPUS:-0}"
BACKEND_WORKERS="${BACKEND_WORKERS:-1}"
WRK_CONNS="${WRK_CONNS:-50}"
IDLE_CONNS="${IDLE_CONNS:-10000}"
TARGETS="${TARGETS:-direct,meshd,haproxy,haproxy_splice,nginx}"
WORKLOADS="${WORKLOADS:-keepalive,close,bulk,idle}"
OUT_DIR="${OUT_DIR:-$ROOT/bench-out}"
OUT="${OUT:-$OUT_DIR/compare.json}"
PNG="${PNG:-${OUT%.json}.png}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/tmp/bench-target}"

say() { printf '[run.sh] %s\n' "$*" >&2; }

# --- tools -----------------------------------------------------------------------------
need_pkgs=()
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
command -v nginx >/dev/null || need_pkgs+=(nginx)
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || need_pkgs+=(libnginx-mod-stream)
command -v wrk >/dev/null || need_pkgs+=(wrk)
command -v iperf3 >/dev/null || need_pkgs+=(iperf3)
command -v taskset >/dev/null || need_pkgs+=(util-linux)
command -v ss >/dev/null || need_pkgs+=(iproute2)
PY="${PYTHON:-/usr/bin/python3}"
[[ -x "$PY" ]] || PY="$(command -v python3)"
"$PY" -c 'import matplotlib' 2>/dev/null || need_pkgs+=(python3-matplotlib)
if [[ "$CMD" == profile ]]; then
  command -v strace >/dev/null || need_pkgs+=(strace)
  command -v perf >/dev/null || need_pkgs+=(linux-perf)
  command -v ab >/dev/null || need_pkgs+=(apache2-utils)
fi
if (( ${#need_pkgs[@]} )); then
  if [[ -n "${NO_INSTALL:-}" ]]; then
    say "missing: ${need_pkgs[*]} (NO_INSTALL set; continuing without them may fail)"
  else
    say "installing: ${need_pkgs[*]}"
    SUDO=""; (( EUID == 0 )) || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The stock Debian nginx service may have started on port 80: we never use it.
  fi
fi
# matplotlib from apt lives in the system interpreter.
if ! "$PY" -c 'import matplotlib' 2>/dev/null && [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; fi

# --- meshd -------------------------------------------------------------------------------
if [[ -z "${MESHD:-}" ]]; then
  say "building meshd (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  cargo build --release --quiet --bin meshd
  MESHD="$CARGO_TARGET_DIR/release/meshd"
fi
[[ -x "$MESHD" ]] || { say "MESHD=$MESHD is not an executable"; exit 1; }

# --- limits ------------------------------------------------------------------------------
# Every process inherits this: the proxies need 2 descriptors per idle connection, the
# client and the sink one each.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE="$(ulimit -n)"
[[ "$NOFILE" == unlimited ]] && NOFILE=1048576
MAX_IDLE=$(( (NOFILE - 1200) / 2 ))
if (( IDLE_CONNS > MAX_IDLE )); then
  say "open-files limit is $NOFILE (hard): holding $MAX_IDLE idle connections, not $IDLE_CONNS"
  IDLE_CONNS=$MAX_IDLE
fi

# --- run ---------------------------------------------------------------------------------
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d /tmp/meshd-compare.XXXXXX)"
PYPID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [[ -n "$PYPID" ]] && kill -0 "$PYPID" 2>/dev/null; then
    kill -TERM "$PYPID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$PYPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PYPID" 2>/dev/null || true
  fi
  # Whatever the helper recorded and did not stop itself (it was killed, say).
  if [[ -f "$WORK/pids" ]]; then
    while read -r pid name; do
      if kill -0 "$pid" 2>/dev/null; then
        say "stopping leftover $name ($pid)"
        kill -TERM "$pid" 2>/dev/null || true
      fi
    done <"$WORK/pids"
    sleep 0.5
    while read -r pid _; do kill -KILL "$pid" 2>/dev/null || true; done <"$WORK/pids"
  fi
  if [[ -n "${KEEP_WORK:-}" || $rc -ne 0 ]]; then say "logs and configs: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if (( ROUNDS <= 1 )); then QUIET_WAIT="${QUIET_WAIT:-0}"; RETRIES="${RETRIES:-0}"; fi
say "proxy cpus $PROXY_CPUS, load generator cpus $LOAD_CPUS, backend cpus $BACKEND_CPUS, $THREADS proxy thread(s)"
say "$ROUNDS round(s) x $DUR s; work dir $WORK"
if [[ "$CMD" == profile ]]; then
  "$PY" "$HERE/compare.py" profile \
    --work "$WORK" --outdir "$OUT_DIR/profile" --meshd "$MESHD" --n "${PROFILE_CONNS:-5000}" \
    --dur "$DUR" --threads "$THREADS" \
    --proxy-cpus "$PROXY_CPUS" --load-cpus "$LOAD_CPUS" --backend-cpus "$BACKEND_CPUS" \
    --backend-workers "$BACKEND_WORKERS" --wrk-conns "$WRK_CONNS" --nofile "$NOFILE" \
    --haproxy-splice "${HAPROXY_SPLICE:-forced}" \
    --proxies "${PROXIES:-meshd,haproxy,haproxy_splice,nginx}" &
  PYPID=$!
  wait "$PYPID"
  exit 0
fi
"$PY" "$HERE/compare.py" run \
  --work "$WORK" --out "$OUT" --png "$PNG" --meshd "$MESHD" \
  --dur "$DUR" --rounds "$ROUNDS" --threads "$THREADS" \
  --proxy-cpus "$PROXY_CPUS" --load-cpus "$LOAD_CPUS" --backend-cpus "$BACKEND_CPUS" \
  --backend-workers "$BACKEND_WORKERS" --wrk-conns "$WRK_CONNS" --idle-conns "$IDLE_CONNS" \
  --nofile "$NOFILE" --quiet-wait "${QUIET_WAIT:-60}" --quiet-pct "${QUIET_PCT:-10}" \
  --foreign-max "${FOREIGN_MAX:-15}" --retries "${RETRIES:-3}" \
  --haproxy-splice "${HAPROXY_SPLICE:-forced}" \
  --targets "$TARGETS" --workloads "$WORKLOADS" &
PYPID=$!
wait "$PYPID"
