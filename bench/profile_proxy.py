"""Where the proxy's time goes, under the benchmark's loads.

Against the real qemu-ga on this host, the proxy (`python -m qgaproxy
serve`, its own process) is profiled while it serves:

  - 16 clients, each one guest-ping at a time ((b) and (c) of the suite);
  - 1 client, sequential guest-pings ((a)).

Two views of each run:

  cProfile, switched on inside the proxy only while the load runs (SIGUSR1):
      the proxy's Python time by part (the sans-IO core, the trio shell,
      trio itself, metrics, each system call), and function calls per
      request, which do not drift with the machine's speed. cProfile
      makes every Python call dearer, so the shares lean towards Python.
  perf (`perf record -e cpu-clock -a`, where the kernel lets it sample):
      the whole machine's CPU by process (proxy, clients, agent, idle), and
      the proxy's own split between its Python and the kernel, with the
      kernel paths it pays for (waking the reader of each reply).

And, where valgrind is installed, the instructions one guest-ping round
trip costs the proxy's sans-IO part (its router with the metrics, no I/O),
counted by callgrind: the same figure however fast the machine runs, so
two versions of the router can be compared on a machine that drifts.

    python bench/profile_proxy.py                  # writes bench/results/profile.md
    python bench/profile_proxy.py --quick --out DIR

This is a measuring tool, not a test: no figure here is asserted.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import suite  # noqa: E402
from realagent import RealAgent  # noqa: E402


# -- the proxy, with a profiler it switches on and off ---------------------------------

def child(stats_path: str, argv: list[str]) -> None:
    """Run the proxy; SIGUSR1 starts cProfile, the next SIGUSR1 stops it
    and writes the stats to stats_path."""
    profiler = cProfile.Profile()
    state = {"on": False}

    def toggle(signum, frame):
        if state["on"]:
            profiler.disable()
            profiler.dump_stats(stats_path)
        else:
            profiler.enable()
        state["on"] = not state["on"]

    signal.signal(signal.SIGUSR1, toggle)
    from qgaproxy.cli import main

    sys.exit(main(argv))


def part(filename: str, name: str) -> str:
    """The part of the proxy a profiled function belongs to."""
    if filename == "~":
        if "posix.write" in name:
            return "write(2)"
        if "posix.read" in name:
            return "read(2)"
        if "'poll' of 'select.epoll'" in name:
            return "epoll_wait(2)"
        if "select.epoll" in name:
            return "epoll_ctl(2)"
        return "other built-ins"
    if "/qgaproxy/" in filename:
        module = filename.rsplit("/", 1)[-1]
        if module in ("router.py", "codec.py", "messages.py", "upstream.py", "qjson.py", "policy.py",
                      "isolation.py", "freezeguard.py", "negotiation.py"):
            return "core (sans-IO: router, codecs, messages)"
        if module in ("proxy.py", "reactor.py"):
            return "shell (proxy.py, reactor.py)"
        if module == "metrics.py":
            return "metrics"
        return "other qgaproxy"
    if "qgaproxy." in filename:  # attrs-generated methods of our classes
        return "core (sans-IO: router, codecs, messages)"
    if "/trio/" in filename or "/outcome/" in filename or "/sniffio/" in filename:
        return "trio"
    return "other"


def profile_table(stats_path: str, requests: float) -> dict:
    stats = pstats.Stats(stats_path)
    parts: collections.Counter = collections.Counter()
    calls = 0
    functions = []
    for (filename, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        parts[part(filename, name)] += tt
        calls += nc
        functions.append((tt, nc, "%s:%d(%s)" % (filename.rsplit("/", 1)[-1], line, name)))
    total = sum(parts.values())
    functions.sort(reverse=True)
    return {
        "seconds": round(total, 3),
        "requests": round(requests),
        "calls_per_request": round(calls / requests, 1),
        "parts": [(name, round(100 * t / total, 1), round(t / requests * 1e6, 1)) for name, t in parts.most_common()],
        "top": [(round(100 * tt / total, 1), round(nc / requests, 2), where) for tt, nc, where in functions[:15]],
    }


# -- perf: the whole machine's CPU during the load ----------------------------------------

def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", os.devnull, "--", "true"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def perf_samples(data: str):
    """(pid, [frame symbols, leaf first]) per sample."""
    text = subprocess.run(["perf", "script", "-i", data, "-F", "pid,ip,sym,dso"], capture_output=True,
                          text=True, errors="replace").stdout
    sample = None
    for line in text.splitlines():
        if not line.strip():
            if sample is not None:
                yield sample
            sample = None
        elif not line.startswith((" " * 8, "\t")):
            sample = (int(line.split()[0].split("/")[0]), [])
        elif sample is not None:
            fields = line.split(None, 1)
            sample[1].append(fields[1] if len(fields) > 1 else "?")
    if sample is not None:
        yield sample


# Kernel functions worth naming in the proxy's share: what a reply's
# write costs when it wakes the client that waits for it.
KERNEL_PATHS = (
    ("sock_def_readable", "waking the reader of a write (the client, the agent)"),
    ("unix_stream_sendmsg", "unix socket writes, all told"),
    ("unix_stream_recvmsg", "unix socket reads, all told"),
    ("do_epoll_wait", "epoll_wait"),
    ("do_epoll_ctl", "epoll_ctl"),
    ("schedule", "sleeping and being switched out"),
)


def perf_table(data: str, proxy_pid: int, agent_pid: int) -> dict:
    by_who: collections.Counter = collections.Counter()
    proxy_kernel = proxy_user = 0
    paths: collections.Counter = collections.Counter()
    for pid, frames in perf_samples(data):
        who = "proxy" if pid == proxy_pid else "agent" if pid == agent_pid else "idle" if pid == 0 else "clients and the rest"
        by_who[who] += 1
        if pid != proxy_pid or not frames:
            continue
        if "kernel" in frames[0]:
            proxy_kernel += 1
            names = {f.split()[0] for f in frames if "kernel" in f}
            for symbol, _ in KERNEL_PATHS:
                if symbol in names:
                    paths[symbol] += 1
        else:
            proxy_user += 1
    total = sum(by_who.values()) or 1
    mine = proxy_kernel + proxy_user or 1
    return {
        "samples": total,
        "by_process": [(who, round(100 * n / total, 1)) for who, n in by_who.most_common()],
        "proxy_user_pct": round(100 * proxy_user / mine, 1),
        "proxy_kernel_pct": round(100 * proxy_kernel / mine, 1),
        "proxy_kernel_paths": [(what, round(100 * paths[symbol] / mine, 1)) for symbol, what in KERNEL_PATHS],
    }


# -- the runs ---------------------------------------------------------------------------------

def load_once(load: str, listen: Path, seconds: float) -> tuple[float, float]:
    """Run the load for about `seconds`; (requests, requests per second)."""
    start = time.perf_counter()
    if load == "16 clients":
        rps = suite.through_proxy(listen, 16, seconds)
        return rps * seconds, rps  # (each worker runs that long)
    times = suite.sequential(listen, max(200, int(seconds / 300e-6)))
    requests = len(times) + min(200, len(times))  # (and its warm-up)
    return requests, requests / (time.perf_counter() - start)


def run(load: str, seconds: float, tmp: Path, use_perf: bool) -> dict:
    with RealAgent(verbose=False) as agent:
        listen = tmp / ("profile-%d.sock" % random.randrange(1 << 30))
        stats = tmp / ("%s.prof" % load)
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(stats), "serve",
                "--upstream", "unix:%s" % agent.path, "--listen", str(listen), "--log-level", "warning"]
        with suite.process(argv, listen, "the proxy") as proc:
            out: dict = {"load": load}
            # cProfile, on for the whole load.
            proc.send_signal(signal.SIGUSR1)
            requests, rps = load_once(load, listen, seconds)
            proc.send_signal(signal.SIGUSR1)
            suite.wait_for(lambda: stats.exists() and stats.stat().st_size > 0, 30, "the profile")
            time.sleep(0.2)  # (the dump is written in one go; let it finish)
            out["cprofile"] = profile_table(str(stats), requests)
            out["cprofile"]["rps"] = round(rps)
            if use_perf:
                # perf, for a window inside the load (none of its start or end).
                data = tmp / ("%s.perf" % load)
                result: dict = {}
                recorded = threading.Event()

                def keep_loading() -> None:
                    # Rounds of the load until perf's window has closed (a
                    # sequential round is a count of requests, and a fast
                    # machine ends it early).
                    requests, start = 0.0, time.perf_counter()
                    while not recorded.is_set():
                        requests += load_once(load, listen, seconds + 2)[0]
                    result["rps"] = requests / (time.perf_counter() - start)

                worker = threading.Thread(target=keep_loading)
                busy = suite.cpu_seconds(proc.pid)
                worker.start()
                try:
                    # The window opens once the load runs (its workers may
                    # take a while to start on a busy machine).
                    suite.wait_for(lambda: suite.cpu_seconds(proc.pid) > busy + 0.05, 10, "the load to start")
                    subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-a", "-g",
                                    "-o", str(data), "--", "sleep", str(seconds)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
                finally:
                    recorded.set()
                    worker.join()
                out["perf"] = perf_table(str(data), proc.pid, agent.proc.pid)
                out["perf"]["rps"] = round(result["rps"])
        return out


def markdown(runs: list[dict], machine: dict, perf_note: str | None) -> str:
    m = machine
    out = ["# Where the proxy's time goes", "",
           "Machine: %s, %d cores, Linux %s, Python %s, trio %s, %s; %s. Written by `python bench/profile_proxy.py`." % (
               m["cpu"], m["cores"], m["kernel"], m["python"], m["trio"], m["qemu_ga"], m["measured_at"])]
    for r in runs:
        c = r["cprofile"]
        out += ["", "## %s, against qemu-ga on the host" % r["load"], "",
                "cProfile, inside the proxy while the load ran: %d requests (%d/s under the profiler), "
                "%.1f Python function calls per request. Wall-clock times: a system call's share includes the time "
                "the proxy was switched out in it (a write that wakes a client often hands it the core)." % (
                    c["requests"], c["rps"], c["calls_per_request"]), "",
                "| part | share of the proxy's profiled time | µs per request (profiled) |", "|---|---|---|"]
        out += ["| %s | %s%% | %s |" % row for row in c["parts"]]
        out += ["", "| share | calls per request | function |", "|---|---|---|"]
        out += ["| %s%% | %s | `%s` |" % row for row in c["top"]]
        p = r.get("perf")
        if p:
            out += ["", "perf, the whole machine (%d samples of cpu-clock, %d requests/s):" % (p["samples"], p["rps"]), "",
                    "| who | share of both cores |", "|---|---|"]
            out += ["| %s | %s%% |" % row for row in p["by_process"]]
            out += ["", "The proxy's own CPU: %s%% its Python (the interpreter), %s%% in the kernel, of which:" % (
                p["proxy_user_pct"], p["proxy_kernel_pct"]), "", "| kernel path | share of the proxy's CPU |", "|---|---|"]
            out += ["| %s | %s%% |" % row for row in p["proxy_kernel_paths"]]
    if perf_note:
        out += ["", perf_note]
    return "\n".join(out) + "\n"


# -- the router's work, counted ------------------------------------------------------------

PING = b'{"execute":"guest-ping"}\n'
PONG = b'{"return": {}}\n'


def core_loop(n: int) -> None:
    """n guest-ping round trips through the proxy's router and its
    metrics (as the proxy builds them), no I/O."""
    from test_router import Harness

    from qgaproxy.proxy import Proxy, ProxyConfig
    from qgaproxy.transport import UpstreamAddress

    proxy = Proxy(ProxyConfig(upstream=UpstreamAddress.parse("sim")))
    harness = Harness()
    harness.upstream, harness.router = proxy.upstream, proxy.router
    harness.connect()
    router = proxy.router
    client = router.add_client()
    now = 1.0
    for _ in range(n):
        now += 1e-5
        router.client_data(client, PING, now)
        data = router.take_upstream_write(now + 1e-6)
        router.upstream_write_done(now + 1e-6)
        ident = data[data.rindex(b":") + 1 : data.rindex(b"}")].strip()
        router.upstream_data(b'{"return": {}, "id": %s}\n' % ident, now + 5e-6)
        assert router.take_output(client) == PONG
        router.pop_dirty()
        router.next_deadline()
        proxy._count_done()


def core_instructions() -> int | None:
    """Instructions per router round trip (callgrind: the difference
    between two counts, so that start-up cancels out); None without
    valgrind."""
    if shutil.which("valgrind") is None:
        return None
    counts = []
    for n in (500, 2500):
        proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=" + os.devnull,
                               os.path.realpath(sys.executable), str(Path(__file__).resolve()), "--core", str(n)],
                              capture_output=True, text=True, timeout=600)
        found = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode != 0 or found is None:
            return None
        counts.append(int(found.group(1)))
    return round((counts[1] - counts[0]) / 2000)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) > 2 and sys.argv[1] == "--core":
        core_loop(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short loads (a smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-perf", action="store_true", help="cProfile only")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 5.0
    use_perf = not args.no_perf and perf_works()
    note = None if use_perf or args.no_perf else "perf: not available here (no `perf`, or the kernel does not let it sample)."
    tmp = Path(tempfile.mkdtemp(prefix="qgaproxy-profile-"))
    try:
        runs = [run(load, seconds, tmp, use_perf) for load in ("16 clients", "1 client, sequential")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = markdown(runs, suite.machine(), note)
    instructions = None if args.quick else core_instructions()
    if instructions is not None:
        text += ("\n## The router's work, counted\n\nOne guest-ping round trip through the proxy's router and its "
                 "metrics, no I/O: %s instructions (callgrind; the same on any run of the same code).\n" % format(
                     instructions, ","))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
