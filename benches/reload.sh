#!/usr/bin/env bash
# Control-plane timings of the release meshd, on loopback.
#
#   benches/reload.sh            # reload: 1,000 services, startup-to-ready and SIGHUP reloads
#   benches/reload.sh stall      # connect latency while a 10,000-backend maglev service reloads
#
# reload: writes a mesh.toml with SERVICES services (each its own loopback listen port and
#   BACKENDS backends, check = "none", balance BALANCE) plus one "probe" service whose only
#   backend is a real `meshd backend`. It measures
#   - startup: process start until /readyz answers 200;
#   - an unchanged reload: SIGHUP with the same 1,000 services;
#   - a changed reload: every service's backends replaced (two address sets, alternating).
#   A reload is timed from the SIGHUP until a connection through the probe service reaches
#   the probe's new backend: each reload also flips the probe between two backends, so the
#   generation that holds the reload is published. ROUNDS rounds, medians. At the end
#   meshd_config_reloads_total{result="ok"} must equal the reloads sent (one per SIGHUP:
#   meshd reads its config through a symlink in a directory of its own, so its file
#   watcher never sees the writes and only SIGHUP reloads).
# stall: one service "big" (BIG backends, maglev) and one "echo" service with a real
#   backend. A client makes one connection per request to "echo" without pause (one
#   request at a time) for DUR seconds quiet, then DUR seconds while "big" is reloaded by
#   SIGHUP every RELOAD_EVERY seconds, each time with one backend replaced (CHANGE=one: the
#   selector must be rebuilt, the rest of the reload is small) or all of them (CHANGE=all:
#   10,000 backends added and 10,000 drained per reload). Prints p50/p99/max request
#   latency of both phases.
#
# Knobs: MESHD (default: cargo build --release into CARGO_TARGET_DIR or /tmp/bench-target),
# THREADS (default 1: --threads 1, the runtime thread is the one that moves bytes),
# SERVICES=1000 BACKENDS=2 BALANCE=p2c ROUNDS=5 TIMEOUT=120 (s, per wait), BIG=10000 DUR=5
# RELOAD_EVERY=0.5 CHANGE=one. Everything runs on loopback and is stopped on every exit path; bounded
# by TIMEOUT per wait.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-reload}
if [ -z "${MESHD:-}" ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/bench-target} cargo build --release --quiet --bin meshd
  MESHD=${CARGO_TARGET_DIR:-/tmp/bench-target}/release/meshd
fi
work=$(mktemp -d)
cleanup() {
  if [ -f "$work/pids" ]; then
    while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

export MESHD MODE WORK="$work" THREADS="${THREADS:-1}" SERVICES="${SERVICES:-1000}" \
  BACKENDS="${BACKENDS:-2}" BALANCE="${BALANCE:-p2c}" ROUNDS="${ROUNDS:-5}" \
  TIMEOUT="${TIMEOUT:-120}" BIG="${BIG:-10000}" CHANGE="${CHANGE:-one}" DUR="${DUR:-5}" RELOAD_EVERY="${RELOAD_EVERY:-0.5}"
python3 - <<'PY'
import os, signal, socket, statistics, subprocess, sys, time, threading

E = os.environ
MESHD, WORK, MODE = E["MESHD"], E["WORK"], E["MODE"]
TIMEOUT = float(E["TIMEOUT"])

def port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def spawn(args, log):
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(WORK, log), "w"))
    with open(os.path.join(WORK, "pids"), "a") as f:
        f.write(f"{p.pid}\n")
    return p

def get(addr, path="/", timeout=2.0):
    """One HTTP/1.1 GET with Connection: close; (status, body) or None."""
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body.decode(errors="replace").strip()
    except (OSError, IndexError, ValueError):
        return None

def wait(what, f, step=0.002):
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end:
        r = f()
        if r:
            return r
        time.sleep(step)
    sys.exit(f"timed out after {TIMEOUT:.0f}s waiting for {what}")

def metric(admin, name, label=""):
    r = get(admin, "/metrics", timeout=30)
    if not r:
        return None
    for line in r[1].splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return None

def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)

def config_paths():
    """(file to write, path meshd reads): meshd also reloads when its config's directory
    changes; it is given a symlink in a directory of its own, so that only SIGHUP reloads."""
    os.makedirs(os.path.join(WORK, "real")); os.makedirs(os.path.join(WORK, "conf"))
    path, link = os.path.join(WORK, "real", "mesh.toml"), os.path.join(WORK, "conf", "mesh.toml")
    os.symlink(path, link)
    return path, link

def start_backend(name):
    addr = ("127.0.0.1", port())
    spawn([MESHD, "backend", "--listen", f"{addr[0]}:{addr[1]}", "--name", name, "--mode", "http"],
          f"backend-{name}.log")
    wait(f"backend {name}", lambda: get(addr) is not None, 0.01)
    return addr

def med(v):
    return statistics.median(v)

def reload_mode():
    n, nb, balance, rounds = int(E["SERVICES"]), int(E["BACKENDS"]), E["BALANCE"], int(E["ROUNDS"])
    admin = ("127.0.0.1", port())
    probe_listen = ("127.0.0.1", port())
    probe = {"A": start_backend("A"), "B": start_backend("B")}
    # Listen ports: a contiguous block that was free (checked one by one).
    listens, p = [], 30000
    while len(listens) < n:
        try:
            s = socket.socket(); s.bind(("127.0.0.1", p)); s.close(); listens.append(p)
        except OSError:
            pass
        p += 1
    def config(backend_set, probe_name):
        out = [f'[admin]\nlisten = "{admin[0]}:{admin[1]}"\n',
               f'[defaults]\nbalance = "{balance}"\n']
        for i, lp in enumerate(listens):
            bs = ", ".join(f'{{ addr = "127.0.{backend_set}.1:{10000 + i * nb + k}" }}' for k in range(nb))
            out.append(f'[[service]]\nname = "s{i}"\nlisten = ["127.0.0.1:{lp}"]\n'
                       f'backends = [{bs}]\n[service.health]\ncheck = "none"\n')
        pa = probe[probe_name]
        out.append(f'[[service]]\nname = "probe"\nlisten = ["{probe_listen[0]}:{probe_listen[1]}"]\n'
                   f'backends = [{{ addr = "{pa[0]}:{pa[1]}" }}]\n[service.health]\ncheck = "none"\n')
        return "".join(out)
    path, link = config_paths()
    write(path, config(2, "A"))
    size = os.path.getsize(path)
    t0 = time.monotonic()
    m = spawn([MESHD, "--threads", E["THREADS"], "--config", link], "meshd.log")
    wait("/readyz", lambda: (get(admin, "/readyz") or (0,))[0] == 200, 0.002)
    startup = time.monotonic() - t0
    assert get(probe_listen) == (200, "A"), "probe answers A"
    print(f"meshd {MESHD} --threads {E['THREADS']}: {n} services x {nb} backends, balance {balance}, "
          f"config {size} bytes; startup to ready {startup * 1000:.0f} ms")
    time.sleep(1)
    times = {"unchanged": [], "changed": []}
    backend_set, name, sent = 2, "A", 0
    for r in range(rounds):
        for kind in ("unchanged", "changed"):
            if kind == "changed":
                backend_set = 5 - backend_set  # 2 <-> 3
            name = "B" if name == "A" else "A"
            write(path, config(backend_set, name))
            t0 = time.monotonic()
            m.send_signal(signal.SIGHUP)
            sent += 1
            wait(f"reload {sent}", lambda: get(probe_listen, timeout=5) == (200, name), 0.001)
            dt = time.monotonic() - t0
            times[kind].append(dt)
            print(f"round {r + 1} {kind:9} reload: {dt * 1000:7.1f} ms")
            time.sleep(0.3)
    ok = metric(admin, "meshd_config_reloads_total", 'result="ok"')
    gen = metric(admin, "meshd_table_generation")
    if ok != sent:
        sys.exit(f"expected {sent} reloads, meshd counted {ok}")
    print(f"reloads ok: {ok:.0f} (table generation {gen:.0f}); medians: "
          f"startup {startup * 1000:.0f} ms, unchanged reload {med(times['unchanged']) * 1000:.1f} ms, "
          f"changed reload {med(times['changed']) * 1000:.1f} ms")
    m.terminate(); m.wait(TIMEOUT)

def stall_mode():
    big, dur, every = int(E["BIG"]), float(E["DUR"]), float(E["RELOAD_EVERY"])
    admin = ("127.0.0.1", port())
    echo_listen, big_listen = ("127.0.0.1", port()), ("127.0.0.1", port())
    backend = start_backend("e")
    change = E["CHANGE"]
    def config(backend_set):
        # CHANGE=all: every backend's address changes; one: only the last one's.
        first = 2 if change == "one" else backend_set
        bs = ", ".join(f'{{ addr = "127.{backend_set if i == big - 1 else first}.{(i >> 8) & 255}.{i & 255}:8080" }}'
                       for i in range(big))
        return (f'[admin]\nlisten = "{admin[0]}:{admin[1]}"\n'
                f'[[service]]\nname = "big"\nlisten = ["{big_listen[0]}:{big_listen[1]}"]\nbalance = "maglev"\n'
                f'backends = [{bs}]\n[service.health]\ncheck = "none"\n'
                f'[[service]]\nname = "echo"\nlisten = ["{echo_listen[0]}:{echo_listen[1]}"]\n'
                f'backends = [{{ addr = "{backend[0]}:{backend[1]}" }}]\n[service.health]\ncheck = "none"\n')
    path, link = config_paths()
    write(path, config(2))
    m = spawn([MESHD, "--threads", E["THREADS"], "--config", link], "meshd.log")
    wait("/readyz", lambda: (get(admin, "/readyz") or (0,))[0] == 200, 0.01)
    def run(seconds):
        lat, fails = [], 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.monotonic()
            if get(echo_listen) == (200, "e"):
                lat.append(time.monotonic() - t)
            else:
                fails += 1
        return lat, fails
    def report(phase, lat, fails):
        lat = sorted(lat)
        q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000
        print(f"{phase:16} {len(lat):6} requests, {fails} failed: p50 {q(0.5):.2f} ms, "
              f"p99 {q(0.99):.2f} ms, max {lat[-1] * 1000:.2f} ms")
    run(0.5)
    quiet = run(dur)
    stop = threading.Event()
    reloads = [0]
    def reloader():
        s = 2
        while not stop.is_set():
            s = 5 - s
            write(path, config(s))
            m.send_signal(signal.SIGHUP)
            reloads[0] += 1
            stop.wait(every)
    th = threading.Thread(target=reloader); th.start()
    busy = run(dur)
    stop.set(); th.join()
    time.sleep(1.5)
    ok = metric(admin, "meshd_config_reloads_total", 'result="ok"')
    print(f"meshd {MESHD} --threads {E['THREADS']}: service big has {big} maglev backends, CHANGE={change}; "
          f"{reloads[0]} SIGHUPs, meshd counted {ok:.0f} reloads ok")
    report("quiet", *quiet)
    report("during reloads", *busy)
    m.terminate(); m.wait(TIMEOUT)

{"reload": reload_mode, "stall": stall_mode}[MODE]()
PY
