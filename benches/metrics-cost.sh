#!/usr/bin/env bash
# What metrics cost per connection: meshd with [admin] metrics = true vs false, same
# backend, same load, interleaved rounds (A B A B ...), median connections/s of each.
#
#   benches/metrics-cost.sh            # MESHD=path ROUNDS=3 DUR=5 THREADS=1 to change
#
# Loopback only; cleans up what it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DUR=${DUR:-5}
THREADS=${THREADS:-1}
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
if [ -z "${MESHD:-}" ]; then
  cargo build --release --quiet
  MESHD=target/release/meshd
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
bport=$(port)
"$MESHD" backend --listen "127.0.0.1:$bport" --name b >/dev/null 2>&1 & pids+=($!)
declare -A listen admin
for mode in on off; do
  listen[$mode]=$(port); admin[$mode]=$(port)
  metrics=true; [ "$mode" = off ] && metrics=false
  cat > "$work/$mode.toml" <<TOML
[admin]
listen = "127.0.0.1:${admin[$mode]}"
metrics = $metrics
[[service]]
name = "web"
listen = ["127.0.0.1:${listen[$mode]}"]
backends = [{ addr = "127.0.0.1:$bport" }]
[service.health]
check = "none"
TOML
  taskset -c 1 "$MESHD" --threads "$THREADS" --config "$work/$mode.toml" 2>"$work/$mode.log" & pids+=($!)
done
sleep 1
declare -A runs
for r in $(seq "$ROUNDS"); do
  for mode in on off; do
    out=$(taskset -c 0 wrk -t1 -c50 -d"${DUR}s" -H 'Connection: close' "http://127.0.0.1:${listen[$mode]}/")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    runs[$mode]="${runs[$mode]:-} $rps"
    echo "round $r metrics=$mode: $rps conn/s"
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
on=$(median <<<"${runs[on]}"); off=$(median <<<"${runs[off]}")
echo "median conn/s: metrics on $on, off $off; on/off = $(python3 -c "print(f'{$on/$off:.3f}')")"
