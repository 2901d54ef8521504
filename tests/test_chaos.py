"""Chaos against the simulated agent: 64 clients pipelining requests
through the proxy (real unix sockets both ways) while a seeded random
schedule hangs the agent, delays and drops replies, restarts it in the
middle of a reply, writes garbage, drops the channel and pauses the agent.

Every request must get exactly one reply, to its own client, that belongs
to it (tests/chaosutil.py says how that is checked), or one of the proxy's
clear errors; the proxy must come back to ready after the faults and serve
everyone, and leave nothing behind when the clients go.

The run prints its seed; QGAPROXY_CHAOS_SEED=N replays it, and
QGAPROXY_CHAOS_SECONDS sets how long the faults go on (default 10).
"""

from __future__ import annotations

import os
import random
import tempfile
import time

import pytest
import trio

from chaosutil import ChaosCrowd, SimChaos, chaos_seed, file_path, file_pattern
from proxyutil import Transitions, proxy_pace, run_proxy, task_count, wait_state_change
from qgaproxy import sim
from qgaproxy.upstream import State

CLIENTS = 64
DEPTH = 4
REQUEST_TIMEOUT = 1.0
#: Bounds on waits: they only turn a hang into a failure.
STEP = 30.0


def figures(name: str, **values) -> None:
    print("\n[chaos] %s: %s" % (name, ", ".join("%s=%s" % kv for kv in values.items())), flush=True)


async def test_chaos_simulated_agent():
    seed = chaos_seed()
    duration = float(os.environ.get("QGAPROXY_CHAOS_SECONDS", "10"))
    print("\n[chaos] seed %d (replay: QGAPROXY_CHAOS_SEED=%d), %gs of faults" % (seed, seed, duration), flush=True)
    rng = random.Random(seed)
    agent = sim.SimAgent(sim.SimConfig(received_limit=10_000))
    for i in range(CLIENTS):
        name = "c%03d" % i
        agent.put_file(file_path(name), file_pattern(name))
    tmp = tempfile.mkdtemp(prefix="qgaproxy-chaos-")
    agent_path = os.path.join(tmp, "agent.sock")
    async with trio.open_nursery() as outer:
        await outer.start(sim.serve_unix, agent, agent_path)
        async with run_proxy("unix:" + agent_path, request_timeout=REQUEST_TIMEOUT, sync_timeout=0.5,
                             backoff_min=0.05, backoff_max=0.5) as proxy:
            await wait_state_change(proxy, State.READY, timeout=STEP, what="first sync")
            tasks_idle = task_count()
            transitions = Transitions(proxy)
            chaos = SimChaos(agent, rng, request_timeout=REQUEST_TIMEOUT)
            async with trio.open_nursery() as nursery:
                crowd = ChaosCrowd(nursery, proxy.config.listen[0], CLIENTS, depth=DEPTH,
                                   call_bound=STEP, pace=lambda: proxy_pace(proxy))
                await chaos.run(duration)
                cleared = time.monotonic()
                await wait_state_change(proxy, State.READY, timeout=STEP, what="ready after the faults")
                await crowd.all_served_since(cleared, STEP, "every client served after the faults")
                tally = await crowd.stop(STEP)
            # Nothing left behind once the clients are gone (the proxy closes
            # the files they left open: wait for those requests too).
            router = proxy.router
            with trio.fail_after(STEP):
                while router.clients or proxy._sessions or router.in_flight() or router.queued() \
                        or task_count() > tasks_idle:
                    await trio.sleep(0.01)
            recoveries = sum(1 for _, _, new, _ in transitions.log if new is State.READY)
            stale = router.stale_replies
        outer.cancel_scope.cancel()
    os.rmdir(tmp)
    mismatches = crowd.mismatches()
    figures("simulated agent", seed=seed, clients=CLIENTS, requests=sum(tally.values()),
            faults=sum(chaos.counts.values()), recoveries=recoveries, mismatches=len(mismatches),
            stale_replies_dropped=stale)
    figures("replies", **dict(sorted(tally.items())))
    figures("faults", **dict(sorted(chaos.counts.items())))
    assert not mismatches, "seed %d: %d mismatches, first: %s" % (seed, len(mismatches), mismatches[:5])
    assert tally["ok"] > 0 and sum(chaos.counts.values()) > 0
    assert recoveries > 0, transitions.describe()


# -- the checker catches what it is there to catch -------------------------------------------


def sabotage(router, every: int, same_client: bool) -> list[int]:
    """Make the proxy wrong on purpose, every `every`-th reply: hold it
    back and swap it with the next reply for another client; or
    (same_client) swap it with a later reply of the same client already
    waiting behind it (out of order). Returns a one-item list counting the
    swaps."""
    original = router._fill
    held: list = []
    state = {"n": 0}
    swaps = [0]

    def fill(client, slot, data, command=None):
        if client.internal or not data or client.gone:
            return original(client, slot, data, command)
        if held and held[0][0] is not client:
            other = held.pop()
            swaps[0] += 1
            original(client, slot, other[2], command)
            return original(other[0], other[1], data, other[3])
        state["n"] += 1
        if state["n"] % every == 0:
            if same_client:
                waiting = [s for s in client.slots if s is not slot and s.data]
                if waiting:
                    swaps[0] += 1
                    data, waiting[0].data = waiting[0].data, data
            elif not held:
                held.append((client, slot, data, command))
                return None
        return original(client, slot, data, command)

    router._fill = fill
    return swaps


@pytest.mark.parametrize("same_client", [False, True], ids=["across-clients", "out-of-order"])
async def test_checker_catches_misrouted_replies(same_client):
    """A proxy that swaps one reply in 97 between two clients, or within
    one client, is caught: the chaos checker would not pass a broken
    proxy."""
    agent = sim.SimAgent(sim.SimConfig(received_limit=10_000))
    for i in range(8):
        name = "c%03d" % i
        agent.put_file(file_path(name), file_pattern(name))
    async with run_proxy("sim", sim_agent=agent, request_timeout=REQUEST_TIMEOUT) as proxy:
        await wait_state_change(proxy, State.READY, timeout=STEP, what="first sync")
        swaps = sabotage(proxy.router, 97, same_client)
        async with trio.open_nursery() as nursery:
            crowd = ChaosCrowd(nursery, proxy.config.listen[0], 8, depth=DEPTH, call_bound=5.0)
            await crowd.until(lambda: swaps[0] >= 40, STEP, "40 swapped replies")
            await crowd.stop(STEP)
    mismatches = crowd.mismatches()
    print("\n[chaos] sabotage (%s): %d swaps, %d mismatches, e.g. %s"
          % ("out of order" if same_client else "across clients", swaps[0], len(mismatches), mismatches[:1]))
    # Each swap gives two requests a reply that is not theirs: both caught,
    # whatever their ids and commands.
    assert swaps[0] >= 40 and len(mismatches) == 2 * swaps[0], mismatches
