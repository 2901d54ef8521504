"""Core figures, measured in one run against the real qemu-ga on this host:

  (1) sequential guest-ping round trip: direct vs through the proxy;
  (2) aggregate requests/s: 16 clients through the proxy vs one client
      pipelining directly.

The proxy runs as its own process (``python -m qgaproxy serve``); clients
are separate processes with blocking sockets, so no client shares the
proxy's interpreter. Usage: python bench/core_figures.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from realagent import RealAgent  # noqa: E402

PING = b'{"execute":"guest-ping"}\n'


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def sync(s: socket.socket) -> None:
    s.sendall(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":4242}}\n')
    buf = b""
    while b'{"return": 4242}\n' not in buf:
        buf += s.recv(65536)


def sequential(path: str, n: int) -> list[float]:
    s = connect(path)
    sync(s)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(PING)
        buf = b""
        while not buf.endswith(b"\n"):
            buf += s.recv(4096)
        times.append(time.perf_counter() - t)
    s.close()
    return times


def pipelining(path: str, seconds: float, depth: int = 32) -> float:
    s = connect(path)
    sync(s)
    s.sendall(PING * depth)
    done = 0
    buf = b""
    start = time.perf_counter()
    end = start + seconds
    while True:
        buf += s.recv(1 << 16)
        lines = buf.count(b"\n")
        if lines:
            buf = buf[buf.rfind(b"\n") + 1 :]
            done += lines
            if time.perf_counter() < end:
                s.sendall(PING * lines)
            else:
                depth -= lines
                if depth <= 0:
                    break
    elapsed = time.perf_counter() - start
    s.close()
    return done / elapsed


def _client_worker(path: str, seconds: float, barrier, results) -> None:
    s = connect(path)
    barrier.wait()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s.sendall(PING)
        buf = b""
        while not buf.endswith(b"\n"):
            buf += s.recv(4096)
        n += 1
    s.close()
    results.put(n)


def many_clients(path: str, clients: int, seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_client_worker, args=(path, seconds, barrier, results)) for _ in range(clients)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    total = sum(results.get() for _ in procs)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    return total / elapsed


def start_proxy(upstream: str, listen: str, window: int | None = None) -> subprocess.Popen:
    extra = ["--window", str(window)] if window else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgaproxy", "serve", "--upstream", upstream, "--listen", listen, "--log-level", "warning"]
        + extra,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            s = connect(listen)
            s.sendall(PING)
            if s.recv(4096).startswith(b'{"return"'):
                s.close()
                return proc
            s.close()
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("proxy did not become ready: " + proc.stderr.read().decode())


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {
        "p50_us": round(statistics.median(times) * 1e6, 1),
        "p99_us": round(times[int(len(times) * 0.99)] * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--pings", type=int, default=3000)
    parser.add_argument("--window", type=int, default=None)
    args = parser.parse_args()
    results = {"machine": "%s, %d cores, Python %s" % (platform.machine(), os.cpu_count(), platform.python_version())}
    with RealAgent(verbose=False) as agent:
        results["direct_sequential"] = summary(sequential(agent.path, args.pings))
        results["direct_pipelining_rps"] = round(pipelining(agent.path, args.seconds))
        tmp = tempfile.mkdtemp()
        listen = os.path.join(tmp, "proxy.sock")
        proxy = start_proxy("unix:" + str(agent.path), listen, args.window)
        try:
            results["proxy_sequential"] = summary(sequential(listen, args.pings))
            results["proxy_16_clients_rps"] = round(many_clients(listen, 16, args.seconds))
            results["proxy_1_client_pipelining_rps"] = round(pipelining(listen, args.seconds))
        finally:
            proxy.terminate()
            proxy.wait(10)
    results["ratio_sequential_p50"] = round(results["proxy_sequential"]["p50_us"] / results["direct_sequential"]["p50_us"], 2)
    results["ratio_16_clients_vs_direct_pipelining"] = round(
        results["proxy_16_clients_rps"] / results["direct_pipelining_rps"], 2
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
