#!/usr/bin/env bash
# Takes a screenshot of meshd's status page (GET / on the admin address) as a person sees it,
# with headless Chromium (Debian's `chromium`, installed here when missing), in a realistic
# state: 50 backends over 3 services, a mix of
#   - healthy `meshd backend` processes (active),
#   - dead addresses (down: the health check fails),
#   - a service with slow_start = "120s" (every backend ramping, "slow-start"),
#   - one backend drained through the admin API while a connection is open ("draining",
#     with its drain bar),
# after some traffic (HTTP requests, echoed bytes).
#
#   scripts/status-screenshot.sh [OUT.png]        # default: target/status-screenshot.png
#   MESHD_BIN=/path/to/meshd scripts/status-screenshot.sh
#   SHOT_SIZE=800,1200 scripts/status-screenshot.sh   # window width,height (default 1400,2000)
#
# Bounded (about 20 s) and it stops every process it started.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/status-screenshot.png}
mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

BIN=${MESHD_BIN:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/meshd ]; then BIN=target/release/meshd
  elif [ -x target/debug/meshd ]; then BIN=target/debug/meshd
  else cargo build --quiet && BIN=target/debug/meshd
  fi
fi
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "status-screenshot: installing chromium" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi

TMP=$(mktemp -d -t meshd-shot-XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# 55 loopback ports free now: 50 backends, 3 listeners, the admin API, one spare.
mapfile -t PORTS < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(55)]
for s in ss: s.bind(("127.0.0.1", 0))
for s in ss: print(s.getsockname()[1])
for s in ss: s.close()')
ADMIN=${PORTS[50]}; L_WEB=${PORTS[51]}; L_API=${PORTS[52]}; L_ECHO=${PORTS[53]}

# backends "service" first count mode (dead = no process).
spec() { # index -> "addr"
  echo "{ addr = \"127.0.0.1:${PORTS[$1]}\" }"
}
start_backend() { # index name mode
  "$BIN" backend --listen "127.0.0.1:${PORTS[$1]}" --name "$2" --mode "$3" >/dev/null 2>&1 &
  PIDS+=($!)
}
list() { # from to -> toml array body
  local out=() i
  for ((i = $1; i < $2; i++)); do out+=("$(spec "$i")"); done
  (IFS=,; echo "${out[*]}")
}

# web: ports 0..19 (16 healthy, 4 dead); api: 20..34 (12 healthy and ramping, 3 dead);
# echo: 35..49 (14 healthy, one of them drained; 1 dead).
for ((i = 0; i < 16; i++)); do start_backend "$i" "web-$i" http; done
for ((i = 20; i < 32; i++)); do start_backend "$i" "api-$i" http; done
for ((i = 35; i < 49; i++)); do start_backend "$i" "echo-$i" echo; done
DRAINED=127.0.0.1:${PORTS[35]}

cat >"$TMP/mesh.toml" <<EOF
[admin]
listen = "127.0.0.1:$ADMIN"

[[service]]
name = "web"
listen = ["127.0.0.1:$L_WEB"]
balance = "round_robin"
backends = [$(list 0 20)]
[service.health]
check = "http"
path = "/healthz"
interval = "300ms"
timeout = "200ms"

[[service]]
name = "api"
listen = ["127.0.0.1:$L_API"]
balance = "least_conn"
slow_start = "120s"
max_connections = 500
backends = [$(list 20 35)]
[service.health]
check = "http"
path = "/healthz"
interval = "300ms"
timeout = "200ms"

[[service]]
name = "echo"
listen = ["127.0.0.1:$L_ECHO"]
balance = "round_robin"
drain_timeout = "10m"
backends = [$(list 35 50)]
[service.health]
check = "tcp"
interval = "300ms"
timeout = "200ms"
EOF
"$BIN" --config "$TMP/mesh.toml" >"$TMP/meshd.log" 2>&1 &
PIDS+=($!)

wait_for() { # seconds command...
  local secs=$1; shift
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { echo "timed out: $*" >&2; tail -n 20 "$TMP/meshd.log" >&2; exit 1; }
    sleep 0.2
  done
}
healthy() { # service n: at least n backends eligible
  curl -fsS "http://127.0.0.1:$ADMIN/api/v1/services" | python3 -c "
import json, sys
s = {x['name']: x for x in json.load(sys.stdin)['services']}
sys.exit(0 if s['$1']['healthy_backends'] >= $2 else 1)"
}
wait_for 15 curl -fsS "http://127.0.0.1:$ADMIN/readyz"
wait_for 15 healthy web 16
wait_for 15 healthy api 12
wait_for 15 healthy echo 14

# Traffic: 300 HTTP requests to web, 150 to api, 2 MiB echoed; then 14 connections to echo
# held open (round robin: one per healthy backend), so the drained one keeps a connection.
seq 300 | xargs -P 8 -I{} curl -fsS -o /dev/null "http://127.0.0.1:$L_WEB/"
seq 150 | xargs -P 8 -I{} curl -fsS -o /dev/null "http://127.0.0.1:$L_API/"
python3 - "$L_ECHO" <<'EOF'
import socket, sys
port = int(sys.argv[1])
for size in (1 << 20, 1 << 20):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"x" * size); s.shutdown(socket.SHUT_WR)
    got = 0
    while (b := s.recv(65536)):
        got += len(b)
    assert got == size, got
EOF
python3 - "$L_ECHO" "$TMP/held" <<'EOF' &
import socket, sys, time
port, flag = int(sys.argv[1]), sys.argv[2]
held = []
for _ in range(14):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"hold"); assert s.recv(4) == b"hold"
    held.append(s)
open(flag, "w").close()
time.sleep(120)
EOF
PIDS+=($!)
wait_for 10 test -f "$TMP/held"

# Drain one echo backend through the admin API; it keeps its held connection.
curl -fsS -X POST "http://127.0.0.1:$ADMIN/api/v1/services/echo/backends/$DRAINED/drain" >/dev/null
draining() {
  curl -fsS "http://127.0.0.1:$ADMIN/api/v1/services" | python3 -c "
import json, sys
for s in json.load(sys.stdin)['services']:
    for b in s['backends']:
        if b['addr'] == '$DRAINED':
            sys.exit(0 if b['status'] == 'draining' and b['active_connections'] >= 1 else 1)
sys.exit(1)"
}
wait_for 5 draining

echo "# what the admin API says (GET /api/v1/services): backends by status"
curl -fsS "http://127.0.0.1:$ADMIN/api/v1/services" | python3 -c '
import collections, json, sys
d = json.load(sys.stdin)
total = 0
for s in d["services"]:
    c = collections.Counter(b["status"] for b in s["backends"])
    total += len(s["backends"])
    print(s["name"], len(s["backends"]), "backends:", dict(sorted(c.items())),
          "connections:", sum(b["connections_total"] for b in s["backends"]))
print("total backends:", total)'

chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
  --user-data-dir="$TMP/chromium" --window-size="${SHOT_SIZE:-1400,2000}" --virtual-time-budget=5000 \
  --screenshot="$OUT" "http://127.0.0.1:$ADMIN/" >"$TMP/chromium.log" 2>&1 \
  || { cat "$TMP/chromium.log" >&2; exit 1; }
[ -s "$OUT" ] || { echo "no screenshot written" >&2; cat "$TMP/chromium.log" >&2; exit 1; }
echo "screenshot: $OUT ($(stat -c %s "$OUT") bytes)"
