#!/usr/bin/env python3
"""Side-by-side L4 proxy comparison: direct, meshd, HAProxy, HAProxy+splice, nginx stream.

Driven by benches/compare/run.sh, which installs the tools, builds meshd and raises the
open-files limit. Standard library only, plus matplotlib for the chart when it is importable.

Subcommands:
  run          start backends and proxies, measure every workload in interleaved rounds,
               write JSON, a text table and a PNG chart
  report       re-render the table and chart from a JSON file written by `run`
  sink         a backend that accepts connections and holds them (idle workload)
  idle-client  open N connections to a port, report, hold them until stdin closes

Every process `run` starts is recorded in WORK/pids (one "PID NAME" a line) so the shell
trap can end it even if this process is killed; `run` also stops them itself on every exit.
"""

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = ["direct", "meshd", "haproxy", "haproxy_splice", "nginx"]
LABELS = {
    "direct": "direct",
    "meshd": "meshd",
    "haproxy": "HAProxy",
    "haproxy_splice": "HAProxy+splice",
    "nginx": "nginx stream",
}
WORKLOADS = ["keepalive", "close", "bulk", "idle"]

# Loopback ports. Backends, then per proxy: http, bulk, idle (idle runs a fresh instance).
BACKEND_HTTP = 18080
BACKEND_BULK = 18201
BACKEND_SINK = 18301
PORTS = {
    "direct": {"http": BACKEND_HTTP, "bulk": BACKEND_BULK},
    "meshd": {"http": 18110, "bulk": 18111, "idle": 18112, "admin": 18119, "admin_idle": 18118},
    "haproxy": {"http": 18120, "bulk": 18121, "idle": 18122},
    "haproxy_splice": {"http": 18130, "bulk": 18131, "idle": 18132},
    "nginx": {"http": 18140, "bulk": 18141, "idle": 18142},
}


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# /proc helpers


def children(pid):
    """Direct children of pid (nginx workers)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(")") + 2:].split()
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def cpu_ticks(pids):
    """utime+stime of each pid (all threads), in ticks."""
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rfind(")") + 2:].split()
        t += int(fields[11]) + int(fields[12])
    return t


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def fd_count(pids):
    n = 0
    for p in pids:
        try:
            n += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            pass
    return n


def core_times():
    """{cpu index: (busy, total)} jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                v = list(map(int, parts[1:]))
                idle = v[3] + v[4]
                total = sum(v[:8])
                out[int(parts[0][3:])] = (total - idle, total)
    return out


def core_busy(before, after):
    res = {}
    for c in after:
        db = after[c][0] - before[c][0]
        dt = after[c][1] - before[c][1]
        res[f"cpu{c}"] = round(100.0 * db / dt, 1) if dt else 0.0
    return res


def total_busy():
    """Busy jiffies summed over every core."""
    return sum(b for b, _t in core_times().values())


def task_jiffies():
    """(user+nice+system, steal) jiffies summed over every core. Steal is time the
    hypervisor gave another guest: on a shared VM it slows every process of ours."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return v[0] + v[1] + v[2], v[7]


def kthread_ticks():
    """CPU ticks of kernel threads (children of kthreadd: ksoftirqd, kworkers)."""
    t = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        if d == "2" or fields[1] == "2":
            t += int(fields[11]) + int(fields[12])
    return t


def own_cpu_s():
    """CPU seconds of this process and its waited-for children (wrk, iperf3 -c)."""
    import resource
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def wait_quiet(limit_pct, max_wait):
    """Waits until the machine is quiet (every core's busy share summed stays under
    limit_pct % of one core for 0.5 s) or max_wait seconds passed. Returns (busy %, waited s).
    Everything this script runs is idle between measurements, so busy here is someone else."""
    t0 = time.time()
    while True:
        k0 = total_busy()
        time.sleep(0.5)
        busy = 100.0 * (total_busy() - k0) / CLK_TCK / 0.5
        waited = time.time() - t0
        if busy <= limit_pct or waited >= max_wait:
            return round(busy, 1), round(waited, 1)


def wait_port(port, timeout=10.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def port_free(port):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# Processes


class Procs:
    """Every process started by `run`; recorded in WORK/pids for the shell trap."""

    def __init__(self, work):
        self.work = work
        self.live = []
        self.pidfile = os.path.join(work, "pids")
        open(self.pidfile, "w").close()

    def start(self, name, argv, env=None, stdin=None, stdout=None):
        logf = open(os.path.join(self.work, f"{name}.log"), "ab")
        e = dict(os.environ)
        if env:
            e.update(env)
        p = subprocess.Popen(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            env=e,
            cwd=self.work,
        )
        p.name = name
        self.live.append(p)
        with open(self.pidfile, "a") as f:
            f.write(f"{p.pid} {name}\n")
        return p

    def stop(self, p, sig=signal.SIGTERM, wait=5.0):
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            self.stop(p, wait=3.0)


class Target:
    """A proxy (or direct) under test: its ports and the pids to account CPU/RSS to."""

    def __init__(self, name, proc=None):
        self.name = name
        self.proc = proc

    def pids(self):
        if self.proc is None:
            return []
        return [self.proc.pid] + children(self.proc.pid)


# ---------------------------------------------------------------------------------------
# Configuration files


def cfg_meshd(work, ports, services, threads, suffix=""):
    text = f'[admin]\nlisten = "127.0.0.1:{ports["admin" + suffix]}"\n\n'
    text += '[log]\naccess_log = false\n\n'
    # connect_timeout as HAProxy's `timeout connect 5s` below (meshd's default is 1s, see
    # docs/BENCHMARKS.md: under a connection burst one dropped SYN costs 1 s).
    text += ('[defaults]\nbalance = "round_robin"\ndrain_timeout = "1s"\nbacklog = 4096\n'
             'connect_timeout = "5s"\n\n')
    for name, listen, backend in services:
        text += (
            f'[[service]]\nname = "{name}"\nlisten = ["127.0.0.1:{listen}"]\n'
            f'backends = [{{ addr = "127.0.0.1:{backend}" }}]\n'
            f'[service.health]\ncheck = "none"\n\n'
        )
    path = os.path.join(work, f"meshd{suffix}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def cfg_haproxy(work, name, services, threads, splice, maxconn):
    text = (
        "global\n"
        f"    nbthread {threads}\n"
        f"    maxconn {maxconn}\n"
        "    maxpipes 256\n"
        "defaults\n"
        "    mode tcp\n"
        "    timeout connect 5s\n"
        "    timeout client 1h\n"
        "    timeout server 1h\n"
        "    backlog 4096\n"
    )
    if splice == "auto":
        # HAProxy decides per transfer; on loopback it mostly keeps recv/send.
        text += "    option splice-auto\n"
    elif splice:
        text += "    option splice-request\n    option splice-response\n"
    for svc, listen, backend in services:
        text += (
            f"frontend f_{svc}\n    bind 127.0.0.1:{listen}\n    default_backend b_{svc}\n"
            f"backend b_{svc}\n    server s1 127.0.0.1:{backend}\n"
        )
    path = os.path.join(work, f"{name}.cfg")
    with open(path, "w") as f:
        f.write(text)
    return path


def cfg_nginx_stream(work, name, services, threads, nofile):
    text = (
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        "daemon off;\nmaster_process on;\n"
        f"worker_processes {threads};\n"
        f"worker_rlimit_nofile {nofile};\n"
        f"pid {work}/{name}.pid;\n"
        f"error_log {work}/{name}.err warn;\n"
        f"events {{ worker_connections {nofile - 100}; }}\n"
        "stream {\n"
    )
    for _svc, listen, backend in services:
        text += (
            f"    server {{ listen 127.0.0.1:{listen} backlog=4096; "
            f"proxy_pass 127.0.0.1:{backend}; }}\n"
        )
    text += "}\n"
    path = os.path.join(work, f"{name}.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def cfg_nginx_backend(work, workers, nofile):
    text = (
        "daemon off;\nmaster_process on;\n"
        f"worker_processes {workers};\n"
        f"worker_rlimit_nofile {nofile};\n"
        f"pid {work}/backend-nginx.pid;\n"
        f"error_log {work}/backend-nginx.err warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        "    keepalive_requests 10000000;\n"
        "    keepalive_timeout 300s;\n"
        f"    client_body_temp_path {work}/tmp-body;\n"
        f"    proxy_temp_path {work}/tmp-proxy;\n"
        f"    fastcgi_temp_path {work}/tmp-fcgi;\n"
        f"    uwsgi_temp_path {work}/tmp-uwsgi;\n"
        f"    scgi_temp_path {work}/tmp-scgi;\n"
        "    default_type text/plain;\n"
        f"    server {{\n        listen 127.0.0.1:{BACKEND_HTTP} backlog=4096;\n"
        '        location / { return 200 "ok\\n"; }\n'
        "    }\n"
        "}\n"
    )
    path = os.path.join(work, "backend-nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


# ---------------------------------------------------------------------------------------
# Starting things


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = args.work
        self.procs = Procs(self.work)
        self.nofile = args.nofile
        self.idle_n = args.idle_conns
        self.maxconn = self.idle_n + 200
        self.targets = {}

    def taskset(self, cpus, argv):
        return ["taskset", "-c", cpus] + argv if cpus else argv

    def start_backends(self):
        conf = cfg_nginx_backend(self.work, self.a.backend_workers, self.nofile)
        self.backend_http = self.procs.start(
            "backend-nginx",
            self.taskset(self.a.backend_cpus,
                         ["nginx", "-e", f"{self.work}/backend-nginx.err", "-p", self.work, "-c", conf]),
        )
        self.backend_bulk = self.procs.start(
            "backend-iperf3",
            self.taskset(self.a.backend_cpus, ["iperf3", "-s", "-p", str(BACKEND_BULK)]),
        )
        self.sink = self.procs.start(
            "backend-sink",
            self.taskset(self.a.backend_cpus,
                         [sys.executable, os.path.abspath(__file__), "sink", "--port", str(BACKEND_SINK)]),
        )
        for port in (BACKEND_HTTP, BACKEND_BULK, BACKEND_SINK):
            if not wait_port(port):
                raise RuntimeError(f"backend on port {port} did not start (see {self.work}/*.log)")

    def start_proxy(self, name, idle=False):
        """Starts one proxy: the long-running instance (http+bulk) or a fresh idle one."""
        p = PORTS[name]
        threads = self.a.threads
        cpus = self.a.proxy_cpus
        tag = f"{name}-idle" if idle else name
        if idle:
            services = [("idle", p["idle"], BACKEND_SINK)]
            first = p["idle"]
        else:
            services = [("http", p["http"], BACKEND_HTTP), ("bulk", p["bulk"], BACKEND_BULK)]
            first = p["http"]
        if name == "meshd":
            cfg = cfg_meshd(self.work, p, services, threads, "_idle" if idle else "")
            argv = [self.a.meshd, "--config", cfg]
            if meshd_has_threads_flag(self.a.meshd):
                argv += ["--threads", str(threads)]  # 1 = a current-thread runtime
            proc = self.procs.start(
                tag,
                self.taskset(cpus, argv),
                # Older meshd builds have no --threads: tokio reads this instead.
                env={"TOKIO_WORKER_THREADS": str(threads), "RUST_LOG": "warn"},
            )
            admin = p["admin_idle" if idle else "admin"]
            end = time.time() + 15
            ok = False
            while time.time() < end and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                        if r.status == 200:
                            ok = True
                            break
                except OSError:
                    pass
                time.sleep(0.05)
            if not ok:
                raise RuntimeError(f"meshd did not become ready (see {self.work}/{tag}.log)")
        elif name in ("haproxy", "haproxy_splice"):
            splice = self.a.haproxy_splice if name == "haproxy_splice" else None
            cfg = cfg_haproxy(self.work, tag, services, threads, splice, self.maxconn)
            proc = self.procs.start(tag, self.taskset(cpus, ["haproxy", "-db", "-f", cfg]))
        elif name == "nginx":
            cfg = cfg_nginx_stream(self.work, tag, services, threads, self.nofile)
            proc = self.procs.start(
                tag, self.taskset(cpus, ["nginx", "-e", f"{self.work}/{tag}.err", "-p", self.work, "-c", cfg])
            )
        else:
            raise ValueError(name)
        if not wait_port(first, proc=proc) or proc.poll() is not None:
            raise RuntimeError(f"{tag} did not start (see {self.work}/{tag}.log)")
        if name == "nginx":
            # Wait for the worker(s): the master binds, the workers serve.
            end = time.time() + 5
            while time.time() < end and len(children(proc.pid)) < threads:
                time.sleep(0.05)
        return Target(name, proc)

    # -----------------------------------------------------------------------------------
    # Workloads

    def known_s(self, pids):
        """CPU seconds of every process of ours: the proxy, the backends, this script and
        the load generator it waits for."""
        return cpu_ticks(pids + self.backend_pids()) / CLK_TCK + own_cpu_s()

    def backend_pids(self):
        pids = []
        for p in (self.backend_http, self.backend_bulk, self.sink):
            pids += [p.pid] + children(p.pid)
        return pids

    def snapshot(self, pids):
        return (total_busy(), task_jiffies(), kthread_ticks(), self.known_s(pids))

    def unattributed(self, res, s0, s1, wall):
        """CPU (percent of one core) spent during a measurement by nobody we started:
        `unattributed` counts kernel threads (ksoftirqd), interrupts and other users of the
        machine; `foreign` only task time of processes that are neither ours nor kernel
        threads, plus hypervisor steal: someone else's work, which makes the measurement
        suspect."""
        other = (s1[0] - s0[0]) / CLK_TCK - (s1[3] - s0[3])
        res["unattributed_cpu_pct"] = round(100.0 * other / wall, 1)
        foreign = (s1[1][0] - s0[1][0] - (s1[2] - s0[2])) / CLK_TCK - (s1[3] - s0[3])
        steal = (s1[1][1] - s0[1][1]) / CLK_TCK
        res["steal_cpu_pct"] = round(100.0 * steal / wall, 1)
        res["foreign_cpu_pct"] = round(max(0.0, 100.0 * foreign / wall) + res["steal_cpu_pct"], 1)

    def measure_wrk(self, t, close):
        port = PORTS[t.name]["http"]
        argv = ["wrk", "-t1", f"-c{self.a.wrk_conns}", f"-d{self.a.dur}s", "--latency", "--timeout", "5s"]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(f"http://127.0.0.1:{port}/")
        argv = self.taskset(self.a.load_cpus, argv)
        pids = t.pids()
        s0 = self.snapshot(pids)
        c0, k0, w0 = cpu_ticks(pids), core_times(), time.time()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=self.a.dur + 30)
        c1, k1, w1 = cpu_ticks(pids), core_times(), time.time()
        s1 = self.snapshot(pids)
        res = parse_wrk(out.stdout)
        self.unattributed(res, s0, s1, w1 - w0)
        if out.returncode != 0 or res.get("rps") is None:
            raise RuntimeError(f"wrk failed for {t.name}: {out.stdout}\n{out.stderr}")
        res["proxy_cpu_pct"] = round(100.0 * (c1 - c0) / CLK_TCK / (w1 - w0), 1) if pids else None
        res["cores_busy_pct"] = core_busy(k0, k1)
        for c, v in res["cores_busy_pct"].items():
            res[f"busy_{c}"] = v
        if pids and res["rps"]:
            # The proxy's CPU per request, and what one core of it would sustain if the
            # proxy, not the load generator or the backend, were the bottleneck.
            us = (c1 - c0) / CLK_TCK * 1e6 / (res["rps"] * (w1 - w0))
            res["proxy_us_per_req"] = round(us, 2)
            res["per_core_rps"] = round(1e6 / us) if us else None
        return res

    def measure_bulk(self, t):
        port = PORTS[t.name]["bulk"]
        argv = self.taskset(
            self.a.load_cpus,
            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(self.a.dur), "-J"],
        )
        pids = t.pids()
        for attempt in range(3):
            s0 = self.snapshot(pids)
            c0, k0, w0 = cpu_ticks(pids), core_times(), time.time()
            out = subprocess.run(argv, capture_output=True, text=True, timeout=self.a.dur + 30)
            c1, k1, w1 = cpu_ticks(pids), core_times(), time.time()
            s1 = self.snapshot(pids)
            try:
                j = json.loads(out.stdout)
            except ValueError:
                j = {"error": out.stdout[-500:] + out.stderr[-500:]}
            if "error" not in j:
                break
            log(f"iperf3 via {t.name}: {j['error']}; retrying")
            time.sleep(1.0)
        else:
            raise RuntimeError(f"iperf3 failed for {t.name}: {j.get('error')}")
        recv = j["end"]["sum_received"]
        nbytes = recv["bytes"]
        cpu_s = (c1 - c0) / CLK_TCK
        res = {
            "gbps": round(recv["bits_per_second"] / 1e9, 3),
            "bytes": nbytes,
            "proxy_cpu_s": round(cpu_s, 3) if pids else None,
            "proxy_cpu_s_per_gb": round(cpu_s / (nbytes / 1e9), 4) if pids and nbytes else None,
            "proxy_cpu_pct": round(100.0 * cpu_s / (w1 - w0), 1) if pids else None,
            "cores_busy_pct": core_busy(k0, k1),
        }
        for c, v in res["cores_busy_pct"].items():
            res[f"busy_{c}"] = v
        self.unattributed(res, s0, s1, w1 - w0)
        return res

    def sink_conns(self):
        # Descriptors the sink holds beyond its listener and stdio.
        return fd_count([self.sink.pid]) - self.sink_base_fds

    def measure_idle(self, name):
        t = self.start_proxy(name, idle=True)
        try:
            time.sleep(0.3)
            pids = t.pids()
            rss0, fds0 = rss_kib(pids), fd_count(pids)
            client = self.procs.start(
                "idle-client",
                [sys.executable, os.path.abspath(__file__), "idle-client",
                 "--port", str(PORTS[name]["idle"]), "--n", str(self.idle_n)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            try:
                line = client.stdout.readline().decode().split()
                if not line or line[0] != "ready":
                    raise RuntimeError(f"idle client failed for {name}")
                opened, failed = int(line[1]), int(line[2])
                end = time.time() + 30
                while time.time() < end and self.sink_conns() < opened:
                    time.sleep(0.1)
                held = self.sink_conns()
                time.sleep(1.0)
                pids = t.pids()
                rss1, fds1 = rss_kib(pids), fd_count(pids)
            finally:
                try:
                    client.stdin.close()
                    client.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                self.procs.stop(client, wait=10)
            end = time.time() + 30
            while time.time() < end and self.sink_conns() > 0:
                time.sleep(0.1)
        finally:
            self.procs.stop(t.proc)
        n = max(held, 1)
        return {
            "conns": opened,
            "failed": failed,
            "backend_held": held,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "kib_per_conn": round((rss1 - rss0) / n, 3),
            "fds_per_conn": round((fds1 - fds0) / n, 3),
        }

    # -----------------------------------------------------------------------------------

    def check_ports(self):
        for port in [BACKEND_HTTP, BACKEND_BULK, BACKEND_SINK] + [
            v for k in PORTS for v in PORTS[k].values()
        ]:
            if not port_free(port):
                raise RuntimeError(f"port {port} is in use: stop whatever holds it first")

    def run(self):
        a = self.a
        self.check_ports()
        targets = a.targets
        workloads = a.workloads
        log(f"targets {targets}; workloads {workloads}; {a.rounds} rounds of {a.dur}s; "
            f"{a.threads} proxy thread(s) on cpu {a.proxy_cpus}; load on cpu {a.load_cpus}; "
            f"backends on cpu {a.backend_cpus}; idle conns {self.idle_n}")
        self.start_backends()
        time.sleep(0.3)
        self.sink_base_fds = fd_count([self.sink.pid])
        for name in targets:
            if name == "direct":
                self.targets[name] = Target("direct")
            elif any(w != "idle" for w in workloads):
                self.targets[name] = self.start_proxy(name)
        results = {w: {t: [] for t in targets} for w in workloads}
        t_start = time.time()
        # Warm-up: one short keep-alive run per target (not recorded).
        if "keepalive" in workloads or "close" in workloads:
            for name in targets:
                port = PORTS[name]["http"]
                subprocess.run(self.taskset(a.load_cpus, ["wrk", "-t1", "-c10", "-d1s",
                                                          f"http://127.0.0.1:{port}/"]),
                               capture_output=True, timeout=30)
        for r in range(a.rounds):
            for w in workloads:
                for name in targets:
                    if w == "idle" and name == "direct":
                        continue
                    tries = []
                    for attempt in range(1, a.retries + 2):
                        bg = wait_quiet(a.quiet_pct, a.quiet_wait) if a.quiet_wait > 0 else (None, 0)
                        if w == "keepalive":
                            res = self.measure_wrk(self.targets[name], close=False)
                        elif w == "close":
                            res = self.measure_wrk(self.targets[name], close=True)
                        elif w == "bulk":
                            res = self.measure_bulk(self.targets[name])
                        else:
                            res = self.measure_idle(name)
                        res["attempt"] = attempt
                        tries.append(res)
                        f = res.get("foreign_cpu_pct")
                        if f is None or f <= a.foreign_max or attempt > a.retries:
                            break
                        log(f"round {r + 1} {w} {name}: other processes (or the hypervisor) took {f}% of a core "
                            f"meanwhile (> {a.foreign_max}%): measuring again")
                        time.sleep(2.0)
                    # Keep the least disturbed attempt.
                    res = min(tries, key=lambda x: x.get("foreign_cpu_pct") or 0.0)
                    res["attempts"] = len(tries)
                    res["disturbed"] = (res.get("foreign_cpu_pct") or 0.0) > a.foreign_max
                    res["round"] = r + 1
                    res["background_busy_pct_before"], res["waited_for_quiet_s"] = bg
                    results[w][name].append(res)
                    log(f"round {r + 1}/{a.rounds} {w:9s} {name:15s} {short(w, res)}")
                    time.sleep(0.5)
        elapsed = time.time() - t_start
        doc = {
            "meta": meta(a, self.idle_n, elapsed),
            "raw": results,
        }
        doc["summary"] = summarize(results)
        doc["targets"] = verdicts(doc["summary"])
        return doc


def short(w, r):
    if w in ("keepalive", "close"):
        return (f"{r['rps']:>10.0f} req/s  p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
                f"proxy cpu {r['proxy_cpu_pct']}%  errors {r['errors']}  "
                f"unattributed {r.get('unattributed_cpu_pct')}% foreign {r.get('foreign_cpu_pct')}%")
    if w == "bulk":
        return (f"{r['gbps']:>7.2f} Gbit/s  proxy {r['proxy_cpu_s_per_gb']} cpu-s/GB  "
                f"cpu {r['proxy_cpu_pct']}%  unattributed {r.get('unattributed_cpu_pct')}% "
                f"foreign {r.get('foreign_cpu_pct')}%")
    return (f"{r['conns']} conns ({r['failed']} failed, {r['backend_held']} at backend)  "
            f"{r['kib_per_conn']:.2f} KiB/conn  {r['fds_per_conn']:.2f} fds/conn")


def parse_wrk(text):
    def dur_ms(v, unit):
        return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    res = {"rps": None, "errors": 0, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in", text)
    if m:
        res["requests"] = int(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if m:
            res[f"p{pct}_ms"] = round(dur_ms(m.group(1), m.group(2)), 4)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        res["errors"] = sum(int(x) for x in m.groups())
        res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        res["non2xx"] = int(m.group(1))
        res["errors"] += int(m.group(1))
    return res


_THREADS_FLAG = {}


def meshd_has_threads_flag(meshd):
    if meshd not in _THREADS_FLAG:
        out = subprocess.run([meshd, "--help"], capture_output=True, text=True, timeout=10)
        _THREADS_FLAG[meshd] = "--threads" in out.stdout
    return _THREADS_FLAG[meshd]


def cmd_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def meta(a, idle_n, elapsed):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": os.uname().release,
        "versions": {
            "meshd": cmd_version([a.meshd, "--version"]),
            "haproxy": cmd_version(["haproxy", "-v"]),
            "nginx": cmd_version(["nginx", "-v"]),
            "wrk": cmd_version(["wrk", "-v"]),
            "iperf3": cmd_version(["iperf3", "-v"]),
        },
        "settings": {
            "dur_s": a.dur,
            "rounds": a.rounds,
            "threads": a.threads,
            "proxy_cpus": a.proxy_cpus,
            "load_cpus": a.load_cpus,
            "backend_cpus": a.backend_cpus,
            "backend_workers": a.backend_workers,
            "haproxy_splice": a.haproxy_splice,
            "wrk_conns": a.wrk_conns,
            "idle_conns": idle_n,
            "nofile": a.nofile,
            "quiet_wait_s": a.quiet_wait,
            "quiet_pct": a.quiet_pct,
            "foreign_max_pct": a.foreign_max,
            "retries": a.retries,
            "meshd_threads_via": ("--threads" if meshd_has_threads_flag(a.meshd)
                                  else "TOKIO_WORKER_THREADS env (meshd has no --threads)"),
        },
        "elapsed_s": round(elapsed, 1),
    }


# ---------------------------------------------------------------------------------------
# Summary, ratios, targets

# (workload, metric, unit, higher_is_better)
METRICS = [
    ("keepalive", "rps", "req/s", True),
    ("keepalive", "p50_ms", "p50 ms", False),
    ("keepalive", "p99_ms", "p99 ms", False),
    ("keepalive", "proxy_us_per_req", "proxy us/req", False),
    ("keepalive", "per_core_rps", "req/s per proxy core", True),
    ("keepalive", "proxy_cpu_pct", "proxy %cpu", None),
    ("keepalive", "busy_cpu0", "cpu0 %", None),
    ("keepalive", "busy_cpu1", "cpu1 %", None),
    ("close", "rps", "conn/s", True),
    ("close", "p50_ms", "p50 ms", False),
    ("close", "p99_ms", "p99 ms", False),
    ("close", "proxy_us_per_req", "proxy us/conn", False),
    ("close", "per_core_rps", "conn/s per proxy core", True),
    ("close", "proxy_cpu_pct", "proxy %cpu", None),
    ("close", "busy_cpu0", "cpu0 %", None),
    ("close", "busy_cpu1", "cpu1 %", None),
    ("bulk", "gbps", "Gbit/s", True),
    ("bulk", "proxy_cpu_s_per_gb", "cpu-s/GB", False),
    ("bulk", "proxy_cpu_pct", "proxy %cpu", None),
    ("bulk", "busy_cpu0", "cpu0 %", None),
    ("bulk", "busy_cpu1", "cpu1 %", None),
    ("idle", "kib_per_conn", "KiB/conn", False),
    ("idle", "fds_per_conn", "fds/conn", False),
    ("idle", "rss_after_kib", "RSS KiB", None),
    ("idle", "backend_held", "conns at backend", None),
]


def summarize(results, foreign_max=15.0):
    """Medians per workload and target, over the undisturbed rounds (processes outside the
    benchmark or the hypervisor took at most foreign_max % of a core meanwhile) when there
    is at least one, else over every round."""
    out = {}
    for w, per in results.items():
        out[w] = {}
        for t, all_runs in per.items():
            if not all_runs:
                continue
            clean = [r for r in all_runs if (r.get("foreign_cpu_pct") or 0.0) <= foreign_max]
            runs = clean or all_runs
            s = {"n": len(runs), "n_rounds": len(all_runs), "n_disturbed": len(all_runs) - len(clean)}
            for key in runs[0]:
                vals = [r[key] for r in runs
                        if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
                if vals and key not in ("round", "attempt", "attempts"):
                    s[key] = statistics.median(vals)
                    s[key + "_min"] = min(vals)
                    s[key + "_max"] = max(vals)
            s["errors_total"] = sum(r.get("errors", 0) for r in runs)
            out[w][t] = s
    return out


def get(summary, w, t, m):
    return summary.get(w, {}).get(t, {}).get(m)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdicts(s):
    checks = []

    def add(name, value, target, ok):
        checks.append({"target": name, "value": None if value is None else round(value, 3),
                       "goal": target, "met": ok})

    r = ratio(get(s, "keepalive", "meshd", "rps"), get(s, "keepalive", "haproxy", "rps"))
    add("keep-alive req/s, meshd / HAProxy", r, ">= 1.2", None if r is None else r >= 1.2)
    r = ratio(get(s, "close", "meshd", "rps"), get(s, "close", "haproxy", "rps"))
    add("connections/s, meshd / HAProxy", r, ">= 1.2", None if r is None else r >= 1.2)
    r = ratio(get(s, "keepalive", "meshd", "per_core_rps"), get(s, "keepalive", "haproxy", "per_core_rps"))
    add("keep-alive req/s per proxy core (1/CPU per req), meshd / HAProxy", r, ">= 1.2",
        None if r is None else r >= 1.2)
    r = ratio(get(s, "close", "meshd", "per_core_rps"), get(s, "close", "haproxy", "per_core_rps"))
    add("conn/s per proxy core (1/CPU per conn), meshd / HAProxy", r, ">= 1.2",
        None if r is None else r >= 1.2)
    r = ratio(get(s, "bulk", "meshd", "gbps"), get(s, "bulk", "haproxy_splice", "gbps"))
    add("bulk Gbit/s, meshd / HAProxy+splice", r, ">= 1.0", None if r is None else r >= 1.0)
    r = ratio(get(s, "bulk", "meshd", "proxy_cpu_s_per_gb"), get(s, "bulk", "haproxy_splice", "proxy_cpu_s_per_gb"))
    add("bulk CPU/GB, meshd / HAProxy+splice", r, "<= 1.0", None if r is None else r <= 1.0)
    r = ratio(get(s, "idle", "meshd", "kib_per_conn"), get(s, "idle", "haproxy", "kib_per_conn"))
    add("idle KiB/conn, meshd / HAProxy", r, "<= 1.0", None if r is None else r <= 1.0)
    r = ratio(get(s, "keepalive", "meshd", "p99_ms"), get(s, "keepalive", "haproxy", "p99_ms"))
    add("keep-alive p99, meshd / HAProxy", r, "<= 1.0", None if r is None else r <= 1.0)
    r = ratio(get(s, "close", "meshd", "p99_ms"), get(s, "close", "haproxy", "p99_ms"))
    add("conn/request p99, meshd / HAProxy", r, "<= 1.0", None if r is None else r <= 1.0)
    return checks


def colw(hib, label=""):
    return max(12 if hib is None else 26, len(label) + 2)


def fmt_num(v):
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(v):
    return "-" if v is None else f"{v:.2f}x"


def table_text(doc, markdown=False):
    s = doc["summary"]
    raw = doc["raw"]
    targets = [t for t in TARGETS if any(t in s.get(w, {}) for w in s)]
    lines = []
    titles = {
        "keepalive": f"keep-alive HTTP (wrk -t1 -c{doc['meta']['settings']['wrk_conns']})",
        "close": "one connection per request (wrk, Connection: close)",
        "bulk": "bulk (iperf3, one stream)",
        "idle": f"idle connections ({doc['meta']['settings']['idle_conns']} held)",
    }
    for w in WORKLOADS:
        if w not in s:
            continue
        ms = [(m, u, hib) for (ww, m, u, hib) in METRICS if ww == w]
        if markdown:
            lines.append(f"\n**{titles[w]}** (median of {max(v['n_rounds'] for v in s[w].values())} rounds; "
                         "ratio to direct / to HAProxy in brackets)\n")
            head = "| target | " + " | ".join(u for m, u, _ in ms) + " |"
            lines.append(head)
            lines.append("|" + " --- |" * (len(ms) + 1))
        else:
            lines.append(f"\n== {titles[w]}  [value (x direct, x HAProxy)]")
            lines.append(f"{'target':16s}" + "".join(f"{u:>{colw(h, u)}s}" for m, u, h in ms))
        for t in targets:
            if t not in s[w]:
                continue
            cells = []
            for m, _u, hib in ms:
                v = get(s, w, t, m)
                rd = ratio(v, get(s, w, "direct", m)) if t != "direct" else None
                rh = ratio(v, get(s, w, "haproxy", m))
                cell = fmt_num(v)
                if hib is not None:
                    cell += f" ({fmt_ratio(rd)}, {fmt_ratio(rh)})"
                cells.append(cell)
            if markdown:
                lines.append(f"| {LABELS[t]} | " + " | ".join(cells) + " |")
            else:
                lines.append(f"{LABELS[t]:16s}" + "".join(
                    f"{c:>{colw(h, u)}s}" for c, (_m, u, h) in zip(cells, ms)))
        dist = {LABELS[t]: f"{s[w][t]['n']}/{s[w][t]['n_rounds']}" for t in s[w]
                if s[w][t].get("n_disturbed")}
        if dist:
            lines.append(("\n" if markdown else "") +
                         "rounds used (the others were disturbed by other load on the machine): " +
                         ", ".join(f"{k} {v}" for k, v in dist.items()))
        fo = [v for t in raw.get(w, {}) for r in raw[w][t]
              for v in [r.get("foreign_cpu_pct")] if v is not None]
        if fo:
            lines.append(("\n" if markdown else "") +
                         f"CPU taken meanwhile by processes outside the benchmark or by the hypervisor "
                         f"(steal): median {statistics.median(fo):.0f}%, max {max(fo):.0f}% of a core")
        errs = {t: s[w][t].get("errors_total", 0) for t in s[w] if s[w][t].get("errors_total")}
        if errs:
            lines.append(("\n" if markdown else "") + f"errors reported by wrk: {errs}")
    if markdown:
        lines.append("\n**Targets (same-run medians)**\n")
        lines.append("| target | value | goal | met |")
        lines.append("| --- | --- | --- | --- |")
    else:
        lines.append("\n== targets (same-run medians)")
    for c in doc["targets"]:
        met = {True: "yes", False: "NO", None: "-"}[c["met"]]
        val = "-" if c["value"] is None else f"{c['value']:.2f}x"
        if markdown:
            lines.append(f"| {c['target']} | {val} | {c['goal']} | {met} |")
        else:
            lines.append(f"{c['target']:66s} {val:>8s}  goal {c['goal']:7s} {met}")
    return "\n".join(lines)


def chart(doc, png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not importable: no chart")
        return False
    s = doc["summary"]
    groups = [
        ("keep-alive\nreq/s", "keepalive", "rps", True, 1.2),
        ("keep-alive\nreq/s per\nproxy core", "keepalive", "per_core_rps", True, 1.2),
        ("conn/request\nconn/s", "close", "rps", True, 1.2),
        ("conn/request\nconn/s per\nproxy core", "close", "per_core_rps", True, 1.2),
        ("bulk\nGbit/s", "bulk", "gbps", True, None),
        ("keep-alive\np99", "keepalive", "p99_ms", False, 1.0),
        ("conn/request\np99", "close", "p99_ms", False, 1.0),
        ("bulk\nCPU-s/GB", "bulk", "proxy_cpu_s_per_gb", False, None),
        ("idle\nKiB/conn", "idle", "kib_per_conn", False, 1.0),
    ]
    series = [t for t in ["direct", "meshd", "haproxy_splice", "nginx"]]
    colors = {"direct": "#999999", "meshd": "#d62728", "haproxy_splice": "#1f77b4", "nginx": "#2ca02c"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [5, 4]})
    for ax, hib in zip(axes, (True, False)):
        gs = [g for g in groups if g[3] == hib]
        width = 0.8 / len(series)
        allr = [ratio(get(s, w, t, m), get(s, w, "haproxy", m))
                for (_l, w, m, _h, _g) in gs for t in series if t != "direct"]
        allr = [r for r in allr if r is not None] + [1.3]
        top = max(allr) * 1.25
        for i, t in enumerate(series):
            xs, ys = [], []
            for j, (_lbl, w, m, _h, _goal) in enumerate(gs):
                r = ratio(get(s, w, t, m), get(s, w, "haproxy", m))
                if r is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(r)
            ax.bar(xs, [min(y, top) for y in ys], width, label=LABELS[t], color=colors[t])
            for x, y in zip(xs, ys):
                txt = f"{y:.2f}" if y <= top else f"{y:.1f}\u2191"
                ax.text(x, min(y, top), txt, ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=1)
        for j, (_lbl, w, m, _h, goal) in enumerate(gs):
            if goal is not None and goal != 1.0:
                ax.plot([j - 0.45, j + 0.45], [goal, goal], ls="--", color="#d62728", lw=1)
        if hib:
            # bulk goal is vs HAProxy+splice: draw it at HAProxy+splice's ratio.
            for j, (_lbl, w, m, _h, _goal) in enumerate(gs):
                if w == "bulk":
                    r = ratio(get(s, w, "haproxy_splice", m), get(s, w, "haproxy", m))
                    if r:
                        ax.plot([j - 0.45, j + 0.45], [r, r], ls="--", color="#d62728", lw=1)
        ax.set_ylim(0, top * 1.06)
        ax.set_xticks(range(len(gs)))
        ax.set_xticklabels([g[0] for g in gs], fontsize=9)
        ax.set_ylabel("ratio to HAProxy (same run)")
        ax.set_title("higher is better" if hib else "lower is better", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=9, frameon=False)
    st = doc["meta"]["settings"]
    fig.suptitle(
        f"meshd vs HAProxy 2.6 / nginx stream, {st['threads']} proxy thread(s), "
        f"{st['rounds']}x{st['dur_s']}s medians; HAProxy = 1.0, red dashes = meshd target; "
        f"HAProxy+splice = splice {st.get('haproxy_splice', 'auto')}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# Helper processes


def cmd_sink(args):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conns = set()

    async def handle(reader, writer):
        conns.add(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            conns.discard(writer)
            writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", args.port, backlog=4096)
        async with srv:
            await srv.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit):
        pass


def cmd_idle_client(args):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, failed = [], 0
    for _ in range(args.n):
        s = socket.socket()
        s.settimeout(5)
        try:
            s.connect(("127.0.0.1", args.port))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
            if failed > 100:
                break
    print(f"ready {len(socks)} {failed}", flush=True)
    sys.stdin.read()  # hold until the parent closes our stdin
    for s in socks:
        s.close()


# ---------------------------------------------------------------------------------------
# Profiling: syscalls per connection (strace -c), CPU per connection (perf stat), and where
# the CPU goes (perf record), for each proxy on the same workloads.


def parse_strace_c(path):
    """{syscall: (calls, errors)} from an `strace -c` summary."""
    out = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 5 or not parts[0][0].isdigit() or parts[-1] == "total":
                continue
            try:
                calls = int(parts[3])
            except ValueError:
                continue
            errors = int(parts[4]) if len(parts) == 6 else 0
            out[parts[-1]] = (calls, errors)
    return out


def tids(pids):
    out = []
    for p in pids:
        try:
            out += [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            pass
    return out


class Profiler:
    def __init__(self, bench, outdir, n):
        self.b = bench
        self.outdir = outdir
        self.n = n
        os.makedirs(outdir, exist_ok=True)

    def strace(self, t, tag, load_argv, units):
        path = os.path.join(self.outdir, f"strace-{t.name}-{tag}.txt")
        argv = ["strace", "-c", "-f", "-o", path]
        for tid in tids(t.pids()):
            argv += ["-p", str(tid)]
        st = self.b.procs.start(f"strace-{t.name}", argv)
        time.sleep(1.0)  # attach
        out = subprocess.run(self.b.taskset(self.b.a.load_cpus, load_argv),
                             capture_output=True, text=True, timeout=600)
        time.sleep(0.5)
        self.b.procs.stop(st, sig=signal.SIGINT, wait=10)
        calls = parse_strace_c(path)
        per = {k: round(v[0] / units, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1][0])}
        errs = {k: round(v[1] / units, 3) for k, v in calls.items() if v[1]}
        total = round(sum(v[0] for v in calls.values()) / units, 2)
        log(f"strace {t.name:15s} {tag:9s} {total} syscalls per unit; {list(per.items())[:8]}")
        return {"per_unit": per, "errors_per_unit": errs, "total_per_unit": total,
                "units": units, "load_tail": out.stdout[-600:]}

    def perf(self, t, tag, close):
        pids = t.pids()
        port = PORTS[t.name]["http"]
        dur = self.b.a.dur
        wrk = ["wrk", "-t1", f"-c{self.b.a.wrk_conns}", f"-d{dur}s"]
        if close:
            wrk += ["-H", "Connection: close"]
        wrk.append(f"http://127.0.0.1:{port}/")
        pidlist = ",".join(map(str, pids))
        statf = os.path.join(self.outdir, f"perfstat-{t.name}-{tag}.txt")
        st = self.b.procs.start(
            f"perfstat-{t.name}",
            ["perf", "stat", "-e", "task-clock,context-switches,cpu-migrations,page-faults",
             "-p", pidlist, "-o", statf])
        time.sleep(0.3)
        segs0 = tcp_out_segs()
        out = subprocess.run(self.b.taskset(self.b.a.load_cpus, wrk), capture_output=True,
                             text=True, timeout=dur + 30)
        segs = tcp_out_segs() - segs0
        self.b.procs.stop(st, sig=signal.SIGINT, wait=10)
        w = parse_wrk(out.stdout)
        reqs = w.get("requests") or 1
        stat = {}
        with open(statf) as f:
            for line in f:
                m = re.match(r"\s*([\d,.]+)\s+(?:msec\s+)?([\w-]+)", line)
                if m and m.group(2) in ("task-clock", "context-switches", "cpu-migrations", "page-faults"):
                    stat[m.group(2)] = float(m.group(1).replace(",", ""))
        res = {
            "requests": reqs,
            "rps": w.get("rps"),
            "cpu_us_per_req": round(stat.get("task-clock", 0) * 1000 / reqs, 2),
            "ctx_switches_per_req": round(stat.get("context-switches", 0) / reqs, 3),
            "migrations_per_req": round(stat.get("cpu-migrations", 0) / reqs, 4),
            # Every TCP segment the machine sent, all sockets (loopback: each is also
            # received once): what the wire costs, whichever proxy is in the middle.
            "tcp_segments_per_req": round(segs / reqs, 3),
        }
        # Where the CPU goes (sampled, with call graphs).
        data = os.path.join(self.outdir, f"perf-{t.name}-{tag}.data")
        rec = self.b.procs.start(
            f"perfrec-{t.name}",
            ["perf", "record", "-F", "1999", "-e", "cpu-clock", "-g", "-p", pidlist, "-o", data])
        time.sleep(0.3)
        subprocess.run(self.b.taskset(self.b.a.load_cpus, wrk), capture_output=True, timeout=dur + 30)
        self.b.procs.stop(rec, sig=signal.SIGINT, wait=20)
        rep = subprocess.run(
            ["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso,symbol",
             "-g", "none", "--percent-limit", "0.7"],
            capture_output=True, text=True, timeout=300)
        with open(os.path.join(self.outdir, f"perf-{t.name}-{tag}.txt"), "w") as f:
            f.write(rep.stdout)
        top = []
        for line in rep.stdout.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)(\s{2,}|$)", line)
            if m:
                top.append((float(m.group(1)), m.group(2), m.group(4).strip()[:90]))
        res["top"] = top[:25]
        rep = subprocess.run(
            ["perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "dso", "-g", "none"],
            capture_output=True, text=True, timeout=300)
        dsos = []
        for line in rep.stdout.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(\S+)", line)
            if m:
                dsos.append((float(m.group(1)), m.group(2)))
        res["dso"] = dsos[:8]
        log(f"perf   {t.name:15s} {tag:9s} {res['cpu_us_per_req']} us cpu/req, "
            f"{res['ctx_switches_per_req']} ctx-sw/req")
        return res

    def run(self, names):
        b = self.b
        b.check_ports()
        b.start_backends()
        report = {"n": self.n, "proxies": {}, "syscall_ns": syscall_cost_ns()}
        for name in names:
            t = b.start_proxy(name)
            port = PORTS[name]["http"]
            url = f"http://127.0.0.1:{port}/"
            subprocess.run(["ab", "-q", "-n", "500", "-c", "10", url], capture_output=True, timeout=60)
            r = {}
            # One connection per request: ab speaks HTTP/1.0 without keep-alive.
            r["strace_close"] = self.strace(t, "close", ["ab", "-q", "-n", str(self.n), "-c", "10", url], self.n)
            r["strace_keepalive"] = self.strace(
                t, "keepalive", ["ab", "-q", "-k", "-n", str(self.n * 10), "-c", "10", url], self.n * 10)
            gib = 2
            r["strace_bulk"] = self.strace(
                t, "bulk", ["iperf3", "-c", "127.0.0.1", "-p", str(PORTS[name]["bulk"]), "-n", f"{gib}G"],
                gib * 1024)
            r["perf_close"] = self.perf(t, "close", True)
            r["perf_keepalive"] = self.perf(t, "keepalive", False)
            b.procs.stop(t.proc)
            report["proxies"][name] = r
        return report


def tcp_out_segs():
    """The kernel's TcpOutSegs counter (/proc/net/snmp), all sockets of this namespace."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Tcp:")]
    return int(rows[1][rows[0].index("OutSegs")])


def syscall_cost_ns():
    """What one system call that does nothing costs here (`perf bench syscall basic`:
    getppid in a loop), or None where perf cannot run it."""
    try:
        out = subprocess.run(["perf", "bench", "syscall", "basic"], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"([\d.]+)\s+usecs/op", out.stdout)
    return round(float(m.group(1)) * 1000, 1) if m else None


def profile_text(rep):
    lines = []
    names = list(rep["proxies"])
    if rep.get("syscall_ns") is not None:
        lines.append(f"\none system call that does nothing (perf bench syscall basic): "
                     f"{rep['syscall_ns']} ns")
    for tag, unit in (("close", "connection"), ("keepalive", "request"), ("bulk", "MiB")):
        lines.append(f"\n== syscalls per {unit} ({tag}), strace -c -f on the proxy")
        keys = []
        for n in names:
            for k in list(rep["proxies"][n][f"strace_{tag}"]["per_unit"])[:12]:
                if k not in keys:
                    keys.append(k)
        lines.append(f"{'syscall':22s}" + "".join(f"{LABELS[n]:>16s}" for n in names))
        for k in keys:
            lines.append(f"{k:22s}" + "".join(
                f"{rep['proxies'][n][f'strace_{tag}']['per_unit'].get(k, 0):>16.3f}" for n in names))
        lines.append(f"{'TOTAL':22s}" + "".join(
            f"{rep['proxies'][n][f'strace_{tag}']['total_per_unit']:>16.2f}" for n in names))
        errs = {n: rep["proxies"][n][f"strace_{tag}"]["errors_per_unit"] for n in names}
        lines.append("failed calls per unit: " + "; ".join(f"{LABELS[n]}: {e}" for n, e in errs.items()))
    for tag in ("close", "keepalive"):
        lines.append(f"\n== perf stat on the proxy, wrk {tag}")
        lines.append(f"{'':22s}" + "".join(f"{LABELS[n]:>16s}" for n in names))
        for k in ("rps", "cpu_us_per_req", "ctx_switches_per_req", "migrations_per_req",
                  "tcp_segments_per_req"):
            lines.append(f"{k:22s}" + "".join(
                f"{rep['proxies'][n][f'perf_{tag}'][k] or 0:>16.3f}" for n in names))
        for n in names:
            d = rep["proxies"][n][f"perf_{tag}"].get("dso", [])
            lines.append(f"\n-- {LABELS[n]} ({tag}): CPU by object: " +
                         ", ".join(f"{dso} {pct:.0f}%" for pct, dso in d))
            lines.append(f"-- {LABELS[n]} ({tag}): top symbols (self %)")
            for pct, dso, sym in rep["proxies"][n][f"perf_{tag}"]["top"][:15]:
                lines.append(f"   {pct:5.1f}%  {dso:22s} {sym}")
    return "\n".join(lines)


def cmd_profile(args):
    os.makedirs(args.work, exist_ok=True)
    args.targets = []
    bench = Bench(args)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        rep = Profiler(bench, args.outdir, args.n).run(args.proxies)
    finally:
        bench.procs.stop_all()
    with open(os.path.join(args.outdir, "profile.json"), "w") as f:
        json.dump(rep, f, indent=1)
    text = profile_text(rep)
    with open(os.path.join(args.outdir, "profile.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def cmd_run(args):
    os.makedirs(args.work, exist_ok=True)
    bench = Bench(args)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        doc = bench.run()
    finally:
        bench.procs.stop_all()
    write_outputs(doc, args.out, args.png)
    return 0


def write_outputs(doc, out, png):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    text = table_text(doc)
    txt = os.path.splitext(out)[0] + ".txt"
    with open(txt, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(table_text(doc, markdown=True) + "\n")
    print(text)
    if chart(doc, png):
        print(f"\nchart: {png}")
    print(f"json:  {out}\ntable: {txt}")


def cmd_report(args):
    with open(args.json) as f:
        doc = json.load(f)
    doc["summary"] = summarize(doc["raw"], doc["meta"]["settings"].get("foreign_max_pct", 15.0))
    doc["targets"] = verdicts(doc["summary"])
    if args.markdown:
        print(table_text(doc, markdown=True))
        return 0
    write_outputs(doc, args.json, args.png or os.path.splitext(args.json)[0] + ".png")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--png", required=True)
    r.add_argument("--meshd", required=True)
    r.add_argument("--dur", type=int, default=5)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--proxy-cpus", default="1")
    r.add_argument("--load-cpus", default="0")
    r.add_argument("--backend-cpus", default="0")
    r.add_argument("--backend-workers", type=int, default=1)
    r.add_argument("--wrk-conns", type=int, default=50)
    r.add_argument("--idle-conns", type=int, default=10000)
    r.add_argument("--nofile", type=int, required=True)
    r.add_argument("--quiet-wait", type=float, default=60.0)
    r.add_argument("--quiet-pct", type=float, default=10.0)
    r.add_argument("--foreign-max", type=float, default=15.0)
    r.add_argument("--haproxy-splice", choices=["forced", "auto"], default="forced")
    r.add_argument("--retries", type=int, default=3)
    r.add_argument("--targets", default=",".join(TARGETS))
    r.add_argument("--workloads", default=",".join(WORKLOADS))
    pr = sub.add_parser("profile")
    pr.add_argument("--work", required=True)
    pr.add_argument("--outdir", required=True)
    pr.add_argument("--meshd", required=True)
    pr.add_argument("--n", type=int, default=5000, help="connections for the strace counts")
    pr.add_argument("--dur", type=int, default=5)
    pr.add_argument("--threads", type=int, default=1)
    pr.add_argument("--proxy-cpus", default="1")
    pr.add_argument("--load-cpus", default="0")
    pr.add_argument("--backend-cpus", default="0")
    pr.add_argument("--backend-workers", type=int, default=1)
    pr.add_argument("--wrk-conns", type=int, default=50)
    pr.add_argument("--idle-conns", type=int, default=100)
    pr.add_argument("--nofile", type=int, required=True)
    pr.add_argument("--proxies", default="meshd,haproxy,haproxy_splice,nginx")
    pr.add_argument("--haproxy-splice", choices=["forced", "auto"], default="forced")
    s = sub.add_parser("sink")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("idle-client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--n", type=int, required=True)
    p = sub.add_parser("report")
    p.add_argument("json")
    p.add_argument("--png")
    p.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.cmd == "run":
        args.targets = [t for t in args.targets.split(",") if t]
        args.workloads = [w for w in args.workloads.split(",") if w]
        for t in args.targets:
            if t not in TARGETS:
                ap.error(f"unknown target {t}; known: {TARGETS}")
        for w in args.workloads:
            if w not in WORKLOADS:
                ap.error(f"unknown workload {w}; known: {WORKLOADS}")
        sys.exit(cmd_run(args))
    if args.cmd == "profile":
        args.proxies = [t for t in args.proxies.split(",") if t]
        sys.exit(cmd_profile(args))
    if args.cmd == "sink":
        cmd_sink(args)
    elif args.cmd == "idle-client":
        cmd_idle_client(args)
    elif args.cmd == "report":
        sys.exit(cmd_report(args))


if __name__ == "__main__":
    main()
