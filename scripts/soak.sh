#!/usr/bin/env bash
# Memory and descriptor soak of the release meshd, on loopback only.
#
#   scripts/soak.sh DURATION          # seconds, default 300
#
# Starts two `meshd backend --mode http` and meshd with one service "web" over them (round
# robin, tcp health checks every 1 s), then for DURATION seconds runs at once
#   - keep-alive load:       ab -k -c CONC (HTTP/1.0 keep-alive),
#   - new-connection load:   ab -c CONC (one connection per request),
#   - a reload every RELOAD_EVERY seconds (the file is replaced by rename, alternating the
#     second backend's weight between 100 and 50, so every reload changes the table),
# and samples meshd's RSS, open descriptors and threads every SAMPLE seconds. /metrics is
# not scraped unless SCRAPE=1 (a soak without a Prometheus is the harder case: nothing
# drains what the exporter buffers). It prints the series and a verdict:
#   - RSS drift: the largest RSS after the warm-up against the RSS at the end of the warm-up
#     must be <= 10% (warm-up: the first 5 minutes when DURATION >= 600 s, else the first 20%);
#   - descriptors: within 15 s after the load stopped, back to the count before it started.
# Exit status 0 when both hold, 1 otherwise.
#
# Knobs: MESHD (default: cargo build --release, target/release/meshd), CONC=8,
# RELOAD_EVERY=2.5, SAMPLE=10, SCRAPE=0, THREADS (meshd --threads; default one per core).
# Any MALLOC_* variable (e.g. MALLOC_ARENA_MAX=2) is passed on to meshd. Needs ab (installs
# apache2-utils with apt-get if it is missing), curl, python3 (free ports). Every process
# it starts is stopped on every exit path.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-300}
CONC=${CONC:-8}
RELOAD_EVERY=${RELOAD_EVERY:-2.5}
SAMPLE=${SAMPLE:-10}
SCRAPE=${SCRAPE:-0}

if ! command -v ab >/dev/null; then
  echo "ab not found: installing apache2-utils" >&2
  if [ "$(id -u)" = 0 ]; then apt-get install -y -qq apache2-utils >/dev/null
  else sudo apt-get install -y -qq apache2-utils >/dev/null; fi
fi
if [ -z "${MESHD:-}" ]; then
  cargo build --release --quiet --bin meshd
  MESHD=target/release/meshd
fi

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Four free ports below the ephemeral range (an ephemeral one can be taken as some
# connection's source port before meshd binds it).
read -r P1 P2 PL PA < <(python3 -c '
import random, socket
ports, ss = [], []
while len(ports) < 4:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(20000, 32000)))
    except OSError:
        continue
    ss.append(s)
    ports.append(s.getsockname()[1])
for s in ss:
    s.close()  # before printing: the reader starts binding as soon as it has the line
print(*ports, flush=True)')

"$MESHD" backend --listen "127.0.0.1:$P1" --name one --mode http 2>/dev/null & pids+=($!)
"$MESHD" backend --listen "127.0.0.1:$P2" --name two --mode http 2>/dev/null & pids+=($!)

config() { # $1: the second backend's weight
  cat <<EOF
[admin]
listen = "127.0.0.1:$PA"

[[service]]
name = "web"
listen = ["127.0.0.1:$PL"]
balance = "round_robin"
backends = [{ addr = "127.0.0.1:$P1" }, { addr = "127.0.0.1:$P2", weight = $1 }]

[service.health]
check = "tcp"
interval = "1s"
EOF
}
config 100 >"$work/mesh.toml"
threads=()
[ -n "${THREADS:-}" ] && threads=(--threads "$THREADS")
RUST_LOG=warn "$MESHD" --config "$work/mesh.toml" "${threads[@]}" 2>"$work/meshd.log" & MPID=$!
pids+=($MPID)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$PA/readyz" >/dev/null 2>&1 && break
  kill -0 "$MPID" 2>/dev/null || { echo "meshd exited:"; cat "$work/meshd.log"; exit 1; }
  sleep 0.1
done
for _ in $(seq 30); do # both backends healthy
  n=$(curl -sf "http://127.0.0.1:$PA/api/v1/services" | python3 -c '
import json, sys; print(json.load(sys.stdin)["services"][0]["healthy_backends"])' 2>/dev/null || echo 0)
  [ "$n" = 2 ] && break
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PL/" >/dev/null || { echo "meshd does not serve"; cat "$work/meshd.log"; exit 1; }

rss() { awk '/^VmRSS/ {print $2}' "/proc/$MPID/status"; }
fds() { ls "/proc/$MPID/fd" | wc -l; }
nthreads() { awk '/^Threads/ {print $2}' "/proc/$MPID/status"; }

base_fds=$(fds)
start=$(date +%s)
end=$((start + DUR))

load() { # $1: log name, then ab's options. ab -t stops at 50,000 requests: run it again.
  local name=$1; shift
  while [ "$(date +%s)" -lt "$end" ]; do
    ab -q -r -s 5 -c "$CONC" -n 50000 -t $((end - $(date +%s) + 1)) "$@" \
      "http://127.0.0.1:$PL/" >>"$work/$name.log" 2>&1 || true
  done
}
load keepalive -k & pids+=($!)
load newconn & pids+=($!)
(
  w=100
  while [ "$(date +%s)" -lt "$end" ]; do
    sleep "$RELOAD_EVERY"
    if [ "$w" = 100 ]; then w=50; else w=100; fi
    config "$w" >"$work/mesh.toml.new" && mv "$work/mesh.toml.new" "$work/mesh.toml"
    echo >>"$work/reloads"
  done
) & pids+=($!)

echo "meshd pid $MPID ($MESHD), ${DUR}s: keep-alive and new-connection load (ab -c $CONC each),"
echo "a reload every ${RELOAD_EVERY}s, /metrics scraped: $([ "$SCRAPE" = 1 ] && echo every ${SAMPLE}s || echo no)"
echo "descriptors before the load: $base_fds"
printf '%6s %10s %6s %8s\n' t_s rss_kib fds threads
series=()
t=0
while [ "$t" -le "$DUR" ]; do
  r=$(rss)
  series+=("$t:$r")
  printf '%6d %10d %6d %8d\n' "$t" "$r" "$(fds)" "$(nthreads)"
  [ "$SCRAPE" = 1 ] && curl -sf "http://127.0.0.1:$PA/metrics" >/dev/null
  [ "$t" -ge "$DUR" ] && break
  sleep "$SAMPLE"
  t=$(( $(date +%s) - start ))
  [ "$t" -gt "$DUR" ] && t=$DUR
done
wait "${pids[@]:3:3}" 2>/dev/null || true

after_fds=$(fds)
for _ in $(seq 15); do
  [ "$after_fds" -le "$base_fds" ] && break
  sleep 1
  after_fds=$(fds)
done

sum() { grep -h "^$1" "$work/$2.log" | awk '{s += $(NF)} END {print s + 0}'; }
svc=$(curl -sf "http://127.0.0.1:$PA/api/v1/services")
echo "requests: keep-alive $(sum 'Complete requests' keepalive) ($(sum 'Failed requests' keepalive) failed)," \
  "new connections $(sum 'Complete requests' newconn) ($(sum 'Failed requests' newconn) failed)"
echo "reloads: written $(wc -l <"$work/reloads" 2>/dev/null || echo 0), counted" \
  "$(echo "$svc" | python3 -c 'import json,sys; r=json.load(sys.stdin)["reloads"]; print(r["ok"], "ok,", r["error"], "rejected")')"

warm=$(( DUR >= 600 ? 300 : DUR / 5 ))
python3 - "$warm" "$base_fds" "$after_fds" "${series[@]}" <<'EOF'
import sys
warm, base_fds, after_fds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
pts = [tuple(map(int, p.split(":"))) for p in sys.argv[4:]]
at_warm = next(r for t, r in pts if t >= warm)
peak = max(r for t, r in pts if t >= warm)
drift = (peak - at_warm) / at_warm * 100
ok_rss = drift <= 10
ok_fds = after_fds <= base_fds
print(f"RSS: {pts[0][1]} KiB at start, {at_warm} KiB after the {warm} s warm-up, peak after it "
      f"{peak} KiB, last {pts[-1][1]} KiB: drift {drift:+.1f}% ({'ok' if ok_rss else 'FAIL'}: <= 10%)")
print(f"descriptors: {base_fds} before the load, {after_fds} after it ({'ok' if ok_fds else 'FAIL'})")
print("verdict:", "ok" if ok_rss and ok_fds else "FAIL")
sys.exit(0 if ok_rss and ok_fds else 1)
EOF
