#!/usr/bin/env python3
"""Can the admin port be starved? Idle and slowloris connections from one source address,
while /readyz is asked from another, on loopback only.

    benches/admin-flood.py [--meshd PATH] [--conns 1000] [--duration 30] [--quiet 5]

Starts `meshd` (default: target/release/meshd) with a config holding only an [admin]
listen address on a free loopback port, then:

  1. QUIET seconds: /readyz from 127.0.0.1 every 20 ms (the baseline);
  2. DURATION seconds: the same, while a second process holds CONNS connections from
     127.0.0.2 to the admin port: half send nothing, half send a request line and then one
     header line every 500 ms and never finish the head (slowloris). Each connection is
     opened again as soon as it is closed or reset (after 50 ms if it lasted under 100 ms).

Each /readyz is one connection (connect, GET, read to EOF) with a 5 s timeout. Prints, per
phase, how many were asked, how many failed (no 200), and p50/p99/max latency in ms; for the
attack, how many connects it made, how many completed (a connection refused by a limit is
reset before the client's connect returns), how many meshd closed later, and meshd's RSS
and open descriptors at the end. Exit status 1 if any /readyz failed or took >= 100 ms
under attack. Needs 127.0.0.2 on lo (Linux routes 127.0.0.0/8 there).
"""

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time

ATTACKER = "127.0.0.2"
PROBE = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((PROBE, 0))
        return s.getsockname()[1]


def readyz(port):
    t = time.monotonic()
    try:
        with socket.create_connection((PROBE, port), timeout=5, source_address=(PROBE, 0)) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        ok = data.startswith(b"HTTP/1.1 200")
    except OSError:
        ok = False
    return ok, (time.monotonic() - t) * 1000.0


def probe(port, seconds):
    lat, failed = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ok, ms = readyz(port)
        lat.append(ms)
        failed += not ok
        time.sleep(0.02)
    return lat, failed


async def one(port, slow, stop_at, stats):
    while time.monotonic() < stop_at:
        t = time.monotonic()
        stats["attempts"] += 1
        try:
            r, w = await asyncio.open_connection(PROBE, port, local_addr=(ATTACKER, 0))
        except OSError:  # reset before the connect completed here: refused at once
            await asyncio.sleep(0.05)
            continue
        stats["opened"] += 1
        try:
            if slow:
                w.write(b"GET /readyz HTTP/1.1\r\n")
                while time.monotonic() < stop_at:
                    await asyncio.sleep(0.5)
                    w.write(b"X-Slow: 1\r\n")
                    await w.drain()
            else:
                while time.monotonic() < stop_at:
                    if not await asyncio.wait_for(r.read(1), timeout=max(0.01, stop_at - time.monotonic())):
                        break
        except (OSError, asyncio.TimeoutError):
            pass
        if time.monotonic() < stop_at:
            stats["closed"] += 1
        w.transport.abort()
        if time.monotonic() - t < 0.1:
            await asyncio.sleep(0.05)


def attack(port, conns, seconds, out):
    async def main():
        stats = {"attempts": 0, "opened": 0, "closed": 0}
        stop_at = time.monotonic() + seconds
        await asyncio.gather(*(one(port, i % 2 == 1, stop_at, stats) for i in range(conns)))
        return stats

    out.put(asyncio.run(main()))


def summary(name, lat, failed):
    lat = sorted(lat)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(
        f"{name:<8} asked {len(lat):5d}  failed {failed:4d}  "
        f"p50 {pick(0.5):7.2f} ms  p99 {pick(0.99):7.2f} ms  max {lat[-1]:7.2f} ms"
    )
    return lat[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshd", default="target/release/meshd")
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--quiet", type=float, default=5)
    a = ap.parse_args()
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass

    port = free_port()
    d = tempfile.mkdtemp(prefix="admin-flood-")
    cfg = os.path.join(d, "mesh.toml")
    with open(cfg, "w") as f:
        f.write(f'[admin]\nlisten = "{PROBE}:{port}"\n')
    log = open(os.path.join(d, "meshd.log"), "w")
    m = subprocess.Popen([a.meshd, "--config", cfg], stdout=subprocess.DEVNULL, stderr=log,
                         env=dict(os.environ, RUST_LOG="warn"))
    try:
        end = time.monotonic() + 15
        while not readyz(port)[0]:
            if time.monotonic() > end or m.poll() is not None:
                sys.exit("meshd did not become ready")
            time.sleep(0.05)
        print(f"meshd {a.meshd} pid {m.pid}, admin {PROBE}:{port}; attack {a.conns} connections "
              f"(half silent, half slowloris) from {ATTACKER} for {a.duration:.0f} s")
        summary("quiet", *probe(port, a.quiet))
        q = mp.Queue()
        p = mp.Process(target=attack, args=(port, a.conns, a.duration, q))
        p.start()
        time.sleep(1)  # let the attack open its connections
        worst = summary("attack", *(lat_failed := probe(port, a.duration - 1.5)))
        stats = q.get(timeout=a.duration + 30)
        p.join()
        rss = fds = "?"
        try:
            with open(f"/proc/{m.pid}/status") as f:
                rss = next(l.split()[1] for l in f if l.startswith("VmRSS")) + " kB"
            fds = len(os.listdir(f"/proc/{m.pid}/fd"))
        except OSError:
            pass
        print(f"attack   {stats['attempts']} connects, {stats['opened']} completed (the rest reset at "
              f"once), {stats['closed']} closed by meshd later; "
              f"meshd RSS {rss}, fds {fds}")
        bad = lat_failed[1] > 0 or worst >= 100
        print("verdict  " + ("FAIL: /readyz failed or took >= 100 ms" if bad else
                             "ok: every /readyz answered within 100 ms"))
        sys.exit(1 if bad else 0)
    finally:
        m.terminate()
        try:
            m.wait(timeout=10)
        except subprocess.TimeoutExpired:
            m.kill()
        log.close()


if __name__ == "__main__":
    main()
