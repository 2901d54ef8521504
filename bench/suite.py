"""qgaproxy's benchmark suite, measured side by side in one run.

Against the real qemu-ga on this host, the simulated agent with a fixed
per-request latency, and (when it can boot here) the real agent in a QEMU
VM, it measures:

  (a) sequential guest-ping round trips: direct, through a zero-logic byte
      relay (bench/relay.py: the floor under any user-space proxy), and
      through the proxy; p50 and p99;
  (b) requests per second with 1, 4, 16 and 64 clients through the proxy,
      against one client pipelining directly;
  (c) the ways people share an agent today, with 16 clients: Proxmox-style
      (a new connection, guest-sync-delimited and the command in one write,
      close; serialized by a lock) and libvirt-style (one shared connection,
      guest-sync then the command, one at a time), against the proxy;
  (d) a 48 MiB guest-file-read reply (simulated agent): direct and through
      the proxy, with the proxy's peak RSS;
  (e) the proxy's RSS with 1,000 and 10,000 idle clients;
  (f) the time from a request's timeout to the next successful reply, with
      a healthy agent (the simulated one, which drops one reply on demand).

Round trips (a) are pooled over five rounds that alternate direct, relay
and proxy; rates (b) and (c) are each the median of three rounds that take
every rate in turn.

Every process is separate: the proxy (`python -m qgaproxy serve`), the
relay, the agents and every client (forked workers with blocking sockets),
so no client shares an interpreter with what it measures.

    python bench/suite.py                 # the full run (a few minutes)
    python bench/suite.py --quick --out DIR   # a smoke run (what CI runs)
    python bench/suite.py --repeat 3      # three full runs: each target's range too
    python bench/suite.py --render        # the table and plot again from results.json

Writes results.json, results.md and results.png to --out (default
bench/results) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "vm"))

from proxyutil import rss, stop_process  # noqa: E402
from realagent import RealAgent  # noqa: E402

PING = b'{"execute":"guest-ping"}\n'
PONG = b'{"return": {}}\n'
BIG = 48 << 20  # qemu-ga's largest guest-file-read count
SIM_LATENCY = 0.001  # the simulated agent's fixed time per request, seconds
VM_WORK_US = 100  # Python work before each request for (a) VM's reference (see Run.vm)
CTX = multiprocessing.get_context("fork")


# -- plain blocking clients ------------------------------------------------------------

def connect(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    deadline = time.monotonic() + 30
    while True:
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:  # the listen backlog is full: the server is accepting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def read_line(s: socket.socket, buf: bytearray) -> bytes:
    while True:
        nl = buf.find(b"\n")
        if nl >= 0:
            line = bytes(buf[: nl + 1])
            del buf[: nl + 1]
            return line
        data = s.recv(1 << 20)
        if not data:
            raise EOFError("connection closed")
        buf += data


def sync(s: socket.socket, buf: bytearray) -> None:
    """0xFF + guest-sync-delimited; skip everything up to its reply."""
    ident = random.randrange(1 << 40)
    s.sendall(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":%d}}\n' % ident)
    want = b'{"return": %d}' % ident
    while True:
        line = read_line(s, buf).lstrip(b"\xff")
        if line.startswith(want):
            return


def sequential(path, n: int, work_us: float = 0.0) -> list[float]:
    """n guest-ping round trips, one at a time; work_us: Python work the
    client does before each (not timed), as a proxy does before it writes."""
    s = connect(path)
    buf = bytearray()
    sync(s, buf)
    for _ in range(min(200, n)):  # warm-up
        s.sendall(PING)
        read_line(s, buf)
    times = []
    for _ in range(n):
        if work_us:
            python_work(work_us)
        times.append(timed_ping(s, buf))
    s.close()
    return times


_WORK_DATA = list(range(200_000))


def python_work(us: float) -> None:
    """`us` microseconds of Python that moves memory through the caches
    (slices of a 1.6 MB list), like an interpreter handling a message."""
    end = time.perf_counter() + us / 1e6
    i = 0
    while time.perf_counter() < end:
        sum(_WORK_DATA[i : i + 2000])
        i = (i + 2000) % (len(_WORK_DATA) - 2000)


def timed_ping(s: socket.socket, buf: bytearray) -> float:
    """One guest-ping round trip, seconds."""
    t = time.perf_counter()
    s.sendall(PING)
    line = read_line(s, buf)
    elapsed = time.perf_counter() - t
    assert line == PONG, line
    return elapsed


def pipelining(path, seconds: float, depth: int = 32) -> float:
    """One client keeping `depth` pings in flight: the agent's own ceiling."""
    s = connect(path)
    buf = bytearray()
    sync(s, buf)
    s.sendall(PING * depth)
    done = 0
    pending = b""
    start = time.perf_counter()
    end = start + seconds
    while depth:
        pending += s.recv(1 << 16)
        lines = pending.count(b"\n")
        if lines:
            pending = pending[pending.rfind(b"\n") + 1 :]
            done += lines
            if time.perf_counter() < end:
                s.sendall(PING * lines)
            else:
                depth -= lines
    elapsed = time.perf_counter() - start
    s.close()
    return done / elapsed


def _run_workers(target, args, clients: int, seconds: float) -> float:
    """Start `clients` forked workers, release them together, sum their counts."""
    barrier = CTX.Barrier(clients + 1)
    results = CTX.Queue()
    procs = [CTX.Process(target=target, args=(barrier, results, seconds) + args) for _ in range(clients)]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)
    start = time.perf_counter()
    total = 0
    for _ in procs:
        total += results.get(timeout=seconds + 60)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(10)
    return total / elapsed


def _proxy_worker(barrier, results, seconds, path) -> None:
    s = connect(path)
    buf = bytearray()
    barrier.wait()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        s.sendall(PING)
        read_line(s, buf)
        n += 1
    s.close()
    results.put(n)


def through_proxy(path, clients: int, seconds: float) -> float:
    """`clients` processes, each with its own connection, one request at a time."""
    return _run_workers(_proxy_worker, (str(path),), clients, seconds)


def _proxmox_worker(barrier, results, seconds, path, lock) -> None:
    barrier.wait()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        with lock:  # Proxmox serializes agent commands per VM
            s = connect(path)
            ident = random.randrange(1 << 40)
            s.sendall(b'{"execute":"guest-sync-delimited","arguments":{"id":%d}}\n' % ident + PING)
            data = b""
            while True:  # everything up to the last 0xFF goes; then two lines
                data += s.recv(65536)
                tail = data[data.rfind(b"\xff") + 1 :]
                if tail.count(b"\n") >= 2:
                    break
            s.close()
        n += 1
    results.put(n)


def proxmox_style(path, clients: int, seconds: float) -> float:
    return _run_workers(_proxmox_worker, (str(path), CTX.Lock()), clients, seconds)


def _libvirt_worker(barrier, results, seconds, sock, lock, shared) -> None:
    barrier.wait()
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        with lock:  # libvirt's per-domain agent lock: one command at a time
            buf = shared
            ident = int(time.time() * 1000) * 1000 + random.randrange(1000)
            sock.sendall(b'{"execute":"guest-sync","arguments":{"id":%d}}\n' % ident)
            want = b'{"return": %d}' % ident
            while not read_line(sock, buf).startswith(want):
                pass  # libvirt ignores syncs with the wrong id
            sock.sendall(PING)
            read_line(sock, buf)
        n += 1
    results.put(n)


def libvirt_style(path, clients: int, seconds: float) -> float:
    sock = connect(path)
    buf = bytearray()
    sync(sock, buf)
    try:
        # One connection shared by every worker (forked), as libvirtd shares
        # its one agent connection among all its callers.
        return _run_workers(_libvirt_worker, (sock, CTX.Lock(), buf), clients, seconds)
    finally:
        sock.close()


def big_read(path, guest_path: str) -> tuple[float, int]:
    """guest-file-open/read(48 MiB)/close; returns (seconds of the read, bytes)."""
    s = connect(path)
    buf = bytearray()
    sync(s, buf)
    s.sendall(b'{"execute":"guest-file-open","arguments":{"path":"%s","mode":"r"}}\n' % guest_path.encode())
    handle = json.loads(read_line(s, buf))["return"]
    t = time.perf_counter()
    s.sendall(b'{"execute":"guest-file-read","arguments":{"handle":%d,"count":%d}}\n' % (handle, BIG))
    line = read_line(s, buf)
    elapsed = time.perf_counter() - t
    s.sendall(b'{"execute":"guest-file-close","arguments":{"handle":%d}}\n' % handle)
    read_line(s, buf)
    s.close()
    assert line.startswith(b'{"return": {"count": %d' % BIG), line[:80]
    return elapsed, len(line)


def timeout_recovery(path, rounds: int) -> list[float]:
    """The simulated agent drops guest-get-time's reply: the proxy times the
    request out and resyncs. Seconds from that timeout error reaching the
    client to the reply of a guest-ping sent at once after it."""
    s = connect(path)
    buf = bytearray()
    out = []
    for _ in range(rounds):
        s.sendall(b'{"execute":"guest-get-time"}\n')
        line = read_line(s, buf)
        assert b"timed out" in line, line
        out.append(timed_ping(s, buf))
    s.close()
    return out


# -- processes ---------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def router_core_us(n: int) -> float:
    """The proxy's own work on one guest-ping, without any I/O: a request
    parsed, checked, its id rewritten and written for the agent, the reply
    matched and rewritten for its client (the router and codecs, as in
    tests/test_router.py's harness), µs per round trip, best of three."""
    from test_router import Harness

    h = Harness()
    h.connect()
    router = h.router
    client = router.add_client()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            router.client_data(client, PING, 0.0)
            data = router.take_upstream_write(0.0)
            router.upstream_write_done(0.0)
            ident = data[data.rindex(b":") + 1 : data.rindex(b"}")].strip()
            router.upstream_data(b'{"return": {}, "id": %s}\n' % ident, 0.0)
            assert router.take_output(client) == PONG
            router.pop_dirty()
            router.next_deadline()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return round(best, 1)


def median_of(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds (nested dicts key by key)."""
    out = {}
    for key, first in rounds[0].items():
        values = [r[key] for r in rounds]
        if isinstance(first, dict):
            out[key] = median_of(values)
        else:
            middle = statistics.median(values)
            out[key] = round(middle) if isinstance(first, int) else round(middle, 1)
    return out


def children_cpu() -> float:
    """User + system CPU time of this process's finished children (the
    forked client workers, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def cpu_per_request(out: dict, key: str, *, clients: bool = True, **pids: int):
    """Measures what the block's requests cost in CPU: each named process,
    and (clients=True) the client workers the block forks and joins. The
    block sets out[key + "_rps"] to its rate; this adds out[key + "_cpu_us"]:
    µs of CPU per request for each name and "clients"."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before_clients, start = children_cpu(), time.perf_counter()
    yield
    elapsed = time.perf_counter() - start
    requests = out[key + "_rps"] * elapsed
    used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    if clients:
        used["clients"] = children_cpu() - before_clients
    out[key + "_cpu_us"] = {name: round(seconds / requests * 1e6, 1) for name, seconds in used.items()}


def cpu_times() -> list[int]:
    """The machine's CPU time so far by kind (/proc/stat: user, nice,
    system, idle, iowait, irq, softirq, steal), in ticks."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def stolen_pct(before: list[int], after: list[int]) -> float:
    """Of the CPU time between two cpu_times(), the share the hypervisor
    gave to others while this machine's CPUs had work (steal)."""
    spent = [b - a for a, b in zip(before, after)]
    return round(100 * spent[7] / max(1, sum(spent)), 1)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(0.02)


def _answers(path) -> bool:
    try:
        s = connect(path)
        s.settimeout(2)
        buf = bytearray()
        sync(s, buf)
        s.close()
        return True
    except (OSError, EOFError):
        return False


@contextlib.contextmanager
def process(argv, ready_path, what: str):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is None and os.path.exists(ready_path) and _answers(ready_path), 30, what)
        yield proc
    except RuntimeError:
        proc.kill()
        raise RuntimeError("%s did not start: %s" % (what, proc.stderr.read().decode()[-2000:]))
    finally:
        stop_process(proc, 10)


def proxy(upstream_path, tmp: Path, *extra: str):
    listen = tmp / ("proxy-%d.sock" % random.randrange(1 << 30))
    argv = [sys.executable, "-m", "qgaproxy", "serve", "--upstream", "unix:%s" % upstream_path,
            "--listen", str(listen), "--log-level", "warning", *extra]
    return process(argv, listen, "the proxy"), listen


def relay(upstream_path, tmp: Path):
    listen = tmp / ("relay-%d.sock" % random.randrange(1 << 30))
    argv = [sys.executable, str(ROOT / "bench" / "relay.py"), str(upstream_path), str(listen)]
    return process(argv, listen, "the relay"), listen


def floor(tmp: Path, *extra: str):
    listen = tmp / ("floor-%d.sock" % random.randrange(1 << 30))
    argv = [sys.executable, str(ROOT / "bench" / "floor.py"), str(listen), *extra]
    return process(argv, listen, "the floor server"), listen


def sim(tmp: Path, *extra: str):
    listen = tmp / ("sim-%d.sock" % random.randrange(1 << 30))
    argv = [sys.executable, "-m", "qgaproxy.sim", "--listen", str(listen), *extra]
    return process(argv, listen, "the simulated agent"), listen


# -- the run -------------------------------------------------------------------------------

def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {
        "p50_us": round(statistics.median(times) * 1e6, 1),
        "p99_us": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6, 1),
        "n": len(times),
    }


def wakeup_round_trip_us(n: int = 2000) -> float:
    """A byte to a forked process and back through pipes, median µs: what
    two wake-ups cost on this machine now (each reply the proxy writes
    wakes the client that waits for it)."""
    ping_r, ping_w = os.pipe()
    pong_r, pong_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            while os.read(ping_r, 1) == b"x":
                os.write(pong_w, b"x")
        finally:
            os._exit(0)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        os.write(ping_w, b"x")
        os.read(pong_r, 1)
        times.append(time.perf_counter() - t)
    os.write(ping_w, b"q")
    os.waitpid(pid, 0)
    for fd in (ping_r, ping_w, pong_r, pong_w):
        os.close(fd)
    return round(statistics.median(times) * 1e6, 1)


def python_loop_us() -> float:
    """A fixed piece of pure Python, best of five, µs: how fast the
    interpreter runs on this machine now."""
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        total = 0
        for i in range(100_000):
            total += i & 7
        best = min(best, time.perf_counter() - t)
    return round(best * 1e6)


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    qga = subprocess.run(["/usr/sbin/qemu-ga", "-V"], capture_output=True, text=True).stdout.strip()
    import trio

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "qemu_ga": qga.split("\n")[0],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "wakeup_round_trip_us": wakeup_round_trip_us(),
        "python_loop_us": python_loop_us(),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class Run:
    def __init__(self, quick: bool, vm: bool):
        self.quick = quick
        self.want_vm = vm
        self.pings = 300 if quick else 5000
        self.seconds = 0.3 if quick else 2.0
        self.tmp = Path(tempfile.mkdtemp(prefix="qgaproxy-bench-"))
        self.r: dict = {"machine": machine(), "quick": quick}

    def log(self, *args) -> None:
        print(*args, file=sys.stderr, flush=True)

    def sequential_side_by_side(self, agent_path, pings: int, rounds: int, work_us: float = 0.0) -> dict:
        """(a): direct, relay and proxy in turn, `rounds` times (the agent
        serves one connection at a time, so each runs alone), all samples
        of a kind pooled: slow drifts of the machine hit all three alike.
        work_us: also direct with that much Python work by the client before
        each request ("direct_after_work"; the work itself is not timed)."""
        samples: dict[str, list[float]] = {"direct": [], "relay": [], "proxy": []}
        if work_us:
            samples["direct_after_work"] = []
        per = max(50, pings // rounds)
        for _ in range(rounds):
            samples["direct"] += sequential(agent_path, per)
            if work_us:
                samples["direct_after_work"] += sequential(agent_path, per, work_us)
            ctx, listen = relay(agent_path, self.tmp)
            with ctx:
                samples["relay"] += sequential(listen, per)
            ctx, listen = proxy(agent_path, self.tmp)
            with ctx:
                samples["proxy"] += sequential(listen, per)
        return {kind: summary(times) for kind, times in samples.items()}

    # (a) and (b) and (c) on one agent socket
    def agent_figures(self, name: str, agent_path, *, clients=(1, 4, 16, 64), styles=True, agent_pid=None,
                      floors=False) -> None:
        """agent_pid: the agent's process, to count its CPU per request too;
        floors: the floors under (b) too (see rates)."""
        out = self.r.setdefault(name, {})
        pings = self.pings if name != "sim" else max(100, self.pings // 10)
        self.log("[%s] sequential: direct, relay, proxy" % name)
        out.update(self.sequential_side_by_side(agent_path, pings, 1 if self.quick else 5))
        out.update(self.rates_in_rounds(name, agent_path, clients=clients, styles=styles, agent_pid=agent_pid,
                                        floors=floors))

    def rates_in_rounds(self, name: str, agent_path, **kw) -> dict:
        """(b) and (c): every rate measured in turn, in rounds (three in a
        full run), each figure the median of its rounds: this machine's
        speed drifts by tens of percent within minutes, and a ratio of two
        rates measured minutes apart would mostly show the drift."""
        rounds = []
        for i in range(1 if self.quick else 3):
            self.log("[%s] rates, round %d" % (name, i + 1))
            rounds.append(self.rates(agent_path, **kw))
        return median_of(rounds)

    def rates(self, agent_path, *, clients, styles=True, agent_pid=None, floors=False) -> dict:
        """One round of (b) and (c): direct pipelining, the ways people
        share an agent, then the proxy (the agent serves one connection at
        a time, so each runs alone). floors: also 16 clients of the floors
        under (b), in the same round (bench/floor.py): answered without an
        agent with the proxy's reactor ("floor_16") and with a task per
        client ("floor_tasks_16"), the multiplexer floor in front of the
        agent ("floor_mux_16"), and the proxy's router behind the thinnest
        shell ("floor_router_16")."""
        out: dict = {}
        agent = {"agent": agent_pid} if agent_pid else {}
        with cpu_per_request(out, "direct_pipelining", clients=False, **agent):
            out["direct_pipelining_rps"] = round(pipelining(agent_path, self.seconds))
        if floors:
            for key, extra, pids in (("floor_16", (), {}), ("floor_tasks_16", ("--tasks",), {}),
                                     ("floor_mux_16", ("--agent", str(agent_path)), agent),
                                     ("floor_router_16", ("--router", str(agent_path)), agent)):
                ctx, listen = floor(self.tmp, *extra)
                with ctx as proc:
                    with cpu_per_request(out, key, server=proc.pid, **pids):
                        out[key + "_rps"] = round(through_proxy(listen, 16, self.seconds))
        if styles:
            out["proxmox_style_16_rps"] = round(proxmox_style(agent_path, 16, self.seconds))
            out["libvirt_style_16_rps"] = round(libvirt_style(agent_path, 16, self.seconds))
        ctx, listen = proxy(agent_path, self.tmp)
        with ctx as proc:
            out["proxy_clients_rps"] = {}
            out["proxy_cpu_us_per_request"] = {}
            for n in clients:
                # What the proxy process itself spent per request (user +
                # system); with 16 clients, also the clients and the agent.
                each: dict = {}
                with cpu_per_request(each, "run", proxy=proc.pid, **(agent if n == 16 else {})):
                    each["run_rps"] = through_proxy(listen, n, self.seconds)
                out["proxy_clients_rps"][str(n)] = round(each["run_rps"])
                out["proxy_cpu_us_per_request"][str(n)] = each["run_cpu_us"]["proxy"]
                if n == 16:
                    out["proxy_16_cpu_us"] = each["run_cpu_us"]
            out["proxy_pipelining_rps"] = round(pipelining(listen, self.seconds))
        return out

    def host(self) -> None:
        with RealAgent(verbose=False) as agent:
            self.agent_figures("host", agent.path, agent_pid=agent.proc.pid, floors=True)
        host = self.r["host"]
        host["floor_cpu_us_per_request"] = host["floor_16_cpu_us"]["server"]
        # The most 16 clients can get from this machine's cores, whatever
        # serves them: the CPU the clients themselves use per request (with
        # the floor, where they use least) plus the agent's (pipelined,
        # where it uses least), plus the floor's own. (b) can be met only
        # where this reaches half of direct pipelining.
        least = host["floor_16_cpu_us"]["clients"] + host["direct_pipelining_cpu_us"]["agent"]
        host["bound_16_no_server_rps"] = round(os.cpu_count() / least * 1e6)
        host["bound_16_rps"] = round(os.cpu_count() / (least + host["floor_cpu_us_per_request"]) * 1e6)
        # What half of direct pipelining leaves the proxy per request: the
        # machine's cores less what the clients and the agent use, and at
        # most its one core (one thread); against the least a proxy needs
        # (the multiplexer floor's I/O plus the router's own work without I/O).
        half = host["direct_pipelining_rps"] / 2
        host["budget_at_half_us"] = round(min(os.cpu_count() / half * 1e6 - least, 1e6 / half), 1)
        host["router_core_us"] = router_core_us(2000 if self.quick else 20000)
        host["least_proxy_us"] = round(host["floor_mux_16_cpu_us"]["server"] + host["router_core_us"], 1)

    def simulated(self) -> None:
        ctx, path = sim(self.tmp, "--latency", str(SIM_LATENCY))
        with ctx:
            self.agent_figures("sim", path, clients=(1, 4, 16) if self.quick else (1, 4, 16, 64))
        self.r["sim"]["latency_ms"] = SIM_LATENCY * 1e3

    def vm(self) -> None:
        import vm as qgavm

        reason = qgavm.unavailable_reason()
        if reason or not self.want_vm:
            self.r["vm"] = {"skipped": reason or "--no-vm"}
            return
        self.log("[vm] booting")
        with qgavm.VM(cache=qgavm.build()) as machine_:
            pings = max(200, self.pings // 5)
            # Also: what the same agent's round trip becomes when the client
            # does, before each request, about as much Python work as the
            # proxy does on a round trip there (its timeline: about 40 µs
            # from reading a request to writing it, 50 from reading the reply).
            out = self.r["vm"] = self.sequential_side_by_side(
                machine_.agent_sock, pings, 1 if self.quick else 5, work_us=VM_WORK_US
            )
            out["work_us"] = VM_WORK_US
            # (b) and (c) where users feel them: an agent a channel away.
            # Pipelining depth 32, the proxy's window (a VM loses replies
            # with about 128 in flight; see PROTOCOL).
            out.update(self.rates_in_rounds("vm", machine_.agent_sock, clients=(1, 16)))

    def big(self) -> None:
        host_file = self.tmp / "big.bin"
        with open(host_file, "wb") as f:
            f.write(os.urandom(BIG))
        ctx, path = sim(self.tmp, "--file", "/big.bin=@%s" % host_file)
        out = self.r.setdefault("big_read", {"bytes": BIG})
        with ctx:
            self.log("[48 MiB] direct")
            direct = [big_read(path, "/big.bin")[0] for _ in range(1 if self.quick else 3)]
            out["direct_s"] = round(min(direct), 3)
            self.log("[48 MiB] proxy")
            pctx, listen = proxy(path, self.tmp)
            with pctx as proc:
                idle, _ = rss(proc.pid)
                through = []
                for _ in range(1 if self.quick else 3):
                    elapsed, size = big_read(listen, "/big.bin")
                    through.append(elapsed)
                _, hwm = rss(proc.pid)
            out["proxy_s"] = round(min(through), 3)
            out["reply_line_bytes"] = size
            out["proxy_idle_rss_mib"] = round(idle / 2**20, 1)
            out["proxy_peak_rss_mib"] = round(hwm / 2**20, 1)
        host_file.unlink()

    def idle_clients(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        counts = (1000,) if self.quick else (1000, 10000)
        need = max(counts) + 200
        if hard < need:
            self.r["idle_clients"] = {"skipped": "RLIMIT_NOFILE hard limit %d < %d" % (hard, need)}
            return
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the proxy inherits it
        ctx, path = sim(self.tmp)
        out = self.r.setdefault("idle_clients", {})
        with ctx:
            config = self.tmp / "idle.toml"
            listen = self.tmp / "idle.sock"
            config.write_text(
                '[[agent]]\nname = "idle"\nupstream = "unix:%s"\n'
                '[[agent.listener]]\npath = "%s"\nmax_clients = %d\n' % (path, listen, need)
            )
            pctx = process([sys.executable, "-m", "qgaproxy", "serve", "--config", str(config), "--log-level", "warning"],
                           listen, "the proxy")
            with pctx as proc:
                base, _ = rss(proc.pid)
                out["proxy_rss_0_mib"] = round(base / 2**20, 1)
                socks = []
                for n in counts:
                    self.log("[idle] %d clients" % n)
                    while len(socks) < n:
                        socks.append(connect(listen))
                    # Every connection accepted and served: a ping on the last one.
                    probe = socks[-1]
                    probe.sendall(PING)
                    assert read_line(probe, bytearray()) == PONG
                    wait_for(lambda: _clients(proc.pid) >= n, 60, "the proxy to hold %d clients" % n)
                    now, _ = rss(proc.pid)
                    out["proxy_rss_%d_mib" % n] = round(now / 2**20, 1)
                    out["per_client_kib_%d" % n] = round((now - base) / n / 1024, 1)
                for s in socks:
                    s.close()

    def recovery(self) -> None:
        ctx, path = sim(self.tmp, "--drop", "guest-get-time")
        out = self.r.setdefault("timeout_recovery", {})
        with ctx:
            pctx, listen = proxy(path, self.tmp, "--request-timeout", "0.2")
            with pctx:
                rounds = 3 if self.quick else 20
                out["after_timeout"] = summary(timeout_recovery(listen, rounds))
                out["round_trip"] = summary(sequential(listen, self.pings))

    def all(self) -> dict:
        start = cpu_times()
        for step in (self.host, self.simulated, self.vm, self.big, self.idle_clients, self.recovery):
            step()
        # On a shared host this varies from run to run, and with it every
        # figure that wakes processes often.
        self.r["machine"]["cpu_stolen_pct"] = stolen_pct(start, cpu_times())
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.r["targets"] = targets(self.r)
        return self.r


def _clients(pid: int) -> int:
    """Sockets the proxy holds (a lower bound on its clients)."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        with contextlib.suppress(OSError):
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:"):
                n += 1
    return n


# -- targets and report --------------------------------------------------------------------

def targets(r: dict) -> list[dict]:
    rows = []

    def row(what, value, limit, op, unit="", detail=None):
        """detail: this run's figures behind the value, shown with it (the
        target's name stays the same from run to run)."""
        ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
        rows.append({"target": what, "value": value, "limit": "%s %s%s" % (op, limit, unit), "met": ok})
        if detail:
            rows[-1]["detail"] = detail

    host = r.get("host", {})
    if host:
        row("(a) host: proxy p50 / relay p50", round(host["proxy"]["p50_us"] / host["relay"]["p50_us"], 2), 1.3, "<=")
        row("(b) host: 16 clients / direct pipelining",
            round(host["proxy_clients_rps"]["16"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        if "floor_16_rps" in host:
            row("(b) host: trio floor, 16 clients answered without an agent / direct pipelining (reference)",
                round(host["floor_16_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        if "floor_tasks_16_rps" in host:
            row("(b) host: the same floor with a trio task per client (the proxy's former design) / direct "
                "pipelining (reference)", round(host["floor_tasks_16_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        if "floor_mux_16_rps" in host:
            row("(b) host: the multiplexer floor, 16 clients through the proxy's I/O to the agent with no logic / "
                "direct pipelining (reference: the most a proxy on this I/O gets; under 0.5, (b) is out of reach)",
                round(host["floor_mux_16_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        if "floor_router_16_rps" in host:
            row("(b) host: the router floor, the proxy's router behind the thinnest shell / direct pipelining "
                "(reference: the most this router gets in any shell; under 0.5, (b) is out of reach for it)",
                round(host["floor_router_16_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        if "bound_16_rps" in host:
            row("(b) host: the most 16 clients can get on this machine's %d cores, serving them for free "
                "(cores / the CPU per request of the clients and the agent) / direct pipelining (reference: "
                "under 0.5, (b) is out of reach)" % r["machine"]["cores"],
                round(host["bound_16_no_server_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
            row("(b) host: the same, with the trio floor's own CPU per request / direct pipelining (reference)",
                round(host["bound_16_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        if "least_proxy_us" in host:
            least = host["least_proxy_us"]
            row("(b) host: the CPU per request that 0.5x leaves the proxy / the least a proxy needs: the "
                "multiplexer floor's I/O and the router's own work (reference: under 1, (b) is out of reach)",
                round(host["budget_at_half_us"] / least, 2), 1, ">=",
                detail="%s µs / %s µs" % (host["budget_at_half_us"], least))
            row("(b) host: the proxy's own CPU per request with 16 clients / the least a proxy needs (reference: "
                "what the proxy spends beyond its I/O and its router)",
                round(host["proxy_16_cpu_us"]["proxy"] / least, 2), 1, "<=",
                detail="%s µs / %s µs" % (host["proxy_16_cpu_us"]["proxy"], least))
        row("(b) host: 1 client pipelining, proxy / direct (reference)",
            round(host["proxy_pipelining_rps"] / host["direct_pipelining_rps"], 2), 0.5, ">=")
        row("(c) host: proxy 16 clients / Proxmox-style",
            round(host["proxy_clients_rps"]["16"] / host["proxmox_style_16_rps"], 1), 10, ">=")
        row("(c) host: proxy 16 clients / libvirt-style",
            round(host["proxy_clients_rps"]["16"] / host["libvirt_style_16_rps"], 1), 2, ">=")
        row("(c) host: the agent's own capacity (direct pipelining) / Proxmox-style (reference: "
            "under 10, 10x Proxmox-style is more than the agent can answer)",
            round(host["direct_pipelining_rps"] / host["proxmox_style_16_rps"], 1), 10, ">=")
        if "floor_mux_16_rps" in host:
            row("(c) host: the multiplexer floor's rate / Proxmox-style (reference: under 10, no proxy on this I/O "
                "reaches 10x)", round(host["floor_mux_16_rps"] / host["proxmox_style_16_rps"], 1), 10, ">=")
            row("(c) host: the multiplexer floor's rate / libvirt-style (reference: under 2, no proxy on this I/O "
                "reaches 2x)", round(host["floor_mux_16_rps"] / host["libvirt_style_16_rps"], 1), 2, ">=")
    vm = r.get("vm", {})
    if "proxy_clients_rps" in vm:
        row("(c) VM: proxy 16 clients / Proxmox-style",
            round(vm["proxy_clients_rps"]["16"] / vm["proxmox_style_16_rps"], 1), 10, ">=")
        row("(c) VM: proxy 16 clients / libvirt-style",
            round(vm["proxy_clients_rps"]["16"] / vm["libvirt_style_16_rps"], 1), 2, ">=")
        row("(c) VM: the agent's own capacity (direct pipelining) / Proxmox-style (reference, as for the host)",
            round(vm["direct_pipelining_rps"] / vm["proxmox_style_16_rps"], 1), 10, ">=")
        row("(b) VM: 16 clients / direct pipelining",
            round(vm["proxy_clients_rps"]["16"] / vm["direct_pipelining_rps"], 2), 0.5, ">=")
    if "proxy" in vm:
        row("(a) VM: proxy p50 / direct p50", round(vm["proxy"]["p50_us"] / vm["direct"]["p50_us"], 2), 1.1, "<=")
        row("(a) VM: the zero-logic relay's p50 / direct p50 (reference: the floor any proxy stands on; over 1.1, "
            "(a) VM is out of reach)",
            round(vm["relay"]["p50_us"] / vm["direct"]["p50_us"], 2), 1.1, "<=")
        if "direct_after_work" in vm:
            row("(a) VM: direct p50 when the client does %s µs of Python work before each request (not timed) "
                "/ direct p50 (reference: what that much work costs the guest's side of a round trip)" % vm["work_us"],
                round(vm["direct_after_work"]["p50_us"] / vm["direct"]["p50_us"], 2), 1.1, "<=")
    big = r.get("big_read", {})
    if big:
        row("(d) 48 MiB: proxy / direct", round(big["proxy_s"] / big["direct_s"], 2), 1.5, "<=")
        row("(d) 48 MiB: proxy peak RSS / reply size", round(big["proxy_peak_rss_mib"] * 2**20 / big["reply_line_bytes"], 2), 3, "<=")
    idle = r.get("idle_clients", {})
    for key in ("per_client_kib_1000", "per_client_kib_10000"):
        if key in idle:
            row("(e) KiB per idle client (%s)" % key.rsplit("_", 1)[1], idle[key], 16, "<=", " KiB")
    rec = r.get("timeout_recovery", {})
    if rec:
        limit = round(10_000 + rec["round_trip"]["p50_us"])
        row("(f) timeout -> next reply, p50 (us)", rec["after_timeout"]["p50_us"], limit, "<=", " us")
    return rows


def markdown(r: dict) -> str:
    m = r["machine"]
    out = ["# qgaproxy benchmark%s" % (" (quick smoke run: figures not meaningful)" if r["quick"] else ""), ""]
    out.append("Machine: %s, %d cores, Linux %s, Python %s, trio %s, %s; load average at start %s; %s." % (
        m["cpu"], m["cores"], m["kernel"], m["python"], m["trio"], m["qemu_ga"],
        " ".join(map(str, m["load_average_at_start"])), m["measured_at"]))
    if "wakeup_round_trip_us" in m:
        out[-1] += (" At the start, two processes woke each other through pipes in %s µs a round trip, and a "
                    "fixed loop of Python took %s µs (the machine's speed drifts: these place the run)." % (
                        m["wakeup_round_trip_us"], m["python_loop_us"]))
    if "cpu_stolen_pct" in m:
        out[-1] += (" CPU time the hypervisor gave to others while this machine had work (steal): %s%% of the "
                    "run." % m["cpu_stolen_pct"])
    out += ["", "## (a) Sequential guest-ping round trip (µs)", "",
            "| agent | direct p50 | relay p50 | proxy p50 | direct p99 | relay p99 | proxy p99 |",
            "|---|---|---|---|---|---|---|"]
    for name, label in (("host", "qemu-ga on the host"), ("sim", "simulated, %g ms per request" % (SIM_LATENCY * 1e3)),
                        ("vm", "qemu-ga in a QEMU VM (TCG)")):
        a = r.get(name, {})
        if "proxy" in a:
            out.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                label, a["direct"]["p50_us"], a["relay"]["p50_us"], a["proxy"]["p50_us"],
                a["direct"]["p99_us"], a["relay"]["p99_us"], a["proxy"]["p99_us"]))
        elif a.get("skipped"):
            out.append("| %s | skipped: %s | | | | | |" % (label, a["skipped"]))
    vm = r.get("vm", {})
    if "direct_after_work" in vm:
        out += ["", "In the VM, straight to the agent but with %s µs of Python work by the client before each request "
                "(not timed): p50 %s µs, p99 %s µs. The work slows the guest's side of the round trip: on this host "
                "QEMU's TCG threads share the caches and the 2 cores with whatever runs between requests." % (
                    vm["work_us"], vm["direct_after_work"]["p50_us"], vm["direct_after_work"]["p99_us"])]
    out += ["", "## (b) Requests per second", "",
            "| agent | direct, 1 client pipelining | proxy, 1 client pipelining | proxy, 1 | 4 | 16 | 64 clients "
            "| proxy CPU per request, 1 / 16 clients |", "|---|---|---|---|---|---|---|---|"]
    for name in ("host", "sim", "vm"):
        a = r.get(name, {})
        if "proxy_clients_rps" in a:
            c = a["proxy_clients_rps"]
            cpu = a.get("proxy_cpu_us_per_request", {})
            out.append("| %s | %s | %s | %s | %s |" % (
                name, a["direct_pipelining_rps"], a["proxy_pipelining_rps"],
                " | ".join(str(c.get(k, "-")) for k in ("1", "4", "16", "64")),
                "%s / %s µs" % (cpu.get("1", "-"), cpu.get("16", "-")) if cpu else "-"))
    host = r.get("host", {})
    if "floor_16_rps" in host:
        out += ["", "The trio floor (bench/floor.py: one task reading every client through the proxy's reactor and "
                "answering each ping itself, no agent): %s requests/s with 16 clients, %s µs of its CPU per request." % (
                    host["floor_16_rps"], host["floor_cpu_us_per_request"])]
    if "floor_tasks_16_rps" in host:
        out[-1] += (" With a trio task per client instead (`--tasks`, the proxy's former design): %s requests/s, "
                    "%s µs." % (host["floor_tasks_16_rps"], host["floor_tasks_16_cpu_us"]["server"]))
    for key, what in (
        ("floor_router_16", "The router floor (`--router`: the proxy's own router behind the thinnest shell, the "
                            "same reactor for the clients and the agent, writes on the spot, no timers, metrics or logs)"),
        ("floor_mux_16", "The multiplexer floor (`--agent`: the proxy's reactor reading 16 clients and the agent's "
                         "channel, requests passed on as they came, replies back in order, no logic at all)"),
    ):
        if key + "_rps" in host:
            cpu = host[key + "_cpu_us"]
            out += ["", "%s: %s requests/s, %s µs of its CPU per request (clients %s, agent %s)." % (
                what, host[key + "_rps"], cpu["server"], cpu["clients"], cpu["agent"])]
    if "bound_16_rps" in host:
        used = host["proxy_16_cpu_us"]
        out += ["", "CPU per request with 16 clients on the host (µs, user + system): through the proxy, proxy %s, "
                "clients %s, agent %s; with the floor, floor %s, clients %s; the agent pipelined directly, %s. "
                "So %d cores give 16 clients at most %s requests/s even from a server that costs nothing, "
                "and %s/s from one that costs what the floor does." % (
                    used["proxy"], used["clients"], used.get("agent", "-"), host["floor_16_cpu_us"]["server"],
                    host["floor_16_cpu_us"]["clients"], host["direct_pipelining_cpu_us"]["agent"],
                    r["machine"]["cores"], host["bound_16_no_server_rps"], host["bound_16_rps"])]
    if "router_core_us" in host:
        out += ["", "The router's own work on one guest-ping round trip, no I/O (parse, check, rewrite the id "
                "both ways): %s µs. Half of direct pipelining leaves the proxy %s µs of CPU per request." % (
                    host["router_core_us"], host["budget_at_half_us"])]
        if "least_proxy_us" in host:
            out[-1] += (" The least a proxy needs, the multiplexer floor's I/O and the router's work: %s µs; "
                        "the proxy spends %s." % (host["least_proxy_us"], host["proxy_16_cpu_us"]["proxy"]))
    out += ["", "## (c) Sharing one agent among 16 clients (requests per second)", "",
            "| agent | Proxmox-style | libvirt-style | through the proxy |", "|---|---|---|---|"]
    for name in ("host", "sim", "vm"):
        a = r.get(name, {})
        if "proxmox_style_16_rps" in a:
            out.append("| %s | %s | %s | %s |" % (name, a["proxmox_style_16_rps"], a["libvirt_style_16_rps"],
                                                a["proxy_clients_rps"]["16"]))
    big = r.get("big_read", {})
    if big:
        out += ["", "## (d) One 48 MiB guest-file-read reply (simulated agent)", "",
                "| direct | through the proxy | reply line | proxy RSS idle | proxy peak RSS |", "|---|---|---|---|---|",
                "| %s s | %s s | %.1f MiB | %s MiB | %s MiB |" % (big["direct_s"], big["proxy_s"], big["reply_line_bytes"] / 2**20,
                                                           big["proxy_idle_rss_mib"], big["proxy_peak_rss_mib"])]
    idle = r.get("idle_clients", {})
    if idle and not idle.get("skipped"):
        out += ["", "## (e) Idle clients", "", "| clients | proxy RSS | per client |", "|---|---|---|",
                "| 0 | %s MiB | |" % idle["proxy_rss_0_mib"]]
        for n in (1000, 10000):
            if "proxy_rss_%d_mib" % n in idle:
                out.append("| %d | %s MiB | %s KiB |" % (n, idle["proxy_rss_%d_mib" % n], idle["per_client_kib_%d" % n]))
    rec = r.get("timeout_recovery", {})
    if rec:
        out += ["", "## (f) From a request timeout to the next reply (healthy simulated agent)", "",
                "| timeout -> next reply p50 | p99 (of %d) | one round trip p50 |" % rec["after_timeout"]["n"], "|---|---|---|",
                "| %s µs | %s µs | %s µs |" % (rec["after_timeout"]["p50_us"], rec["after_timeout"]["p99_us"],
                                            rec["round_trip"]["p50_us"])]
    out += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in r["targets"]:
        out.append("| %s | %s | %s | %s |" % (t["target"] + (" (this run: %s)" % t["detail"] if t.get("detail") else ""),
                                           t["value"], t["limit"],
                                           {True: "yes", False: "no", None: "-"}[t["met"]]))
    runs = r.get("earlier_runs", [])
    if runs:
        every = runs + [{"measured_at": m["measured_at"], "targets": r["targets"],
                         "cpu_stolen_pct": m.get("cpu_stolen_pct")}]
        stolen = [run.get("cpu_stolen_pct") for run in every]
        out += ["", "## Targets over %d runs" % len(every), "",
                "The same targets in each of %d full runs (%s to %s); the tables above are the last run's. "
                "This machine drifts, so a target is judged by its range." % (
                    len(every), every[0]["measured_at"], every[-1]["measured_at"])
                + (" Steal in each run: %s." % ", ".join("%s%%" % x for x in stolen) if None not in stolen else ""),
                "", "| target | lowest | median | highest | limit | met in |", "|---|---|---|---|---|---|"]
        for t in r["targets"]:
            rows = [x for run in every for x in run["targets"] if x["target"] == t["target"] and x["value"] is not None]
            values = sorted(x["value"] for x in rows)
            if values:
                out.append("| %s | %s | %s | %s | %s | %d of %d |" % (
                    t["target"], values[0], round(statistics.median(values), 2), values[-1], t["limit"],
                    sum(1 for x in rows if x["met"]), len(rows)))
    return "\n".join(out) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    names = [n for n in ("host", "sim", "vm") if "proxy" in r.get(n, {})]
    width = 0.25
    for i, kind in enumerate(("direct", "relay", "proxy")):
        ax.bar([j + (i - 1) * width for j in range(len(names))], [r[n][kind]["p50_us"] for n in names], width, label=kind)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("µs (log)")
    ax.set_title("(a) sequential guest-ping, p50")
    ax.legend()
    ax = axes[1]
    for name in ("host", "sim", "vm"):
        if "proxy_clients_rps" in r.get(name, {}):
            c = r[name]["proxy_clients_rps"]
            ks = sorted(c, key=int)
            line, = ax.plot([int(k) for k in ks], [c[k] for k in ks], marker="o", label="%s: proxy" % name)
            ax.axhline(r[name]["direct_pipelining_rps"], linestyle="--", color=line.get_color(),
                       label="%s: direct, pipelining" % name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clients")
    ax.set_ylabel("requests/s")
    ax.set_title("(b) aggregate rate")
    ax.legend(fontsize=8)
    ax = axes[2]
    names = [n for n in ("host", "sim", "vm") if "proxmox_style_16_rps" in r.get(n, {})]
    for i, (key, label) in enumerate((("proxmox_style_16_rps", "Proxmox-style"), ("libvirt_style_16_rps", "libvirt-style"), (None, "proxy"))):
        values = [r[n][key] if key else r[n]["proxy_clients_rps"]["16"] for n in names]
        ax.bar([j + (i - 1) * width for j in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (log)")
    ax.set_title("(c) 16 clients sharing one agent")
    ax.legend(fontsize=8)
    m = r["machine"]
    fig.suptitle("qgaproxy, %s, %d cores, %s" % (m["cpu"], m["cores"], m["measured_at"]), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, short runs")
    parser.add_argument("--no-vm", action="store_true", help="skip the QEMU VM")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: write the table, targets and plot again from --out's results.json")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="N full runs in a row: the tables are the last run's, plus each target's range over all")
    args = parser.parse_args()
    if args.render:
        results = json.loads((args.out / "results.json").read_text())
        results["targets"] = targets(results)
    else:
        earlier = []
        for i in range(max(1, args.repeat)):
            if i:
                print("run %d of %d" % (i + 1, args.repeat), file=sys.stderr, flush=True)
                earlier.append({"measured_at": results["machine"]["measured_at"], "targets": results["targets"],
                                "cpu_stolen_pct": results["machine"].get("cpu_stolen_pct")})
            results = Run(args.quick, not args.no_vm).all()
        if earlier:
            results["earlier_runs"] = earlier
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "results.md").write_text(text)
    plot(results, args.out / "results.png")
    print(text)


if __name__ == "__main__":
    main()
