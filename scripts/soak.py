#!/usr/bin/env python3
"""Soak: the proxy under steady load with periodic faults for a long time,
watching for leaks.

The proxy runs alone in a child process (this script with --proxy-child),
in front of the simulated agent on a unix socket; this process runs the
agent, its seeded fault schedule (tests/chaosutil.py: hangs, late and
dropped replies, restarts in the middle of a reply, garbage, dropped
channels, pauses) and the load: persistent ChaosClients pipelining
requests, plus short-lived clients that connect, make a few requests and
leave. Every reply is checked against its request (tests/chaosutil.py).

Every --sample seconds it records the proxy's resident memory
(/proc/PID/status), open descriptors (/proc/PID/fd) and trio tasks
(counted inside the child with trio.lowlevel), and prints a table. The
verdict: after the warm-up, the median of the last fifth of the samples is
within --tolerance (5%) of the median of the first fifth, for each of the
three; and once the load is gone, descriptors and tasks are back to what
they were before it started.

    python3 scripts/soak.py                 # 30 minutes
    python3 scripts/soak.py --minutes 5 --clients 64
    python3 scripts/soak.py --seconds 20 --smoke   # CI: the verdict is informative

Exit status: 0 all good; 1 a mismatch, a lost reply, a proxy that died or
did not recover; 2 the figures were not flat (not with --smoke).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import trio  # noqa: E402

from chaosutil import ChaosClient, ChaosCrowd, SimChaos, file_path, file_pattern  # noqa: E402
from proxyutil import Progress, fd_count, rss, stop_process, task_count  # noqa: E402
from qgaproxy import sim  # noqa: E402

STEP = 60.0  # bound on every wait for a state; only turns a hang into a failure


# ---------------------------------------------------------------------------
# The proxy child.

async def proxy_child(upstream: str, listen: str, request_timeout: float) -> None:
    """Serve; answer each line on stdin with one JSON line of figures."""
    from proxyutil import run_proxy
    from qgaproxy.upstream import State

    async with run_proxy(upstream, [listen], request_timeout=request_timeout, sync_timeout=0.5,
                         backoff_min=0.05, backoff_max=0.5) as proxy:
        ready = [0]
        observer = proxy.router.observer
        original = observer.state_changed

        def state_changed(old, new, reason):
            if new is State.READY:
                ready[0] += 1
            original(old, new, reason)

        observer.state_changed = state_changed
        stdin = trio.lowlevel.FdStream(os.dup(0))
        out = sys.stdout
        out.write("ready\n")
        out.flush()
        buf = b""
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                _, _, buf = buf.partition(b"\n")
                router = proxy.router
                out.write(json.dumps({
                    "tasks": task_count(), "ready": ready[0], "state": proxy.upstream.state.value,
                    "clients": len(router.clients), "in_flight": router.in_flight(),
                    "queued": router.queued(), "stale": router.stale_replies,
                }) + "\n")
                out.flush()


# ---------------------------------------------------------------------------
# The driver.

class Child:
    def __init__(self, agent_path: str, listen: str, request_timeout: float, log_path: str):
        self.log = open(log_path, "ab")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--proxy-child", "--upstream", "unix:" + agent_path,
             "--listen", listen, "--request-timeout", str(request_timeout)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def readline(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the proxy process exited (rc %s)" % self.proc.poll())
        return line.decode()

    def figures(self) -> dict:
        self.proc.stdin.write(b"?\n")
        self.proc.stdin.flush()
        out = json.loads(self.readline())
        out["rss_kib"] = rss(self.pid)[0] // 1024
        out["fds"] = fd_count(self.pid)
        return out

    def stop(self) -> int:
        # End of its stdin: the child stops serving and exits 0.
        try:
            self.proc.stdin.close()
            self.proc.wait(STEP)
        except (OSError, subprocess.TimeoutExpired):
            pass
        rc = stop_process(self.proc, STEP)
        self.log.close()
        return rc


def median(values):
    return statistics.median(values) if values else float("nan")


def verdict(samples: list[dict], warmup: float, tolerance: float) -> tuple[bool, list[str]]:
    after = [s for s in samples if s["t"] >= warmup]
    lines = []
    if len(after) < 5:
        return False, ["too few samples after the warm-up (%d) for a verdict" % len(after)]
    fifth = max(1, len(after) // 5)
    flat = True
    for key, name in (("rss_kib", "RSS"), ("fds", "descriptors"), ("tasks", "trio tasks")):
        first = median([s[key] for s in after[:fifth]])
        last = median([s[key] for s in after[-fifth:]])
        change = (last - first) / first if first else 0.0
        ok = abs(change) <= tolerance
        flat &= ok
        lines.append("%-12s first %10.1f  last %10.1f  change %+6.2f%%  %s"
                     % (name, first, last, change * 100, "flat" if ok else "NOT FLAT"))
    return flat, lines


async def drive(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    duration = args.seconds if args.seconds is not None else args.minutes * 60
    warmup = args.warmup if args.warmup is not None else min(120.0, duration * 0.15)
    sample_every = args.sample if args.sample is not None else max(1.0, duration / 60)
    print("soak: seed %d (replay: --seed %d), %gs, %d clients x %d in flight, warm-up %gs, sample every %gs"
          % (seed, seed, duration, args.clients, args.depth, warmup, sample_every), flush=True)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="qgaproxy-soak-")
    agent_path = os.path.join(tmp, "agent.sock")
    listen = os.path.join(tmp, "proxy.sock")
    log_path = os.path.join(tmp, "proxy.log")
    agent = sim.SimAgent(sim.SimConfig(received_limit=1000))
    churn_names = ["k%03d" % i for i in range(8)]
    for name in ["c%03d" % i for i in range(args.clients)] + churn_names:
        agent.put_file(file_path(name), file_pattern(name))
    samples: list[dict] = []
    failures: list[str] = []
    churned = [0]
    churn_mismatches: list[str] = []
    churn_kinds: dict = {}
    child = None
    chaos = SimChaos(agent, rng, request_timeout=args.request_timeout)

    async def in_thread(fn, *a):
        return await trio.to_thread.run_sync(fn, *a)

    async def churn(path: str, stop: trio.Event) -> None:
        # Short-lived clients, one after another: connect, a few requests, leave.
        progress = Progress()
        i = 0
        while not stop.is_set():
            name = churn_names[i % len(churn_names)]
            client = ChaosClient(path, name, 900 + i % len(churn_names), progress, depth=2,
                                 call_bound=STEP)
            i += 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                with trio.move_on_after(STEP):
                    await progress.until(lambda: client.replies() >= 10 or client.done.is_set(), STEP,
                                         "a short-lived client served")
                client.stop.set()
            churned[0] += 1
            churn_mismatches.extend(client.mismatches)
            for k, v in client.kinds.items():
                churn_kinds[k] = churn_kinds.get(k, 0) + v
            await trio.sleep(args.churn_gap)

    def row(s: dict) -> str:
        return "%8.0f %10.1f %6d %6d %9d %6d %6d %6d %s" % (
            s["t"], s["rss_kib"] / 1024, s["fds"], s["tasks"], s["requests"], s["mismatches"],
            s["faults"], s["ready"] - 1, s["state"])

    try:
        async with trio.open_nursery() as outer:
            await outer.start(sim.serve_unix, agent, agent_path)
            child = Child(agent_path, listen, args.request_timeout, log_path)
            line = await in_thread(child.readline)
            assert line.strip() == "ready", line
            with trio.fail_after(STEP):
                while (idle := await in_thread(child.figures))["state"] != "ready":
                    await trio.sleep(0.05)
            print("proxy pid %d; idle before the load: RSS %.1f MiB, %d descriptors, %d tasks"
                  % (child.pid, idle["rss_kib"] / 1024, idle["fds"], idle["tasks"]), flush=True)
            print("%8s %10s %6s %6s %9s %6s %6s %6s %s" % (
                "t(s)", "RSS(MiB)", "fds", "tasks", "requests", "mism", "faults", "recov", "agent"), flush=True)
            start = time.monotonic()
            stop_churn = trio.Event()

            async def pace():
                await trio.sleep(0.05)

            async with trio.open_nursery() as load:
                crowd = ChaosCrowd(load, listen, args.clients, depth=args.depth, call_bound=STEP, pace=pace,
                                   gap=args.gap)
                load.start_soon(churn, listen, stop_churn)
                faults = trio.CancelScope()

                async def run_faults():
                    with faults:
                        await chaos.run(duration, gap=(args.fault_gap * 0.5, args.fault_gap * 1.5))

                load.start_soon(run_faults)
                end = start + duration
                next_sample = start
                while True:
                    now = time.monotonic()
                    if now >= end:
                        break
                    if now >= next_sample:
                        s = await in_thread(child.figures)
                        s["t"] = now - start
                        tally = crowd.tally()
                        s["requests"] = sum(tally.values()) + sum(churn_kinds.values())
                        s["mismatches"] = len(crowd.mismatches()) + len(churn_mismatches)
                        s["faults"] = sum(chaos.counts.values())
                        samples.append(s)
                        print(row(s), flush=True)
                        next_sample += sample_every
                    await trio.sleep(min(next_sample, end) - time.monotonic())
                faults.cancel()
                stop_churn.set()
                # The faults are over: the agent comes back and everyone is served.
                cleared = time.monotonic()
                with trio.fail_after(STEP):
                    while (await in_thread(child.figures))["state"] != "ready":
                        await trio.sleep(0.1)
                await crowd.all_served_since(cleared, STEP, "every client served after the faults")
                tally = await crowd.stop(STEP)
            # Load gone: descriptors and tasks back where they were.
            with trio.move_on_after(STEP):
                while True:
                    final = await in_thread(child.figures)
                    if final["clients"] == 0 and final["in_flight"] == 0 and final["queued"] == 0 \
                            and final["fds"] <= idle["fds"] and final["tasks"] <= idle["tasks"]:
                        break
                    await trio.sleep(0.2)
            rc = await in_thread(child.stop)
            outer.cancel_scope.cancel()
    finally:
        if child is not None and child.proc.poll() is None:
            child.stop()

    mismatches = crowd.mismatches() + churn_mismatches
    requests = sum(tally.values()) + sum(churn_kinds.values())
    kinds = dict(tally)
    for k, v in churn_kinds.items():
        kinds[k] = kinds.get(k, 0) + v
    print()
    print("requests checked %d (%s); short-lived clients %d" % (requests, ", ".join(
        "%s %d" % kv for kv in sorted(kinds.items())), churned[0]))
    print("faults injected %d (%s)" % (sum(chaos.counts.values()), ", ".join(
        "%s %d" % kv for kv in sorted(chaos.counts.items()))))
    print("recoveries (agent back to ready) %d; stale replies dropped %d" % (final["ready"] - 1, final["stale"]))
    print("mismatches %d%s" % (len(mismatches), (": " + "; ".join(mismatches[:5])) if mismatches else ""))
    print("proxy start (idle): RSS %.1f MiB, %d descriptors, %d tasks"
          % (idle["rss_kib"] / 1024, idle["fds"], idle["tasks"]))
    loaded = [s for s in samples if s["t"] >= warmup]
    if loaded:
        print("proxy first sample after the warm-up: RSS %.1f MiB, %d descriptors, %d tasks (t=%.0fs)"
              % (loaded[0]["rss_kib"] / 1024, loaded[0]["fds"], loaded[0]["tasks"], loaded[0]["t"]))
        print("proxy last sample under load:        RSS %.1f MiB, %d descriptors, %d tasks (t=%.0fs)"
              % (loaded[-1]["rss_kib"] / 1024, loaded[-1]["fds"], loaded[-1]["tasks"], loaded[-1]["t"]))
    print("proxy end (idle): RSS %.1f MiB, %d descriptors, %d tasks; exit status %s"
          % (final["rss_kib"] / 1024, final["fds"], final["tasks"], rc))
    if mismatches:
        failures.append("%d mismatches" % len(mismatches))
    if rc != 0:
        failures.append("the proxy exited with %s (log: %s)" % (rc, log_path))
    if final["fds"] > idle["fds"] or final["tasks"] > idle["tasks"]:
        failures.append("descriptors or tasks not back to idle (%d/%d, were %d/%d)"
                        % (final["fds"], final["tasks"], idle["fds"], idle["tasks"]))
    flat, lines = verdict(samples, warmup, args.tolerance)
    print("verdict after a %gs warm-up (tolerance %g%%):" % (warmup, args.tolerance * 100))
    for line in lines:
        print("  " + line)
    print("  " + ("FLAT" if flat else "NOT FLAT") + ("" if not args.smoke else " (informative: --smoke)"))
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    if not flat and not args.smoke:
        return 2
    print("OK")
    if not args.keep:
        for p in (log_path,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(tmp)
        except OSError:
            pass
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4, help="requests each client keeps in flight")
    parser.add_argument("--gap", type=float, default=0.01,
                        help="seconds each client waits between requests (0: flat out)")
    parser.add_argument("--sample", type=float, help="seconds between samples (default: duration/60)")
    parser.add_argument("--warmup", type=float, help="seconds left out of the verdict")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--fault-gap", type=float, default=5.0, help="mean seconds between faults")
    parser.add_argument("--churn-gap", type=float, default=0.2, help="seconds between short-lived clients")
    parser.add_argument("--request-timeout", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--smoke", action="store_true", help="the verdict does not decide the exit status")
    parser.add_argument("--keep", action="store_true", help="keep the proxy log")
    parser.add_argument("--proxy-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    parser.add_argument("--listen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.proxy_child:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
        trio.run(proxy_child, args.upstream, args.listen, args.request_timeout)
        return 0
    return trio.run(drive, args)


if __name__ == "__main__":
    sys.exit(main())
