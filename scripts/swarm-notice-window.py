#!/usr/bin/env python3
"""Measures Swarm's notice window on this machine's Docker engine.

The notice window is the time a router that polls `GET /tasks` has to drain a task before
it is signalled: from the first answer of `GET /tasks` that shows the task's
`DesiredState` no longer `running`, to the container's `kill` event (`signal=15`) on
`GET /events`. Both clocks are this machine's (the engine runs here).

Cases: a stop-first rolling update and a scale-down, each with the tasks on an attachable
overlay network and without any network attachment. The tasks are busybox httpd
(deploy/busybox/build-image.sh) run with `--init`, so each exits at once on SIGTERM.

Usage:  scripts/swarm-notice-window.py [--rounds N] [--poll-ms MS]
Needs:  a Docker engine (a one-node swarm is initialised if there is none and left at the
        end), busybox-static (scripts/setup.sh). Takes about 2-3 minutes with the default
        two rounds. Removes everything it creates, also on failure.

Prints one line per sample and, per case, min/median/max in milliseconds.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

SOCK = "/var/run/docker.sock"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, timeout=5.0):
        super().__init__("localhost", timeout=timeout)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(SOCK)
        self.sock = s


def q(obj):
    return urllib.parse.quote(json.dumps(obj, separators=(",", ":")))


def docker(*args, check=True):
    p = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout.strip()


class Watch:
    """Polls /tasks of one service and follows kill events; records per task ID the time
    (ns) of the first answer showing DesiredState != running, and of its kill event."""

    def __init__(self, service, poll_s):
        self.service = service
        self.poll_s = poll_s
        self.was_running = set()  # task IDs seen with DesiredState running
        self.first_stopping = {}  # task ID -> (ns, desired state)
        self.killed = {}  # task ID -> (ns, signal)
        self.stop = threading.Event()
        self.polls = 0
        self.threads = [
            threading.Thread(target=self._poll, daemon=True),
            threading.Thread(target=self._events, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _poll(self):
        path = "/tasks?filters=" + q({"service": [self.service]})
        conn = UnixHTTP()
        while not self.stop.is_set():
            try:
                conn.request("GET", path)
                body = conn.getresponse().read()
                seen = time.time_ns()  # when the answer was complete
                self.polls += 1
                for t in json.loads(body):
                    desired = t.get("DesiredState")
                    if desired == "running":
                        self.was_running.add(t["ID"])
                    elif t["ID"] in self.was_running and t["ID"] not in self.first_stopping:
                        # Only a running -> shutdown/remove change: a stop-first update's
                        # new task waits as "ready" before it runs.
                        self.first_stopping[t["ID"]] = (seen, desired)
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = UnixHTTP()
            time.sleep(self.poll_s)

    def _events(self):
        path = "/events?filters=" + q({"type": ["container"], "event": ["kill"]})
        conn = UnixHTTP(timeout=None)
        conn.request("GET", path)
        r = conn.getresponse()
        buf = b""
        while not self.stop.is_set():
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                a = ev.get("Actor", {}).get("Attributes", {})
                tid = a.get("com.docker.swarm.task.id")
                if tid and tid not in self.killed:
                    self.killed[tid] = (int(ev.get("timeNano", 0)), a.get("signal"))


def wait(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def running(service):
    out = docker("service", "ps", "--filter", "desired-state=running", "--format", "{{.CurrentState}}", service)
    return sum(1 for l in out.splitlines() if l.startswith("Running"))


def update_done(service):
    st = docker("service", "inspect", "--format", "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}", service)
    return st in ("", "completed")


def run_case(name, image, net, how, rounds, poll_s, created):
    svc = f"notice-{os.getpid()}-{name}"
    args = ["service", "create", "--quiet", "--detach", "--name", svc, "--init",
            "--no-resolve-image", "--stop-grace-period", "5s",
            "--update-parallelism", "1", "--update-delay", "2s", "--update-order", "stop-first",
            "--replicas", "3"]
    if net:
        args += ["--network", net, "--endpoint-mode", "dnsrr"]
    created["services"].append(svc)
    docker(*args, image)
    wait(lambda: running(svc) == 3, 60, f"{svc}: 3 running tasks")
    w = Watch(svc, poll_s)
    time.sleep(1)
    for i in range(rounds):
        if how == "update":
            docker("service", "update", "--quiet", "--detach", "--env-add", f"ROUND={i}", svc)
            time.sleep(1)
            wait(lambda: update_done(svc) and running(svc) == 3, 90, f"{svc}: update {i}")
        else:
            docker("service", "scale", "--detach", f"{svc}=6")
            wait(lambda: running(svc) == 6, 60, f"{svc}: 6 running")
            docker("service", "scale", "--detach", f"{svc}=3")
            wait(lambda: running(svc) == 3, 60, f"{svc}: back to 3")
    # The last round's tasks are signalled ~1-3.5 s after they left the running set.
    time.sleep(6)
    w.stop.set()
    samples = []
    for tid, (seen, desired) in sorted(w.first_stopping.items(), key=lambda x: x[1][0]):
        k = w.killed.get(tid)
        if not k:
            print(f"  {name:<26} task {tid[:12]} desired={desired:<8} no kill event seen")
            continue
        ms = (k[0] - seen) / 1e6
        samples.append(ms)
        print(f"  {name:<26} task {tid[:12]} desired={desired:<8} kill signal={k[1]}: {ms:8.1f} ms after /tasks showed it")
    docker("service", "rm", svc, check=False)
    print(f"  ({w.polls} polls of /tasks)")
    return samples


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--poll-ms", type=float, default=20)
    a = ap.parse_args()
    poll_s = a.poll_ms / 1000
    created = {"services": [], "networks": [], "images": [], "swarm": False}
    try:
        print("engine:", docker("version", "--format", "{{.Server.Version}} (API {{.Server.APIVersion}})"))
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}")
        if state == "inactive":
            addr = subprocess.run(["sh", "-c", "ip -4 -o addr show scope global | grep -v -e docker -e br- | awk '{print $4}' | cut -d/ -f1 | head -1"],
                                  capture_output=True, text=True).stdout.strip()
            created["gwbridge"] = subprocess.run(["docker", "network", "inspect", "docker_gwbridge"],
                                                 capture_output=True).returncode != 0
            docker("swarm", "init", "--advertise-addr", addr)
            created["swarm"] = True
        image = f"meshbb:notice-{os.getpid()}"
        created["images"].append(image)
        subprocess.run([os.path.join(REPO, "deploy/busybox/build-image.sh"), image, "notice"], check=True)
        net = f"notice-{os.getpid()}"
        created["networks"].append(net)
        docker("network", "create", "--driver", "overlay", "--attachable", net)
        results = {}
        for name, n, how in [
            ("update, overlay", net, "update"),
            ("scale-down, overlay", net, "scale"),
            ("update, no network", None, "update"),
            ("scale-down, no network", None, "scale"),
        ]:
            results[name] = run_case(name.replace(", ", "-").replace(" ", ""), image, n, how, a.rounds, poll_s, created)
        print(f"\nnotice window: first /tasks answer with DesiredState != running -> kill event "
              f"(signal 15), polling every {a.poll_ms:g} ms; ms")
        print(f"{'case':<24} {'n':>3} {'min':>8} {'median':>8} {'max':>8}")
        for name, s in results.items():
            if s:
                print(f"{name:<24} {len(s):>3} {min(s):>8.0f} {statistics.median(s):>8.0f} {max(s):>8.0f}")
            else:
                print(f"{name:<24} {0:>3} (no sample)")
    finally:
        for s in created["services"]:
            docker("service", "rm", s, check=False)
        for n in created["networks"]:
            for _ in range(60):
                if subprocess.run(["docker", "network", "rm", n], capture_output=True).returncode == 0:
                    break
                time.sleep(1)
        if created["swarm"]:
            docker("swarm", "leave", "--force", check=False)
            if created.get("gwbridge"):
                time.sleep(2)
                docker("network", "rm", "docker_gwbridge", check=False)
        for i in created["images"]:
            docker("rmi", "-f", i, check=False)


if __name__ == "__main__":
    sys.exit(main())
