#!/usr/bin/env python3
"""The control plane at Swarm scale (issue 18, part 3): meshd's Docker discovery against a
fake Engine API that holds SERVICES labelled services of TASKS_PER tasks each, and replaces
CHURN (a fraction) of the tasks between polls. Measures, on loopback, bounded in time:

- meshd's CPU (utime + stime from /proc) per second and per poll, with no traffic (so it is
  the control plane's), quiet (the same answer every poll) and under churn;
- the data-plane stall: one HTTP request per connection, one at a time, to a static "echo"
  service through the same meshd (a real `meshd backend` behind it), p50/p99/max and
  failures, quiet and under churn (the client in a process of its own: the fake engine
  holds the GIL while it renders an answer); and the floor: the same client under the
  same churn straight to the backend (meshd still polls, no connection goes through it);
- the control loop's own events during each phase, from meshd's
  `meshd_control_event_seconds` histogram: how many, how many held the control thread
  over 5 ms (and of which kind), the bucket of the slowest, the mean `tick` (every 250 ms)
  and the mean `discovery` event (an update applied and its generation published);
- how many polls the fake engine answered (GET /tasks) and how long after a change meshd's
  status showed it (one sampled task per round).

    benches/swarm-scale.py                  # 1,000 services x 10 tasks, 1% per 500 ms poll
    SERVICES=200 TASKS_PER=5 DUR=5 benches/swarm-scale.py

Knobs (environment): MESHD (default: cargo build --release into CARGO_TARGET_DIR or
/tmp/bench-target), THREADS=1 (meshd --threads: the proxy's threads; the control plane
has one more), SERVICES=1000, TASKS_PER=10, CHURN=0.01, POLL=500ms, DUR=10 (s per phase),
PORT_BASE=21000 (services listen on PORT_BASE + i), TIMEOUT=120 (s, per wait).

The fake engine answers with task documents shaped like the recorded ones in
tests/fixtures/docker (about 2 KiB each, as a real engine's); tasks get `mesh.health=none`
(no health checks to addresses that do not exist) and are dialled at their overlay address
(`address = "overlay"`), which no connection in this bench uses: only the control plane's
work is measured.
"""

import copy
import http.server
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

E = os.environ
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "docker")
SERVICES = int(E.get("SERVICES", "1000"))
TASKS_PER = int(E.get("TASKS_PER", "10"))
CHURN = float(E.get("CHURN", "0.01"))
POLL = E.get("POLL", "500ms")
DUR = float(E.get("DUR", "10"))
THREADS = E.get("THREADS", "1")
PORT_BASE = int(E.get("PORT_BASE", "21000"))
TIMEOUT = float(E.get("TIMEOUT", "120"))
TICK = os.sysconf("SC_CLK_TCK")


def meshd_binary():
    if E.get("MESHD"):
        return E["MESHD"]
    target = E.get("CARGO_TARGET_DIR", "/tmp/bench-target")
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--bin", "meshd"],
        cwd=ROOT,
        check=True,
        env=dict(E, CARGO_TARGET_DIR=target),
    )
    return os.path.join(target, "release", "meshd")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Swarm:
    """SERVICES services x TASKS_PER running tasks; `churn()` replaces a fraction of them
    (new task ID and overlay address, as a rolling update does). Each task's JSON is kept
    serialised, so an answer is one join."""

    def __init__(self):
        svc0 = json.load(open(os.path.join(FIX, "services.json")))[0]
        task0 = json.load(open(os.path.join(FIX, "tasks-steady.json")))[0]
        self.nodes = open(os.path.join(FIX, "nodes.json"), "rb").read()
        self.version = open(os.path.join(FIX, "version.json"), "rb").read()
        self.task0 = task0
        self.services = []
        for i in range(SERVICES):
            s = copy.deepcopy(svc0)
            s["ID"] = f"svc{i:021d}"
            s["Spec"]["Name"] = f"bench-{i}"
            s["Spec"]["Labels"] = {
                "mesh.publish": f"{PORT_BASE + i}:80",
                "mesh.health": "none",
            }
            s["Spec"]["Mode"]["Replicated"]["Replicas"] = TASKS_PER
            self.services.append(s)
        self.services_json = json.dumps(self.services).encode()
        self.serial = 0
        self.tasks = []  # (service index, task id, address, json bytes)
        for i in range(SERVICES):
            for slot in range(TASKS_PER):
                self.tasks.append(self.task(i, slot))
        self.lock = threading.Lock()
        self.tasks_json = self.render()
        self.polls = 0

    def task(self, svc, slot):
        self.serial += 1
        n = self.serial
        t = copy.deepcopy(self.task0)
        tid = f"task{n:021d}"
        addr = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
        t["ID"] = tid
        t["ServiceID"] = f"svc{svc:021d}"
        t["Slot"] = slot + 1
        t["NetworksAttachments"][0]["Addresses"] = [addr + "/8"]
        t["NetworksAttachments"][0]["Network"]["IPAMOptions"]["Configs"][0]["Subnet"] = "10.0.0.0/8"
        return (svc, tid, addr, json.dumps(t).encode())

    def render(self):
        return b"[" + b",".join(t[3] for t in self.tasks) + b"]"

    def churn(self):
        """Replaces CHURN of the tasks; returns one (service, new address) to watch for."""
        k = max(1, int(len(self.tasks) * CHURN))
        picked = random.sample(range(len(self.tasks)), k)
        for j in picked:
            svc = self.tasks[j][0]
            self.tasks[j] = self.task(svc, j % TASKS_PER)
        body = self.render()
        with self.lock:
            self.tasks_json = body
        last = self.tasks[picked[-1]]
        return last[0], last[2]


def serve_engine(swarm, path):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            p = self.path.split("?")[0]
            if p == "/version":
                body = swarm.version
            elif p.endswith("/services"):
                body = swarm.services_json
            elif p.endswith("/tasks"):
                with swarm.lock:
                    body = swarm.tasks_json
                    swarm.polls += 1
            elif p.endswith("/nodes"):
                body = swarm.nodes
            elif p.endswith("/events"):
                # No event stream: meshd polls (and retries the stream with back-off).
                self.send_response(404)
                b = b'{"message":"no events in this bench"}'
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(b)))
                self.end_headers()
                self.wfile.write(b)
                return
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def get_request(self):
            conn, _ = self.socket.accept()
            return conn, ("unix", 0)

    srv = Server(path, Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return int(parts[11]) + int(parts[12])  # utime, stime


def get(admin, path, timeout=5):
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as r:
        return r.read()


def control_events(admin):
    """meshd_control_event_seconds from /metrics: {event: {le: cumulative count}}."""
    out = {}
    for line in get(admin, "/metrics", timeout=30).decode().splitlines():
        for part in ("sum", "count"):
            head = f"meshd_control_event_seconds_{part}{{"
            if line.startswith(head):
                labels, value = line[len(head) :].rsplit("} ", 1)
                ev = dict(p.split("=", 1) for p in labels.split(","))["event"].strip('"')
                out.setdefault("_" + part, {})[ev] = float(value)
        if not line.startswith("meshd_control_event_seconds_bucket{"):
            continue
        labels, value = line[len("meshd_control_event_seconds_bucket{") :].rsplit("} ", 1)
        kv = dict(p.split("=", 1) for p in labels.split(","))
        ev, le = kv["event"].strip('"'), kv["le"].strip('"')
        out.setdefault(ev, {})[float("inf") if le == "+Inf" else float(le)] = float(value)
    return out


def control_cols(before, after):
    """Events the control loop timed during a phase (all kinds): how many, how many
    held the control thread over 5 ms, and the bucket of the slowest."""
    total = over5 = 0
    slowest = 0.0
    which = []  # the kinds of event over 5 ms, with how many
    for ev, buckets in sorted(after.items()):
        if ev.startswith("_"):
            continue
        prev = before.get(ev, {})
        les = sorted(buckets)
        d = {le: buckets[le] - prev.get(le, 0.0) for le in les}
        total += d[les[-1]]
        over = d[les[-1]] - max((d[le] for le in les if le <= 0.005), default=0.0)
        over5 += over
        if over:
            which.append(f"{ev} {over:.0f}")
        below = 0.0
        for le in les:
            if d[le] > below:
                slowest = max(slowest, le)
            below = d[le]
    top = "> 1 s" if slowest == float("inf") else f"<= {slowest * 1000:g} ms"
    kinds = f" ({', '.join(which)})" if which else ""

    def mean(ev):
        n = after.get("_count", {}).get(ev, 0) - before.get("_count", {}).get(ev, 0)
        spent = after.get("_sum", {}).get(ev, 0) - before.get("_sum", {}).get(ev, 0)
        return f"{spent / n * 1e6:.0f} µs" if n else "-"

    # the mean `tick` (every 250 ms: the walk over the services with something pending)
    # and the mean `discovery` event (a poll's update applied and its generation published)
    return f"{total:.0f} | {over5:.0f}{kinds} | {top} | {mean('tick')} | {mean('discovery')}"


def wait(what, f, timeout=TIMEOUT):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if f():
                return
        except Exception:
            pass
        time.sleep(0.05)
    sys.exit(f"swarm-scale: timed out waiting for {what}")


def one_request(addr):
    t = time.perf_counter()
    try:
        s = socket.create_connection(addr, timeout=2)
        s.settimeout(2)
        s.sendall(b"GET / HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        got = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        s.close()
        ok = got.startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    return ok, (time.perf_counter() - t) * 1000


def load(addr, seconds):
    lat, failed = [], 0
    end = time.time() + seconds
    while time.time() < end:
        ok, ms = one_request(addr)
        if ok:
            lat.append(ms)
        else:
            failed += 1
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    return len(lat), failed, pick(0.5), pick(0.99), (lat[-1] if lat else float("nan"))


def load_apart(addr, seconds):
    """`load` in a process of its own: the fake engine renders 15 MB of JSON per churned
    poll while holding the GIL, which delayed a client thread in this process by tens of
    milliseconds: the bench measured itself, not meshd."""
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(load(addr, seconds)), daemon=True)
    p.start()
    res = q.get(timeout=seconds + TIMEOUT)
    p.join()
    return res


def main():
    meshd = meshd_binary()
    work = tempfile.mkdtemp(prefix="meshd-swarm-scale-")
    procs = []

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *a: (stop(), sys.exit(143)))
    try:
        t0 = time.time()
        swarm = Swarm()
        print(
            f"fake engine: {SERVICES} services x {TASKS_PER} tasks, /tasks answer "
            f"{len(swarm.tasks_json) / 1e6:.1f} MB, built in {time.time() - t0:.1f} s",
            flush=True,
        )
        sock = os.path.join(work, "docker.sock")
        serve_engine(swarm, sock)
        backend = ("127.0.0.1", free_port())
        procs.append(
            subprocess.Popen(
                [meshd, "backend", "--listen", f"{backend[0]}:{backend[1]}", "--name", "echo"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        admin = f"127.0.0.1:{free_port()}"
        echo = ("127.0.0.1", free_port())
        cfg = os.path.join(work, "mesh.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[admin]\nlisten = "{admin}"\n\n'
                f'[discovery.docker]\nendpoint = "unix://{sock}"\npoll_interval = "{POLL}"\n'
                f'address = "overlay"\n\n'
                f'[[service]]\nname = "echo"\nlisten = ["{echo[0]}:{echo[1]}"]\n'
                f'backends = ["{backend[0]}:{backend[1]}"]\n[service.health]\ncheck = "none"\n'
            )
        log = open(os.path.join(work, "meshd.log"), "w")
        m = subprocess.Popen(
            [meshd, "--config", cfg, "--threads", THREADS],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(E, RUST_LOG=E.get("RUST_LOG", "warn")),
        )
        procs.append(m)
        t0 = time.time()

        def all_services():
            st = json.loads(get(admin, "/api/v1/services", timeout=10))
            return len(st["services"]) >= SERVICES + 1

        wait("meshd to serve every service", all_services)
        print(f"meshd ready with {SERVICES + 1} services in {time.time() - t0:.1f} s", flush=True)
        wait("echo through meshd", lambda: one_request(echo)[0])
        time.sleep(2)

        rows = []
        seen = []

        def phase(label, churn, with_load, target=echo):
            """DUR seconds; `churn`: CHURN of the tasks replaced after every poll meshd
            makes; `with_load`: the echo client runs (else meshd does control-plane work
            only, and its CPU is the control plane's), against `target` (meshd's echo
            listener, or the backend itself for the floor)."""
            stop_churn = threading.Event()

            def churner():
                last = swarm.polls
                while not stop_churn.is_set():
                    if swarm.polls != last:
                        last = swarm.polls
                        svc, addr = swarm.churn()
                        seen.append((time.time(), svc, addr))
                    time.sleep(0.005)

            ev0 = control_events(admin)
            polls0, cpu0, t0 = swarm.polls, cpu_ticks(m.pid), time.time()
            th = threading.Thread(target=churner, daemon=True)
            if churn:
                th.start()
            if with_load:
                res = load_apart(target, DUR)
            else:
                time.sleep(DUR)
                res = None
            stop_churn.set()
            if churn:
                th.join()
            row = (label, swarm.polls - polls0, cpu_ticks(m.pid) - cpu0, time.time() - t0, res)
            rows.append(row + (control_cols(ev0, control_events(admin)),))

        phase("same answer, no traffic", False, False)
        phase("churn, no traffic", True, False)
        phase("same answer, echo load", False, True)
        phase("churn, echo load", True, True)
        # The floor: the same client and churn, straight to the backend. What meshd adds
        # to the maxima is the difference with the row above.
        phase("churn, echo load, no meshd (floor)", True, True, backend)

        # the last change: how long until meshd's status lists it
        changed_at, svc, addr = seen[-1]
        name = f"bench-{svc}"

        def listed():
            st = json.loads(get(admin, "/api/v1/services", timeout=10))
            for s in st["services"]:
                if s["name"] == name:
                    return any(b["addr"].startswith(addr + ":") for b in s["backends"])
            return False

        wait(f"{addr} in {name}", listed, timeout=30)
        lag = time.time() - changed_at

        print(
            f"\n{SERVICES} services x {TASKS_PER} tasks, {CHURN:.1%} of tasks replaced per poll, "
            f"poll_interval {POLL}, meshd --threads {THREADS}"
        )
        print(
            "| phase | polls | meshd CPU | CPU per poll | requests to echo | failed | p50 ms | p99 ms"
            " | max ms | control events | over 5 ms | slowest | mean tick | mean discovery |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, polls, cpu, dt, res, ctl in rows:
            cpu_ms = cpu * 1000 / TICK
            per = f"{cpu_ms / polls:.1f} ms" if polls and res is None else "(with traffic)"
            load_cols = (
                f"{res[0]} | {res[1]} | {res[2]:.2f} | {res[3]:.2f} | {res[4]:.1f}"
                if res
                else "- | - | - | - | -"
            )
            print(
                f"| {label} | {polls} | {cpu_ms / dt / 10:.1f}% of a core | {per} | {load_cols}"
                f" | {ctl} |"
            )
        print(f"\nthe last change was in meshd's status {lag * 1000:.0f} ms after it was made")
        if m.poll() is not None:
            sys.exit("swarm-scale: meshd exited during the run")
    finally:
        stop()


if __name__ == "__main__":
    main()
