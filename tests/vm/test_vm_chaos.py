"""Chaos against a real QEMU VM with the real qemu-ga inside: 16 clients
pipelining requests through the proxy (unix:<QEMU's agent chardev>) while a
seeded schedule kills, stops and restarts the agent in the guest (serial
console), pauses and continues the guest (QMP stop/cont) and, once, kills
QEMU and starts it again on the same socket path.

Every reply is checked against its request (tests/chaosutil.py: ids of
every JSON type, bodies that reveal the request, per-client files in the
guest); the only other outcomes allowed are the proxy's clear errors
(timed out, not available). After the faults the proxy must be ready again
and serve every client.

The run prints its seed; QGAPROXY_CHAOS_SEED=N replays the schedule and
QGAPROXY_VM_CHAOS_SECONDS sets how long the faults go on (default 25).
"""

from __future__ import annotations

import collections
import os
import random
import time

import trio

from chaosutil import ChaosCrowd, chaos_seed, file_path
from proxyutil import Transitions, proxy_pace, run_proxy, wait_state_change
from qgaproxy.upstream import State
from test_vm_proxy import in_thread

CLIENTS = 16
DEPTH = 4
REQUEST_TIMEOUT = 2.0
#: Bounds on waits: they only turn a hang into a failure.
STEP = 30.0
BOOT = 90.0

FAULTS = ("agent-kill", "agent-stop", "pause", "agent-kill-term")


#: Each client's file in the guest: its 5-byte "|<name>" mark 512 times.
FILE_SIZE = 5 * 512


def make_files(machine, names) -> None:
    """The clients' files in the guest (qemu-ga in the VM may not write
    files: guest-file-write is blocked)."""
    parts = []
    for name in names:
        assert len("|" + name) * 512 == FILE_SIZE
        parts.append('s="|%s"; for k in 1 2 3 4 5 6 7 8 9; do s="$s$s"; done; echo -n "$s" > %s'
                     % (name, file_path(name)))
    machine.control("run " + "; ".join(parts))


async def test_vm_chaos(vm):
    machine = vm
    seed = chaos_seed()
    duration = float(os.environ.get("QGAPROXY_VM_CHAOS_SECONDS", "25"))
    print("\n[vm chaos] seed %d (replay: QGAPROXY_CHAOS_SEED=%d), %gs of faults" % (seed, seed, duration),
          flush=True)
    rng = random.Random(seed)
    names = ["c%03d" % i for i in range(CLIENTS)]
    await in_thread(make_files, machine, names)
    faults: collections.Counter = collections.Counter()
    async with run_proxy("unix:%s" % machine.agent_sock, request_timeout=REQUEST_TIMEOUT,
                         backoff_max=1.0) as proxy:
        await wait_state_change(proxy, State.READY, timeout=STEP, what="first sync")
        transitions = Transitions(proxy)
        async with trio.open_nursery() as nursery:
            crowd = ChaosCrowd(nursery, proxy.config.listen[0], CLIENTS, depth=DEPTH,
                               call_bound=REQUEST_TIMEOUT + STEP, pace=lambda: proxy_pace(proxy),
                               file_size=FILE_SIZE)
            start = trio.current_time()
            end = start + duration
            # QEMU killed and started again once, somewhere in the middle.
            qemu_restart_at = start + rng.uniform(0.3, 0.6) * duration
            restarted = False
            while trio.current_time() < end:
                await trio.sleep(rng.uniform(0.5, 2.0))
                if not restarted and trio.current_time() >= qemu_restart_at:
                    restarted = True
                    faults["qemu-kill-restart"] += 1
                    await in_thread(machine.kill)
                    await trio.sleep(rng.uniform(0.2, 2.0))
                    await in_thread(machine.restart)
                    await in_thread(make_files, machine, names)
                    continue
                fault = rng.choice(FAULTS)
                hold = rng.uniform(0.5, 2.5 * REQUEST_TIMEOUT)
                faults[fault] += 1
                if fault == "agent-kill":
                    await in_thread(machine.control, "agent-kill", check=False)  # (maybe between restarts)
                elif fault == "agent-kill-term":
                    await in_thread(machine.control, "agent-kill TERM", check=False)
                else:  # held for a while, then undone
                    stop, resume = {
                        "agent-stop": ((machine.control, "agent-stop"), (machine.control, "agent-start")),
                        "pause": ((machine.qmp, "stop"), (machine.qmp, "cont")),
                    }[fault]
                    await in_thread(*stop)
                    try:
                        await trio.sleep(hold)
                    finally:
                        await in_thread(*resume)
            # The faults are over: the agent comes back and everyone is served.
            await in_thread(machine.wait_agent, STEP)
            cleared = time.monotonic()
            await wait_state_change(proxy, State.READY, timeout=STEP, what="ready after the faults")
            await crowd.all_served_since(cleared, STEP, "every client served after the faults")
            tally = await crowd.stop(STEP + REQUEST_TIMEOUT)
        recoveries = sum(1 for _, _, new, _ in transitions.log if new is State.READY)
        stale = proxy.router.stale_replies
    mismatches = crowd.mismatches()
    print("[vm chaos] real VM: seed=%d, clients=%d, requests=%d, faults=%d, recoveries=%d, mismatches=%d, "
          "stale_replies_dropped=%d" % (seed, CLIENTS, sum(tally.values()), sum(faults.values()), recoveries,
                                        len(mismatches), stale), flush=True)
    print("[vm chaos] replies: %s" % dict(sorted(tally.items())), flush=True)
    print("[vm chaos] faults: %s" % dict(sorted(faults.items())), flush=True)
    assert not mismatches, "seed %d: %d mismatches, first: %s" % (seed, len(mismatches), mismatches[:5])
    assert tally["ok"] > 0 and faults["qemu-kill-restart"] == 1
    assert recoveries > 0, transitions.describe()
