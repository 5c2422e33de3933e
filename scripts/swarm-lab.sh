#!/usr/bin/env bash
# A real multi-node Docker Swarm on one machine, to try meshd across nodes (issue #17).
#
#   scripts/swarm-lab.sh up [--managers 3] [--nodes N] [--image TAG]
#                                     # 3 nodes: this engine + 2 more (--managers 3: 4 nodes,
#                                     # nodes 1-3 managers and node 4 a worker)
#   scripts/swarm-lab.sh status
#   scripts/swarm-lab.sh demo         # meshd on every node, a labelled service on every node,
#                                     # a client on a worker's meshd reaches every node
#   scripts/swarm-lab.sh update       # a rolling update of the demo app under ab, through
#                                     # the worker's meshd (bounded: 90 s of load at most)
#   scripts/swarm-lab.sh phases       # scale down, start-first update, scale up, stop-first
#                                     # update, rollback: each under ab through the last
#                                     # node's meshd (a worker), errors counted per phase
#   scripts/swarm-lab.sh partition    # node 2 cut off (link down) and back, under ab through
#                                     # the last node's meshd (bounded: 100 s of load at most);
#                                     # when every other node's meshd stopped routing to it
#   scripts/swarm-lab.sh failover     # (--managers 3) the engine of the manager a worker's
#                                     # meshd follows is stopped under load, then started again
#   scripts/swarm-lab.sh locality     # mesh.locality=prefer_local / local_only on the demo
#                                     # app: which node answers node 3's clients
#   scripts/swarm-lab.sh overlay      # checks container-to-container traffic over VXLAN
#   scripts/swarm-lab.sh down         # removes everything `up` and `demo` created
#
# Node 1 is this machine's Docker engine (the swarm's first manager). Nodes 2 and 3 are
# extra dockerd processes, each in its own network namespace (and UTS namespace, for its
# own hostname), joined to a bridge in the root namespace:
#
#   root ns: bridge meshlab0 10.213.0.1/24  <- node 1 advertises this address
#              |-- veth mlab-n2 <-> netns meshlab-node2: eth0 10.213.0.2/24, dockerd
#              `-- veth mlab-n3 <-> netns meshlab-node3: eth0 10.213.0.3/24, dockerd
#
# Each extra dockerd has its own config file (this machine's /etc/docker/daemon.json sets
# data-root, which two daemons cannot share), data root (/var/lib/meshd-lab/NODE), exec
# root and socket (/run/meshd-lab/NODE.sock), the storage driver of this machine's engine,
# and its own iptables rules and docker0 (in its own namespace, they touch nothing of the
# machine's engine). Images come from this engine by `docker save | docker load` (no
# registry). Needs root, iproute2, nsenter/unshare (util-linux), iptables.
#
# Env: MESHD_LAB_NET (default 10.213.0: the /24 used), MESHD_LAB_IMAGE (default meshd:lab,
# built with deploy/build-image.sh when missing), MESHD_LAB_PORT (18080: the demo's
# published port) and MESHD_LAB_ADMIN (19901: meshd's admin port), on every node.
set -euo pipefail

NET=${MESHD_LAB_NET:-10.213.0}
BRIDGE=meshlab0
RUN=/run/meshd-lab
DATA=/var/lib/meshd-lab
STATE=$RUN/state
IMAGE=${MESHD_LAB_IMAGE:-meshd:lab}
NODES=3
MANAGERS=1
# demo: the published port and meshd's admin port (on every node's host network)
PORT=${MESHD_LAB_PORT:-18080}
ADMIN=${MESHD_LAB_ADMIN:-19901}
PREFIX=meshlab

here=$(cd "$(dirname "$0")/.." && pwd)

log() { printf 'swarm-lab: %s\n' "$*"; }
die() { printf 'swarm-lab: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

node_ns() { echo "meshlab-node$1"; }
node_sock() { echo "$RUN/node$1.sock"; }
node_addr() { echo "$NET.$1"; }
# docker on node N (1 = this machine's engine)
dk() {
  local n=$1; shift
  if [ "$n" = 1 ]; then docker "$@"; else docker -H "unix://$(node_sock "$n")" "$@"; fi
}
# runs a command in node N's network namespace
in_node() {
  local n=$1; shift
  if [ "$n" = 1 ]; then "$@"; else nsenter --net="/run/netns/$(node_ns "$n")" -- "$@"; fi
}

# (always status 0: `x=$(state_get k)` must not stop the script under set -e)
state_get() { if [ -f "$STATE" ]; then sed -n "s/^$1=//p" "$STATE" | tail -1; fi; }
state_set() { mkdir -p "$RUN"; echo "$1=$2" >>"$STATE"; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (network namespaces, a second dockerd)"; }

# === up ===

check_free() {
  if ! command -v nsenter >/dev/null || ! command -v unshare >/dev/null || ! command -v setsid >/dev/null; then
    die "needs nsenter, unshare and setsid (util-linux)"
  fi
  command -v dockerd >/dev/null || die "no dockerd on PATH"
  docker info >/dev/null 2>&1 || die "this machine's Docker engine does not answer (docker info)"
  local st
  st=$(docker info -f '{{.Swarm.LocalNodeState}}')
  [ "$st" = inactive ] || die "this machine's engine is already in a swarm ($st); the lab makes its own: leave it first (docker swarm leave --force) or use that one"
  # a route covering the /24 (other than the default route) or inside it, or an address in it
  if { ip -4 route show match "$NET.0/24"; ip -4 route show root "$NET.0/24"; } | grep -qv '^default' ||
    ip -4 -o addr show | awk '{print $4}' | grep -q "^$NET\."; then
    die "$NET.0/24 is in use on this machine (ip addr/ip route); set MESHD_LAB_NET to a free /24 prefix, e.g. MESHD_LAB_NET=10.214.0"
  fi
  ip link show "$BRIDGE" >/dev/null 2>&1 && die "a link $BRIDGE exists already: a lab left over? run: $0 down"
  local n
  for n in $(seq 2 "$NODES"); do
    [ -e "/run/netns/$(node_ns "$n")" ] && die "netns $(node_ns "$n") exists already: run: $0 down"
  done
  return 0
}

make_network() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$(node_addr 1)/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Docker's FORWARD policy is DROP, and with br_netfilter bridged frames go through it:
  # without this, nodes 2 and 3 cannot reach each other (node 1 is the bridge itself).
  iptables -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment meshd-lab -j ACCEPT
  local n ns
  for n in $(seq 2 "$NODES"); do
    ns=$(node_ns "$n")
    ip netns add "$ns"
    ip link add "mlab-n$n" type veth peer name eth0 netns "$ns"
    ip link set "mlab-n$n" master "$BRIDGE" up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$(node_addr "$n")/24" dev eth0
    ip -n "$ns" link set eth0 up
    # No default route on purpose: the swarm agent tries to pull a task's image before it
    # uses the local copy, and with a route to nowhere that waits for the DNS timeout
    # (10 s per task start); without one the lookup fails at once.
  done
}

start_engine() {
  local n=$1 ns dir driver
  ns=$(node_ns "$n")
  dir=$RUN/node$n
  driver=$(docker info -f '{{.Driver}}')
  mkdir -p "$dir" "$DATA/node$n"
  # Its own config file: the machine's daemon.json names a data-root, and dockerd refuses a
  # flag and a config key for the same setting. The MTU of the machine's engine, if set.
  local mtu
  mtu=$(sed -n 's/.*"mtu": *\([0-9]*\).*/\1/p' /etc/docker/daemon.json 2>/dev/null || true)
  if [ -n "$mtu" ]; then echo "{\"mtu\": $mtu}" >"$dir/daemon.json"; else echo '{}' >"$dir/daemon.json"; fi
  # nsenter --net, not `ip netns exec`: the latter remounts /sys for the namespace, which
  # hides the cgroup mounts (dockerd: "Devices cgroup isn't mounted"). unshare --uts gives
  # the node its own hostname (docker node ls, {{.Node.Hostname}}).
  # setsid: its own session, so that closing the terminal `up` ran in does not stop it.
  # shellcheck disable=SC2016 # $1 and $@ are the inner shell's
  setsid nsenter --net="/run/netns/$ns" -- unshare --uts -- sh -c '
    hostname "$1"; shift
    exec "$@"' sh "lab-node$n" \
    dockerd --config-file "$dir/daemon.json" \
      --data-root "$DATA/node$n" --exec-root "$dir/exec" \
      -H "unix://$(node_sock "$n")" --pidfile "$dir/dockerd.pid" \
      --storage-driver "$driver" \
    >"$dir/dockerd.log" 2>&1 </dev/null &
  local pid=$!
  local end=$((SECONDS + 60))
  until dk "$n" info >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { tail -20 "$dir/dockerd.log" >&2; die "dockerd of node $n exited (log above: $dir/dockerd.log)"; }
    [ $SECONDS -lt $end ] || { tail -20 "$dir/dockerd.log" >&2; die "dockerd of node $n does not answer after 60s"; }
    sleep 0.2
  done
}

load_image() {
  local img=$1 n
  for n in $(seq 2 "$NODES"); do
    docker save "$img" | dk "$n" load -q >/dev/null
  done
}

rss_kib() { ps -o rss= -p "$1" 2>/dev/null | tr -d ' '; }

engine_line() {
  local n=$1 pid cpid role
  if [ "$n" = 1 ]; then
    pid=$(pgrep -x dockerd | head -1 || true)
    echo "node 1  $(hostname) (this machine's engine)  $(node_addr 1)  unix:///var/run/docker.sock  manager  dockerd pid ${pid:-?} RSS $(( $(rss_kib "${pid:-0}" || echo 0) / 1024 )) MiB"
    return
  fi
  pid=$(cat "$RUN/node$n/dockerd.pid" 2>/dev/null || true)
  cpid=$(pgrep -P "${pid:-0}" -x containerd 2>/dev/null | head -1 || true)
  role=$(dk "$n" info -f '{{.Swarm.ControlAvailable}}' 2>/dev/null || echo '?')
  case $role in true) role=manager ;; false) role=worker ;; esac
  echo "node $n  lab-node$n  $(node_addr "$n")  unix://$(node_sock "$n")  $role  dockerd pid ${pid:-?} RSS $(( $(rss_kib "${pid:-0}" || echo 0) / 1024 )) MiB, its containerd RSS $(( $(rss_kib "${cpid:-0}" || echo 0) / 1024 )) MiB"
}

# the EXIT trap of `up` until it succeeds
up_failed() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    log "up failed (exit $rc): tearing down"
    cmd_down || true
  fi
}

cmd_up() {
  local nodes_arg=""
  while [ $# -gt 0 ]; do
    case $1 in
      --managers) MANAGERS=$2; shift 2 ;;
      --nodes) nodes_arg=$2; shift 2 ;;
      --image) IMAGE=$2; shift 2 ;;
      *) die "up: unknown argument $1 (up [--managers 1|3] [--nodes N] [--image TAG])" ;;
    esac
  done
  case $MANAGERS in 1 | 3) ;; *) die "--managers: 1 or 3" ;; esac
  # With three managers, a fourth node is a worker: its meshd follows a manager's (what
  # `failover` shows). The /24 gives room for up to 9 nodes here.
  [ "$MANAGERS" = 3 ] && NODES=4
  NODES=${nodes_arg:-$NODES}
  case $NODES in [2-9]) ;; *) die "--nodes: 2 to 9" ;; esac
  [ "$NODES" -ge "$MANAGERS" ] || die "--nodes $NODES: fewer nodes than --managers $MANAGERS"
  need_root
  if [ -f "$STATE" ]; then
    log "already up (state in $STATE); \`$0 down\` first to start again"
    cmd_status
    exit 0
  fi
  check_free
  local t0 t
  t0=$(now)
  # From here on, a failure tears down what was made.
  trap up_failed EXIT
  state_set managers "$MANAGERS"
  state_set nodes "$NODES"
  docker network inspect docker_gwbridge >/dev/null 2>&1 && state_set gwbridge_before 1

  if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "image $IMAGE missing: building it (deploy/build-image.sh $IMAGE)"
    t=$(now)
    "$here/deploy/build-image.sh" "$IMAGE"
    state_set built_image "$IMAGE"
    log "image built in $(since "$t")s (not counted in the start time)"
    t0=$(now)
  fi
  state_set image "$IMAGE"

  t=$(now); make_network; log "network: bridge $BRIDGE $(node_addr 1)/24, $((NODES - 1)) namespaces ($(since "$t")s)"
  local n
  t=$(now)
  for n in $(seq 2 "$NODES"); do start_engine "$n" & done
  local fail=0
  for n in $(seq 2 "$NODES"); do wait -n || fail=1; done
  [ $fail = 0 ] || die "an engine did not start"
  log "engines: $((NODES - 1)) dockerd started ($(since "$t")s)"

  t=$(now)
  docker swarm init --advertise-addr "$(node_addr 1)" >/dev/null
  state_set swarm 1
  local wtok mtok
  wtok=$(docker swarm join-token -q worker)
  mtok=$(docker swarm join-token -q manager)
  # nodes 2..MANAGERS join as managers, the others as workers
  for n in $(seq 2 "$NODES"); do
    local tok=$wtok
    [ "$n" -le "$MANAGERS" ] && tok=$mtok
    dk "$n" swarm join --token "$tok" --advertise-addr "$(node_addr "$n")" "$(node_addr 1):2377" >/dev/null
  done
  log "swarm: initialised on $(node_addr 1), $((NODES - 1)) joined ($((MANAGERS - 1)) as managers, $((NODES - MANAGERS)) as workers) ($(since "$t")s)"

  t=$(now); load_image "$IMAGE"; log "image $IMAGE loaded on nodes 2-$NODES ($(since "$t")s)"
  # every node Ready
  local end=$((SECONDS + 60))
  until [ "$(docker node ls --format '{{.Status}}' | grep -c '^Ready$')" = "$NODES" ]; do
    [ $SECONDS -lt $end ] || die "not every node is Ready after 60s: $(docker node ls)"
    sleep 0.5
  done
  trap - EXIT
  log "up in $(since "$t0")s: $NODES nodes Ready ($MANAGERS manager(s))"
  for n in $(seq 2 "$NODES"); do engine_line "$n"; done
  log "use: docker -H unix://$(node_sock 2) ... ; next: $0 demo ; $0 status ; $0 down"
}

# === status ===

cmd_status() {
  if [ ! -f "$STATE" ]; then
    log "not up (no $STATE)"
    return 1
  fi
  NODES=$(state_get nodes)
  docker node ls
  echo
  local n
  for n in $(seq 1 "$NODES"); do engine_line "$n"; done
  if docker service ls -q -f "name=${PREFIX}_" | grep -q .; then
    echo
    docker service ls -f "name=${PREFIX}_"
  fi
}

# === demo ===

cmd_demo() {
  need_root
  [ -f "$STATE" ] || die "not up: run $0 up first"
  NODES=$(state_get nodes)
  MANAGERS=$(state_get managers)
  IMAGE=$(state_get image)
  local n
  for n in 1 $(seq 2 "$NODES"); do
    in_node "$n" sh -c "! (ss -Hltn 'sport = :$PORT'; ss -Hltn 'sport = :$ADMIN') | grep -q ." ||
      docker service ls -q -f "name=${PREFIX}_meshd" | grep -q . ||
      die "port $PORT or $ADMIN is in use on node $n; set MESHD_LAB_PORT/MESHD_LAB_ADMIN"
  done
  local t0
  t0=$(now)
  # Each node's meshd reads its own node's engine: the bind source is templated by node ID,
  # and /run/meshd-lab/engines/<node ID>.sock points at that node's socket (all nodes
  # share this machine's filesystem, so /var/run/docker.sock would be node 1's everywhere).
  mkdir -p "$RUN/engines"
  for n in $(seq 1 "$NODES"); do
    local id sock=/var/run/docker.sock
    id=$(dk "$n" info -f '{{.Swarm.NodeID}}')
    [ "$n" = 1 ] || sock=$(node_sock "$n")
    ln -sfn "$sock" "$RUN/engines/$id.sock"
    # deploy/stack.yml's /run/meshd (the upgrade socket), one directory per node
    mkdir -p "$RUN/upgrade/$id"
  done
  local managers="" m
  for m in $(seq 1 "$MANAGERS"); do managers+="${managers:+, }\"$(node_addr "$m"):$ADMIN\""; done
  if ! docker secret inspect ${PREFIX}_token >/dev/null 2>&1; then
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | docker secret create ${PREFIX}_token - >/dev/null
  fi
  if ! docker config inspect ${PREFIX}_toml >/dev/null 2>&1; then
    docker config create ${PREFIX}_toml - >/dev/null <<EOF
[admin]
listen = "0.0.0.0:$ADMIN"
token_file = "/run/secrets/meshd_token"

[upgrade]
socket = "/run/meshd/upgrade.sock"

[defaults.health]
# A cut-off node's tasks are out of every table at most (interval + 10% jitter + timeout)
# x fall after the cut (a probe starts an interval after the previous one ended): 1.7 s
# here, where Swarm itself marks the node Down after 11-14 s. See the partition step.
interval = "500ms"
timeout = "300ms"

[discovery.docker]
endpoint = "unix:///var/run/docker.sock"
poll_interval = "500ms"
address = "host_port"
managers = [$managers]
token_file = "/run/secrets/meshd_token"
EOF
  fi
  if ! docker service inspect ${PREFIX}_meshd >/dev/null 2>&1; then
    # deploy/stack.yml's meshd, with the node's own engine socket and upgrade directory
    # (/var/run/docker.sock and /run/meshd would be the same for every lab node).
    docker service create --quiet --detach --name ${PREFIX}_meshd --mode global \
      --network host --no-resolve-image \
      --mount "type=bind,source=$RUN/engines/{{.Node.ID}}.sock,target=/var/run/docker.sock,readonly" \
      --mount "type=bind,source=$RUN/upgrade/{{.Node.ID}},target=/run/meshd" \
      --config source=${PREFIX}_toml,target=/etc/meshd/mesh.toml \
      --secret source=${PREFIX}_token,target=meshd_token \
      --restart-condition on-failure --restart-delay 1s --stop-grace-period 35s \
      --update-order start-first --update-parallelism 1 --update-delay 10s --update-failure-action rollback \
      "$IMAGE" --config /etc/meshd/mesh.toml >/dev/null
  fi
  if ! docker service inspect ${PREFIX}_web >/dev/null 2>&1; then
    # 2 tasks per node, each named by slot and node; host-mode port chosen by Docker.
    docker service create --quiet --detach --name ${PREFIX}_web \
      --replicas $((2 * NODES)) --replicas-max-per-node 2 --no-resolve-image \
      --endpoint-mode dnsrr --publish mode=host,target=80 \
      --env 'MESHD_BACKEND_NAME=web{{.Task.Slot}}@{{.Node.Hostname}}' \
      --label "mesh.publish=$PORT:80" --label mesh.health=http --label mesh.health.path=/healthz \
      --stop-grace-period 5s \
      "$IMAGE" backend --listen 0.0.0.0:80 --mode http >/dev/null
  fi
  log "services ${PREFIX}_meshd (global, host network) and ${PREFIX}_web ($((2 * NODES)) tasks, mesh.publish=$PORT:80) created"

  # The client: on the host, sending to the last node's address (a worker unless
  # --managers 3): that node's meshd routes to tasks on every node.
  local target end seen tasks_seen want=$((2 * NODES))
  target=$(node_addr "$NODES")
  end=$((SECONDS + 120))
  log "waiting (at most 120s) until $target:$PORT answers from all $want tasks"
  while :; do
    seen=$(for _ in $(seq 1 $((8 * want))); do curl -s -m 2 "http://$target:$PORT/" 2>/dev/null || true; done | sort -u | tr '\n' ' ')
    tasks_seen=$(echo "$seen" | wc -w)
    [ "$tasks_seen" -ge "$want" ] && break
    [ $SECONDS -lt $end ] || { docker service ps ${PREFIX}_web ${PREFIX}_meshd | head -30; die "after 120s only [$seen] answered on $target:$PORT"; }
    sleep 1
  done
  log "ready after $(since "$t0")s: node $NODES's meshd ($target:$PORT) answers from $seen"
  demo_count "$target"
  log "node $NODES's meshd log (discovery):"
  local cid
  cid=$(dk "$NODES" ps -q -f "label=com.docker.swarm.service.name=${PREFIX}_meshd" | head -1)
  [ -n "$cid" ] && dk "$NODES" logs "$cid" 2>&1 | grep 'docker discovery' | head -8
  return 0
}

# 300 requests, a connection each, from the host to node N's meshd: answers by task.
demo_count() {
  local target=$1 total=300
  log "$total requests (a connection each) to $target:$PORT:"
  local out fail=0
  out=$(for _ in $(seq 1 $total); do curl -s -m 2 "http://$target:$PORT/" || echo FAILED; echo; done)
  fail=$(echo "$out" | grep -c FAILED || true)
  echo "$out" | grep -v '^$' | grep -v FAILED | sort | uniq -c | sed 's/^/  /'
  log "failed: $fail of $total"
  # A short bounded load, if ab is there: 20 clients, a connection per request, <= 20 s.
  if command -v ab >/dev/null; then
    log "ab -n 5000 -c 20 -s 5 (a connection per request, at most 20 s) to $target:$PORT:"
    timeout 20 ab -q -n 5000 -c 20 -s 5 "http://$target:$PORT/" 2>&1 |
      grep -E '^(Complete requests|Failed requests|   \(Connect|Non-2xx|Requests per second|Time per request:.*\(mean\))' | sed 's/^/  /' || true
    log "(ab counts an answer whose length differs from the first one's as failed: \"Length\" above is the task names' lengths, not errors)"
  fi
}

# === load: ab in the background, one result line per step ===

# ab, a connection per request (-r: it goes on after a failed one), 10 clients, at most
# $2 s, to node address $1; LOAD_PID is its pid.
load_start() {
  timeout $(($2 + 15)) ab -q -r -t "$2" -n 10000000 -c 10 -s 5 "http://$1:$PORT/" >"$3" 2>&1 &
  LOAD_PID=$!
}

# ab prints its figures on SIGINT too
load_stop() {
  kill -INT "$LOAD_PID" 2>/dev/null || true
  wait "$LOAD_PID" 2>/dev/null || true
}

# One line for the step, read by tests/cluster.rs:
#   swarm-lab: result NAME: requests=N errors=E (connect C, receive R, exceptions X,
#   non-2xx H) p99=Pms max=Mms EXTRA
# ab counts an answer whose length differs from the first one's as failed ("Length"): the
# task names differ in length, so those are not errors and not counted here. An ab that
# ended before printing its figures is an error (its last line is shown).
load_result() {
  local name=$1 out=$2 extra=${3:-}
  awk -v name="$name" -v extra="$extra" '
    /^Complete requests:/ { req = $3; done = 1 }
    /^ +\(Connect:/ {
      gsub(/[(),]/, " ")
      for (i = 1; i < NF; i++) {
        if ($i == "Connect:") c = $(i + 1)
        if ($i == "Receive:") r = $(i + 1)
        if ($i == "Exceptions:") x = $(i + 1)
      }
    }
    /^Non-2xx responses:/ { h = $3 }
    /^ +99%/ { p99 = $2 }
    /^ +100%/ { mx = $2 }
    NF { last = $0 }
    END {
      if (!done) { printf "swarm-lab: result %s: requests=0 errors=1 (ab ended early: %s)%s\n", name, last, extra; exit }
      printf "swarm-lab: result %s: requests=%d errors=%d (connect %d, receive %d, exceptions %d, non-2xx %d) p99=%sms max=%sms%s\n",
        name, req, c + r + x + h, c, r, x, h, p99, mx, extra
    }' "$out"
}

# The demo app's next version (v2, v3, ...) after the one its tasks answer with now.
next_version() {
  local ver
  ver=$(docker service inspect ${PREFIX}_web -f '{{range .Spec.TaskTemplate.ContainerSpec.Env}}{{.}} {{end}}' | sed -n 's/.*MESHD_BACKEND_NAME=v\([0-9]*\)-.*/\1/p')
  echo $((${ver:-1} + 1))
}

need_demo() {
  need_root
  [ -f "$STATE" ] || die "not up: run $0 up first"
  docker service inspect ${PREFIX}_web >/dev/null 2>&1 || die "no demo: run $0 demo first"
  command -v ab >/dev/null || die "needs ab (apache2-utils)"
  NODES=$(state_get nodes)
  MANAGERS=$(state_get managers)
}

# phase NAME TIMEOUT COMMAND...: COMMAND under load through the last node's meshd, 2 s of
# load before and after it; one result line.
phase() {
  local name=$1 to=$2 target t took out
  shift 2
  target=$(node_addr "$NODES")
  out=$RUN/ab-$name.txt
  load_start "$target" $((to + 10)) "$out"
  sleep 2
  t=$(now)
  if ! timeout "$to" "$@" >/dev/null; then
    load_stop
    docker service ps ${PREFIX}_web | head -20
    die "phase $name: \`$*\` did not complete within ${to}s"
  fi
  took=$(since "$t")
  sleep 2
  load_stop
  load_result "$name" "$out" " took=${took}s"
}

# === phases: what a service goes through, under load through a worker's meshd ===

cmd_phases() {
  need_demo
  local full=$((2 * NODES)) half=$NODES ver
  ver=$(next_version)
  log "under ab -c 10 -r (a connection per request) to node $NODES's meshd ($(node_addr "$NODES"):$PORT), one step at a time:"
  log "scale-down: ${PREFIX}_web $full -> $half tasks"
  phase scale-down 120 docker service scale --detach=false "${PREFIX}_web=$half"
  # start-first: the new task starts (and meshd admits it when healthy) before the old one
  # stops; room for it because half the slots (2 per node) are free.
  log "start-first: ${PREFIX}_web to v$ver, a task at a time, the new one started first"
  phase start-first 180 docker service update --detach=false --update-order start-first \
    --update-parallelism 1 --update-delay 1s \
    --env-add "MESHD_BACKEND_NAME=v$ver-web{{.Task.Slot}}@{{.Node.Hostname}}" ${PREFIX}_web
  log "scale-up: ${PREFIX}_web $half -> $full tasks"
  phase scale-up 120 docker service scale --detach=false "${PREFIX}_web=$full"
  log "stop-first: ${PREFIX}_web to v$((ver + 1)), a task at a time, the old one stopped first"
  phase stop-first 240 docker service update --detach=false --update-order stop-first \
    --update-parallelism 1 --update-delay 1s \
    --env-add "MESHD_BACKEND_NAME=v$((ver + 1))-web{{.Task.Slot}}@{{.Node.Hostname}}" ${PREFIX}_web
  log "rollback: ${PREFIX}_web back to v$ver (docker service rollback)"
  phase rollback 240 docker service rollback --detach=false ${PREFIX}_web
  log "answers now:"
  local target
  target=$(node_addr "$NODES")
  for _ in $(seq 1 $((8 * NODES))); do curl -s -m 2 "http://$target:$PORT/" || echo FAILED; echo; done |
    grep -v '^$' | sort | uniq -c | sed 's/^/  /'
}

# === update: a rolling update of the demo app under load, through a worker's meshd ===

cmd_update() {
  need_demo
  local ver
  ver=$(next_version)
  log "ab -c 10 -r (a connection per request) to node $NODES's meshd while ${PREFIX}_web is updated to v$ver (stop-first, one task at a time)"
  # stop-first: with 2 tasks per node at most (--replicas-max-per-node), a start-first
  # update of all 2 x NODES tasks cannot place its new task ("no suitable node (max
  # replicas per node limit exceed)") and never ends; `phases` runs one at half the tasks.
  phase update 120 docker service update --detach=false --update-order stop-first \
    --update-parallelism 1 --update-delay 1s \
    --env-add "MESHD_BACKEND_NAME=v$ver-web{{.Task.Slot}}@{{.Node.Hostname}}" ${PREFIX}_web
  log "answers now:"
  local target
  target=$(node_addr "$NODES")
  for _ in $(seq 1 $((8 * NODES))); do curl -s -m 2 "http://$target:$PORT/" || echo FAILED; echo; done |
    grep -v '^$' | sort | uniq -c | sed 's/^/  /'
}

# === watching the tables: which meshd still routes to a node's tasks ===

# watch_routed MODE PREFIX T0 LIMIT ADDR...: polls /api/v1/services of each ADDR's meshd
# every 50 ms and prints "ADDR SECONDS" (seconds since the epoch time T0) when it routes
# to no backend whose address starts with PREFIX (MODE gone), or to at least one (MODE
# back); "ADDR never" if not within LIMIT s. Routed: active, not down, not ejected.
watch_routed() {
  python3 - "$@" <<'EOF'
import json, sys, time, urllib.request
mode, prefix, t0, limit = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
left = list(sys.argv[5:])
while left and time.time() - t0 < limit:
    for addr in list(left):
        try:
            with urllib.request.urlopen(f"http://{addr}/api/v1/services", timeout=1) as r:
                d = json.load(r)
        except Exception:
            continue
        n = sum(1 for s in d["services"] for b in s["backends"]
                if b["addr"].startswith(prefix) and b["state"] == "active"
                and b["health"] != "down" and not b["ejected"])
        if (n == 0) == (mode == "gone"):
            print(f"{addr} {time.time() - t0:.2f}", flush=True)
            left.remove(addr)
    time.sleep(0.05)
for addr in left:
    print(f"{addr} never", flush=True)
EOF
}

# The manager whose feed node N's meshd follows ("-": none, it reads its own engine).
following() {
  curl -s -m 2 "http://$(node_addr "$1"):$ADMIN/api/v1/services" |
    python3 -c 'import json, sys; print((json.load(sys.stdin).get("docker") or {}).get("following") or "-")' 2>/dev/null || echo "?"
}

# The web tasks running on node N, by Swarm's account.
tasks_on() {
  docker service ps ${PREFIX}_web -f desired-state=running --format '{{.Node}} {{.CurrentState}}' | grep -c "^$1 Running" || true
}

# === partition: node 2 cut off and back, under load through the last node's meshd ===

cmd_partition() {
  need_demo
  local cut=2 target t0 out end host n gone back others=()
  target=$(node_addr "$NODES")
  host=lab-node$cut
  out=$RUN/ab-partition.txt
  for n in $(seq 1 "$NODES"); do [ "$n" = "$cut" ] || others+=("$(node_addr "$n"):$ADMIN"); done
  # the link comes back whatever happens
  trap 'ip -n "$(node_ns '"$cut"')" link set eth0 up 2>/dev/null || true' EXIT
  log "ab -c 10 -r (a connection per request, at most 100 s) to node $NODES's meshd ($target:$PORT); node $cut ($host) cut off, then back"
  load_start "$target" 100 "$out"
  sleep 3
  ip -n "$(node_ns "$cut")" link set eth0 down
  t0=$(now)
  log "node $cut: link down"
  # every other node's meshd: when it stops routing to node $cut's tasks
  watch_routed gone "$(node_addr "$cut"):" "$t0" 30 "${others[@]}" >"$RUN/cut-gone.txt" &
  local watch=$!
  end=$((SECONDS + 60))
  until docker node ls --format '{{.Hostname}} {{.Status}}' | grep -q "^$host Down$"; do
    [ $SECONDS -lt $end ] || { load_stop; die "Swarm did not mark $host Down within 60s"; }
    sleep 0.2
  done
  local down
  down=$(since "$t0")
  wait "$watch" || true
  gone=$(awk '{ printf "%s%s %s", (NR > 1 ? " " : ""), $1, $2 }' "$RUN/cut-gone.txt")
  log "Swarm: $host Down after ${down}s; its tasks out of every other node's meshd table after (s): $gone"
  log "result cut: out-of-tables=$(awk '$2 == "never" { n = 1 } $2 > m { m = $2 } END { print (n ? "never" : m "s") }' "$RUN/cut-gone.txt") (the slowest node; each: $gone) swarm-down=${down}s"
  sleep 10
  ip -n "$(node_ns "$cut")" link set eth0 up
  t0=$(now)
  log "node $cut: link up again"
  watch_routed back "$(node_addr "$cut"):" "$t0" 90 "${others[@]}" >"$RUN/cut-back.txt" &
  watch=$!
  end=$((SECONDS + 90))
  until [ "$(tasks_on "$host")" -ge 2 ]; do
    [ $SECONDS -lt $end ] || { load_stop; die "no task running on $host again within 90s"; }
    sleep 0.2
  done
  local running
  running=$(since "$t0")
  wait "$watch" || true
  back=$(awk '{ printf "%s%s %s", (NR > 1 ? " " : ""), $1, $2 }' "$RUN/cut-back.txt")
  log "result rejoin: tasks-running=${running}s routed-again ($back)"
  sleep 5
  load_stop
  load_result partition "$out"
  log "(99% and 100%: the slowest requests, in ms)"
  local cid
  cid=$(dk "$NODES" ps -q -f "label=com.docker.swarm.service.name=${PREFIX}_meshd" | head -1)
  log "node $NODES's meshd log:"
  [ -n "$cid" ] && dk "$NODES" logs "$cid" 2>&1 | grep -E 'backend (up|down)|endpoint\(s\)' | tail -8 | cut -c1-200
  trap - EXIT
  return 0
}

# === failover: a worker's meshd follows another manager when its manager's engine stops ===

# Needs `up --managers 3`. The last node (a worker) follows one of the managers' meshd.
# The manager it follows must be node 2 or 3 (the lab cannot stop node 1, this machine's
# engine): while it follows node 1, its meshd container is killed and Swarm restarts it,
# which picks a manager at random again (at most 8 times, before any load).
cmd_failover() {
  need_demo
  [ "$MANAGERS" = 3 ] || die "failover needs three managers: $0 down; $0 up --managers 3; $0 demo"
  local w=$NODES f m="" n tries=0 cid end t0 target out
  target=$(node_addr "$w")
  while :; do
    end=$((SECONDS + 30))
    f=$(following "$w")
    until [ "$f" != "?" ] && [ "$f" != "-" ]; do
      [ $SECONDS -lt $end ] || die "node $w's meshd follows no manager after 30 s ($f)"
      sleep 0.5
      f=$(following "$w")
    done
    for n in 2 3; do [ "$f" = "$(node_addr "$n"):$ADMIN" ] && m=$n; done
    [ -n "$m" ] && break
    tries=$((tries + 1))
    [ $tries -le 8 ] || die "node $w's meshd still follows $f after 8 restarts"
    log "node $w's meshd follows $f (node 1, which the lab does not stop): restarting it"
    cid=$(dk "$w" ps -q -f "label=com.docker.swarm.service.name=${PREFIX}_meshd" | head -1)
    [ -n "$cid" ] && dk "$w" kill "$cid" >/dev/null
    sleep 2
  done
  log "node $w's meshd (a worker) follows node $m's meshd ($f)"
  # every web task answers through the worker first
  local want=$((2 * NODES)) seen
  end=$((SECONDS + 60))
  until [ "$(for _ in $(seq 1 $((8 * want))); do curl -s -m 2 "http://$target:$PORT/" || true; echo; done | grep -v '^$' | sort -u | wc -l)" -ge "$want" ]; do
    [ $SECONDS -lt $end ] || die "not all $want tasks answer through node $w within 60 s"
    sleep 1
  done
  out=$RUN/ab-failover.txt
  log "ab -c 10 -r (a connection per request, at most 120 s) to node $w's meshd ($target:$PORT); node $m's engine stopped, then started again"
  load_start "$target" 120 "$out"
  sleep 3
  local pid
  pid=$(cat "$RUN/node$m/dockerd.pid")
  t0=$(now)
  kill -TERM "$pid"
  log "node $m: dockerd (pid $pid) sent SIGTERM: its containers stop (its meshd and web tasks with it)"
  watch_routed gone "$(node_addr "$m"):" "$t0" 60 "$target:$ADMIN" >"$RUN/failover-gone.txt" &
  local watch=$!
  end=$((SECONDS + 60))
  f=$(following "$w")
  until [ "$f" != "$(node_addr "$m"):$ADMIN" ] && [ "$f" != "-" ] && [ "$f" != "?" ]; do
    [ $SECONDS -lt $end ] || { load_stop; die "node $w's meshd still follows $f 60 s after node $m's engine stopped"; }
    sleep 0.1
    f=$(following "$w")
  done
  local moved
  moved=$(since "$t0")
  end=$((SECONDS + 60))
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -lt $end ] || { log "dockerd of node $m still runs after 60 s: SIGKILL"; kill -KILL "$pid"; }
    sleep 0.2
  done
  local stopped
  stopped=$(since "$t0")
  wait "$watch" || true
  log "result failover-move: follows=$f after=${moved}s (node $m's tasks out of node $w's table after $(awk '{ print $2 }' "$RUN/failover-gone.txt")s; its dockerd exited after ${stopped}s)"
  sleep 5
  log "node $m: starting its engine again"
  t0=$(now)
  start_engine "$m"
  end=$((SECONDS + 90))
  until [ "$(tasks_on "lab-node$m")" -ge 1 ]; do
    [ $SECONDS -lt $end ] || { load_stop; die "no web task running on node $m again within 90 s"; }
    sleep 0.2
  done
  log "node $m runs web tasks again after $(since "$t0")s; 5 s more load"
  sleep 5
  load_stop
  load_result failover "$out"
  log "node $w's meshd log:"
  cid=$(dk "$w" ps -q -f "label=com.docker.swarm.service.name=${PREFIX}_meshd" | head -1)
  [ -n "$cid" ] && dk "$w" logs "$cid" 2>&1 | grep -E 'manager|following' | tail -6 | cut -c1-220
  return 0
}

# === overlay: task-to-task traffic over VXLAN between the nodes ===

# A meshd on node 1 with a static config, on an attachable overlay network, proxies to
# `meshd backend` containers on the other nodes at their overlay addresses; removed again.
cmd_overlay() {
  need_root
  [ -f "$STATE" ] || die "not up: run $0 up first"
  NODES=$(state_get nodes)
  IMAGE=$(state_get image)
  local n ips="" ip want="" port=${MESHD_LAB_OVERLAY_PORT:-18181}
  trap overlay_clean EXIT
  docker network create -d overlay --attachable ${PREFIX}_ov >/dev/null
  for n in $(seq 2 "$NODES"); do
    dk "$n" run -d --name "${PREFIX}-ov$n" --network ${PREFIX}_ov "$IMAGE" \
      backend --listen 0.0.0.0:80 --mode http --name "overlay-on-lab-node$n" >/dev/null
    ip=$(dk "$n" inspect -f "{{(index .NetworkSettings.Networks \"${PREFIX}_ov\").IPAddress}}" "${PREFIX}-ov$n")
    ips+="${ips:+, }{ addr = \"$ip:80\" }"
    want+="overlay-on-lab-node$n $ip  "
  done
  mkdir -p "$RUN/overlay"
  printf '[[service]]\nname = "ov"\nlisten = ["0.0.0.0:80"]\nbackends = [ %s ]\n' "$ips" >"$RUN/overlay/mesh.toml"
  docker run -d --name ${PREFIX}-ovproxy --network ${PREFIX}_ov -p "127.0.0.1:$port:80" \
    -v "$RUN/overlay/mesh.toml:/mesh.toml:ro" "$IMAGE" --config /mesh.toml >/dev/null
  log "overlay ${PREFIX}_ov: meshd on node 1 -> $want"
  local end=$((SECONDS + 30)) seen
  while :; do
    seen=$(for _ in $(seq 1 $((4 * NODES))); do curl -s -m 2 "http://127.0.0.1:$port/" || true; done | sort -u | tr '\n' ' ')
    [ "$(echo "$seen" | wc -w)" -ge $((NODES - 1)) ] && break
    [ $SECONDS -lt $end ] || die "over the overlay, after 30s only [$seen] answered"
    sleep 0.5
  done
  log "overlay works: answers from $seen"
}

overlay_clean() {
  local n
  docker rm -f ${PREFIX}-ovproxy >/dev/null 2>&1 || true
  for n in $(seq 2 "$NODES"); do dk "$n" rm -f "${PREFIX}-ov$n" >/dev/null 2>&1 || true; done
  local end=$((SECONDS + 20))
  while docker network inspect ${PREFIX}_ov >/dev/null 2>&1 && [ $SECONDS -lt $end ]; do
    docker network rm ${PREFIX}_ov >/dev/null 2>&1 || sleep 0.5
  done
}

# === down ===

cmd_down() {
  need_root
  local nodes managers
  nodes=$(state_get nodes); nodes=${nodes:-3}
  managers=$(state_get managers); managers=${managers:-1}
  local n s
  # The lab's services, secrets and configs (node 1 is a manager while the swarm exists).
  if [ "$(state_get swarm)" = 1 ]; then
    for s in ${PREFIX}_web ${PREFIX}_meshd; do docker service rm "$s" >/dev/null 2>&1 || true; done
    docker secret rm ${PREFIX}_token >/dev/null 2>&1 || true
    docker config rm ${PREFIX}_toml >/dev/null 2>&1 || true
    NODES=$nodes overlay_clean
  fi
  # Leave the swarm on the extra engines first, then stop them.
  for n in $(seq 2 "$nodes"); do
    if [ -S "$(node_sock "$n")" ]; then
      timeout 20 docker -H "unix://$(node_sock "$n")" swarm leave --force >/dev/null 2>&1 || true
    fi
  done
  for n in $(seq 2 "$nodes"); do
    local pid
    pid=$(cat "$RUN/node$n/dockerd.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      local end=$((SECONDS + 30))
      while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && { log "dockerd of node $n still runs after 30s: SIGKILL"; kill -KILL "$pid"; }
    fi
  done
  if [ "$(state_get swarm)" = 1 ]; then
    docker swarm leave --force >/dev/null 2>&1 || true
    if [ "$(state_get gwbridge_before)" != 1 ]; then
      local end=$((SECONDS + 20))
      while docker network inspect docker_gwbridge >/dev/null 2>&1 && [ $SECONDS -lt $end ]; do
        docker network rm docker_gwbridge >/dev/null 2>&1 || sleep 0.5
      done
    fi
  fi
  # Mounts the extra engines left (overlay mounts, netns bind mounts), deepest first.
  local m
  while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done < <(awk -v a="$RUN/" -v b="$DATA/" 'index($2, a) == 1 || index($2, b) == 1 { print $2 }' /proc/mounts | sort -r)
  for n in $(seq 2 "$nodes"); do
    ip netns del "$(node_ns "$n")" 2>/dev/null || true
    ip link del "mlab-n$n" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  while iptables -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -m comment --comment meshd-lab -j ACCEPT 2>/dev/null; do :; done
  local img
  img=$(state_get built_image)
  if [ -n "$img" ]; then docker rmi -f "$img" >/dev/null 2>&1 || true; fi
  rm -rf "$DATA" "$RUN"
  log "down: lab removed$([ "$(docker info -f '{{.Swarm.LocalNodeState}}' 2>/dev/null)" = inactive ] && echo '; this engine is not in a swarm')"
}

# === locality: which node answers a worker's clients, per mesh.locality ===

# `total` requests (a connection each) to `target`: prints "N node" per answering node
# ("N failed" for failed ones), then the step's result line, read by tests/cluster.rs:
#   swarm-lab: result locality-STEP: lab-node3=200 failed=0
by_node() {
  local step=$1 target=$2 total=$3 counts
  counts=$(for _ in $(seq 1 "$total"); do curl -s -m 2 "http://$target:$PORT/" || echo "FAILED@failed"; echo; done |
    grep -v '^$' | sed 's/.*@//' | sort | uniq -c)
  # shellcheck disable=SC2001 # every line's leading blanks
  echo "$counts" | sed 's/^ */  /'
  echo "$counts" | awk -v step="$step" '
    $2 == "failed" { f = $1; next }
    { line = line " " $2 "=" $1 }
    END { printf "swarm-lab: result locality-%s:%s failed=%d\n", step, line, f }'
}

# Waits until node N's meshd has applied the label (its admin API shows the locality).
wait_locality() {
  local target=$1 want=$2 end=$((SECONDS + 30))
  until curl -s -m 2 "http://$target:$ADMIN/api/v1/services" | grep -q "\"locality\":\"$want\""; do
    [ $SECONDS -lt $end ] || die "node at $target did not apply locality $want within 30 s"
    sleep 0.5
  done
}

cmd_locality() {
  need_root
  [ -f "$STATE" ] || die "not up: run $0 up first"
  docker service inspect ${PREFIX}_web >/dev/null 2>&1 || die "no demo: run $0 demo first"
  NODES=$(state_get nodes)
  local target host cids t0
  target=$(node_addr "$NODES")
  host=$(dk "$NODES" info -f '{{.Name}}')
  log "any (the default): 200 requests to node $NODES's meshd ($target:$PORT), by answering node:"
  by_node any "$target" 200
  t0=$(now)
  docker service update --quiet --detach --label-add mesh.locality=prefer_local ${PREFIX}_web >/dev/null
  wait_locality "$target" prefer_local
  log "prefer_local, applied by node $NODES's meshd $(since "$t0")s after the label; 200 requests:"
  by_node prefer_local "$target" 200
  # One of node N's two tasks killed: half of its tasks are healthy, which is not fewer
  # than half: still local. Then the other: every node's tasks (Swarm restarts them).
  cids=$(dk "$NODES" ps -q -f "label=com.docker.swarm.service.name=${PREFIX}_web")
  log "node $NODES ($host) runs $(echo "$cids" | wc -w) tasks; killing one, then 200 requests at once:"
  dk "$NODES" kill "$(echo "$cids" | head -1)" >/dev/null
  by_node prefer_local-half "$target" 200
  log "killing the other one too, then 200 requests at once:"
  dk "$NODES" kill "$(echo "$cids" | sed -n 2p)" >/dev/null
  by_node prefer_local-none "$target" 200
  log "waiting for Swarm to restart node $NODES's tasks (at most 60 s)"
  local end=$((SECONDS + 60))
  until [ "$(dk "$NODES" ps -q -f "label=com.docker.swarm.service.name=${PREFIX}_web" | wc -l)" -ge 2 ]; do
    [ $SECONDS -lt $end ] || die "node $NODES's tasks did not come back"
    sleep 1
  done
  sleep 3
  log "back: 200 requests:"
  by_node prefer_local-back "$target" 200
  docker service update --quiet --detach --label-add mesh.locality=local_only ${PREFIX}_web >/dev/null
  wait_locality "$target" local_only
  log "local_only: 200 requests:"
  by_node local_only "$target" 200
  docker service update --quiet --detach --label-rm mesh.locality ${PREFIX}_web >/dev/null
  wait_locality "$target" any
  log "label removed (any again)"
}

case ${1:-} in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  demo) cmd_demo ;;
  update) cmd_update ;;
  overlay) cmd_overlay ;;
  partition) cmd_partition ;;
  phases) cmd_phases ;;
  failover) cmd_failover ;;
  locality) cmd_locality ;;
  *) echo "usage: $0 up [--managers 1|3] [--nodes N] [--image TAG] | status | demo | update | phases | partition | failover | locality | overlay | down" >&2; exit 2 ;;
esac
