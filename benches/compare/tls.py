#!/usr/bin/env python3
"""Helper of benches/compare/tls.sh (TLS termination and passthrough, issue #16).

  tls.py hs HOST PORT DUR PROCS        full TLS handshakes, one connection per request:
                                       PROCS processes, each connect -> handshake (no
                                       session reuse) -> GET / (Connection: close) -> EOF;
                                       prints JSON {rps, requests, errors, p50_ms, p99_ms}
  tls.py resume HOST PORT              whether a second connection resumes the first's session
  tls.py cipher HOST PORT              the negotiated version and cipher of a default client
  tls.py measure OUT.jsonl ROUND WORKLOAD TARGET PID -- ARGV...
                                       runs ARGV (wrk or `tls.py hs`) and appends one result:
                                       its figures, the proxy's CPU (utime+stime of PID and
                                       its threads) over the run, per-core busy, load average
  tls.py quiet PCT SECS                 wait up to SECS for the machine to be quiet (< PCT %)
  tls.py summary OUT.jsonl             medians per workload and target, ratios, markdown
"""
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def client_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def hs_worker(host, port, deadline, q):
    ctx = client_ctx()
    lat, errs = [], 0
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    while time.time() < deadline:
        t0 = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=5) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with ctx.wrap_socket(raw, server_hostname="bench.test") as s:
                    s.sendall(req)
                    got = b""
                    while True:
                        b = s.recv(4096)
                        if not b:
                            break
                        got += b
            if not got.startswith(b"HTTP/1.1 200"):
                errs += 1
                continue
        except (OSError, ssl.SSLError):
            errs += 1
            continue
        lat.append(time.perf_counter() - t0)
    q.put((lat, errs))


def cmd_hs(host, port, dur, procs):
    q = mp.Queue()
    deadline = time.time() + float(dur)
    ps = [mp.Process(target=hs_worker, args=(host, int(port), deadline, q)) for _ in range(int(procs))]
    t0 = time.time()
    for p in ps:
        p.start()
    lat, errs = [], 0
    for _ in ps:
        l, e = q.get(timeout=float(dur) + 30)
        lat += l
        errs += e
    for p in ps:
        p.join()
    wall = time.time() - t0
    lat.sort()
    pct = lambda x: round(1000 * lat[min(len(lat) - 1, int(x * len(lat)))], 3) if lat else None
    print(json.dumps({"rps": round(len(lat) / wall, 1), "requests": len(lat), "errors": errs,
                      "p50_ms": pct(0.50), "p99_ms": pct(0.99)}))


def cmd_resume(host, port):
    ctx = client_ctx()
    sess = None
    out = []
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="bench.test", session=sess) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(4096):
                    pass
                out.append(s.session_reused)
                sess = s.session
    print(json.dumps({"reused": out}))


def cmd_cipher(host, port):
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with client_ctx().wrap_socket(raw, server_hostname="bench.test") as s:
            print(json.dumps({"version": s.version(), "cipher": s.cipher()[0]}))


def proc_ticks(pid):
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    except OSError:
        pass
    return total


def core_times():
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if re.match(r"cpu\d+ ", line):
                v = list(map(int, line.split()[1:]))
                out[line.split()[0]] = (sum(v), v[3] + v[4])
    return out


def parse_wrk(text):
    def ms(v, unit):
        return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    res = {"rps": None, "errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", text)
    if m:
        res["requests"] = int(m.group(1))
        secs = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
        mult = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}[m.group(5)]
        res["MBps"] = round(float(m.group(4)) * mult / secs / 1e6, 1)
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        if m:
            res[f"p{p}_ms"] = round(ms(m.group(1), m.group(2)), 3)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        res["errors"] = sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        res["errors"] += int(m.group(1))
    return res


def cmd_measure(out, rnd, workload, target, pid, argv, timeout_s=600):
    pid = int(pid)
    c0, k0, w0 = proc_ticks(pid), core_times(), time.time()
    # The load in its own process group: a signal to this helper (tls.sh's trap) or a
    # timeout stops the client and every process it started.
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)

    def stop(*_):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        sys.exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        stdout, stderr = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop()
    p.stdout, p.stderr = stdout, stderr
    c1, k1, w1 = proc_ticks(pid), core_times(), time.time()
    if argv[0] == "wrk" or "wrk" in argv:
        res = parse_wrk(p.stdout)
    else:
        try:
            res = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            res = {"rps": None}
    if p.returncode != 0 or not res.get("rps"):
        sys.stderr.write(f"measurement failed: {argv}\n{p.stdout}\n{p.stderr}\n")
        res["failed"] = True
    wall = w1 - w0
    cpu_s = (c1 - c0) / CLK_TCK
    res["proxy_cpu_pct"] = round(100 * cpu_s / wall, 1)
    if res.get("rps"):
        res["proxy_us_per_req"] = round(cpu_s * 1e6 / (res["rps"] * wall), 1)
    if res.get("MBps"):
        # MB moved per CPU-second of the proxy: its throughput were it the bottleneck.
        res["MB_per_cpu_s"] = round(res["MBps"] * wall / cpu_s, 1) if cpu_s else None
    res["busy"] = {c: round(100 * (1 - (k1[c][1] - k0[c][1]) / max(1, k1[c][0] - k0[c][0])), 1)
                   for c in k1 if c in k0}
    res["loadavg"] = open("/proc/loadavg").read().split()[:3]
    res.update(round=int(rnd), workload=workload, target=target, time=time.strftime("%H:%M:%S", time.gmtime()))
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    brief = {k: res.get(k) for k in ("rps", "MBps", "p99_ms", "errors", "proxy_cpu_pct",
                                     "proxy_us_per_req", "MB_per_cpu_s")}
    print(f"[tls] round {rnd} {workload:14} {target:13} {json.dumps(brief)} busy {res['busy']}",
          file=sys.stderr)


# (workload, metric columns, ratio pairs (num, den))
LAYOUT = [
    ("hs_full", ["rps", "p99_ms", "proxy_us_per_req", "proxy_cpu_pct"], [("meshd_term", "haproxy")]),
    ("hs_wrk", ["rps", "p99_ms", "proxy_us_per_req", "proxy_cpu_pct"], [("meshd_term", "haproxy")]),
    ("bulk_term", ["MBps", "MB_per_cpu_s", "proxy_cpu_pct"], [("meshd_term", "haproxy")]),
    ("bulk_pt", ["MBps", "MB_per_cpu_s", "proxy_cpu_pct"],
     [("meshd_pt", "meshd_plain"), ("meshd_pt", "direct_tls"), ("meshd_plain", "direct_plain")]),
]


def cmd_summary(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    med = {}
    for r in rows:
        if r.get("failed"):
            continue
        med.setdefault((r["workload"], r["target"]), []).append(r)
    out = ["| workload | target | rounds | " + " | ".join(
        ["req/s or MB/s", "p99 ms", "proxy µs/req", "proxy MB/CPU-s", "proxy CPU %"]) + " |",
           "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for w, cols, pairs in LAYOUT:
        targets = sorted({t for (ww, t) in med if ww == w}, key=lambda t: (t != "meshd_term", t))
        def m(t, k):
            vals = [r[k] for r in med.get((w, t), []) if r.get(k) is not None]
            return statistics.median(vals) if vals else None
        for t in targets:
            main = m(t, "MBps") if w.startswith("bulk") else m(t, "rps")
            f = lambda v: "–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:g}")
            out.append(f"| {w} | {t} | {len(med[(w, t)])} | {f(main)} | {f(m(t, 'p99_ms'))} | "
                       f"{f(m(t, 'proxy_us_per_req')) if not w.startswith('bulk') else '–'} | "
                       f"{f(m(t, 'MB_per_cpu_s'))} | {f(m(t, 'proxy_cpu_pct'))} |")
        for a, b in pairs:
            k = "MBps" if w.startswith("bulk") else "rps"
            va, vb = m(a, k), m(b, k)
            if va and vb:
                s = f"{w}: {a}/{b} = {va / vb:.2f} ({k})"
                if not w.startswith("bulk"):
                    ua, ub = m(a, "proxy_us_per_req"), m(b, "proxy_us_per_req")
                    if ua and ub:
                        s += f"; per-core handshakes/s (1e6/µs per req) {a}/{b} = {ub / ua:.2f}"
                else:
                    ua, ub = m(a, "MB_per_cpu_s"), m(b, "MB_per_cpu_s")
                    if ua and ub:
                        s += f"; MB per proxy CPU-second {a}/{b} = {ua / ub:.2f}"
                ratios.append(s)
    print("\n".join(out))
    print()
    for s in ratios:
        print("- " + s)
    loads = [r["loadavg"][0] for r in rows]
    print(f"\nload average (1 min) during measurements: {min(loads)}–{max(loads)}")


def cmd_quiet(limit_pct, max_wait):
    """Waits up to max_wait s for all cores together to be busy < limit_pct % of one core."""
    end = time.time() + float(max_wait)
    while True:
        k0 = core_times()
        time.sleep(1)
        k1 = core_times()
        busy = sum((k1[c][0] - k0[c][0]) - (k1[c][1] - k0[c][1]) for c in k1) / CLK_TCK * 100
        if busy < float(limit_pct) or time.time() >= end:
            if busy >= float(limit_pct):
                print(f"[tls] machine not quiet: {busy:.0f} % of a core busy", file=sys.stderr)
            return


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "hs":
        cmd_hs(*a[1:5])
    elif a[0] == "resume":
        cmd_resume(*a[1:3])
    elif a[0] == "cipher":
        cmd_cipher(*a[1:3])
    elif a[0] == "measure":
        i = a.index("--")
        cmd_measure(*a[1:6], a[i + 1:], float(os.environ.get("MEASURE_TIMEOUT", "600")))
    elif a[0] == "quiet":
        cmd_quiet(*a[1:3])
    elif a[0] == "summary":
        cmd_summary(a[1])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
