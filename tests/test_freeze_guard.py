"""The freeze guard: a guest must not stay frozen because the client that
froze it went away, took too long, or belonged to a proxy that restarted;
while frozen, the commands the agent refuses are refused by the proxy
with the agent's own text, without a round trip.

Simulated agent under MockClock (freezing needs root in the guest: the
real agent here runs as nobody with every fsfreeze command blocked).
"""

from __future__ import annotations

import logging

import trio
import trio.testing

from proxyutil import Client, Watch, metric, run_proxy, wait_ready
from qgaproxy import sim

STEP = 10.0
THAWS = "qgaproxy_freeze_guard_thaws_total"
FROZEN = "qgaproxy_guest_frozen"


def asked(agent: sim.SimAgent, command: str) -> int:
    return sum(1 for r in agent.received if isinstance(r.value, dict) and r.value.get("execute") == command)


def frozen_refusal(command: str, ident: bytes | None) -> bytes:
    """qemu-ga's reply to a command its freeze disabled (qga/main.c
    ga_disable_non_allowlisted: qmp_disable_command with this reason)."""
    body = (b'"error": {"class": "CommandNotFound", "desc": "Command %s has been disabled: '
            b'the agent is in frozen state"}}\n' % command.encode())
    return (b'{"id": ' + ident + b", " if ident is not None else b"{") + body


async def raw_call(client: Client, payload: bytes) -> bytes:
    await client.send(payload)
    with trio.fail_after(STEP):
        return await client.read_line()


async def settled(client: Client) -> None:
    """One round trip: the proxy's own start-up request (guest-fsfreeze-status)
    has been answered before the test counts what the agent received."""
    assert await client.call("guest-ping") == {"return": {}}


async def test_owner_killed_while_frozen(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    agent = sim.SimAgent()
    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as other:
            await settled(other)
            assert metric(proxy, FROZEN) in (None, 0.0)
            backup = await Client.connect(path)
            assert await backup.call("guest-fsfreeze-freeze", id="f") == {"return": 2, "id": "f"}
            assert agent.frozen
            assert metric(proxy, FROZEN) == 1.0
            assert proxy.router.freeze.owner is proxy.router.clients[-1]
            await backup.aclose()  # killed: its connection just ends
            await watch.until(lambda: not agent.frozen and not proxy.router.freeze.frozen, STEP,
                              "the proxy's thaw", lambda: "received: %r" % [r.value for r in agent.received[-5:]])
            assert asked(agent, "guest-fsfreeze-thaw") == 1
            assert ("guest-fsfreeze-thaw", True, "ok") in watch.internal
            assert metric(proxy, THAWS, reason="owner gone") == 1.0
            assert metric(proxy, FROZEN) == 0.0
            assert await other.call("guest-fsfreeze-status") == {"return": "thawed"}
            assert "return" in await other.call("guest-get-osinfo", id=1)  # not refused any more
    messages = [r.getMessage() for r in caplog.records]
    assert "freeze guard: thawing the guest: the client that froze the guest disconnected" in messages
    assert any(m.startswith("guest filesystems frozen by client ") for m in messages), messages
    assert "guest filesystems thawed" in messages


async def test_frozen_too_long(autojump_clock):
    agent = sim.SimAgent()
    async with run_proxy("sim", sim_agent=agent, freeze_max=30.0) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        async with await Client.connect(proxy.config.listen[0]) as backup:
            await settled(backup)
            assert await backup.call("guest-fsfreeze-freeze") == {"return": 2}
            frozen_at = trio.current_time()
            # still connected, still frozen just before the limit
            await trio.sleep_until(frozen_at + 29.0)
            assert agent.frozen and asked(agent, "guest-fsfreeze-thaw") == 0
            assert await backup.call("guest-fsfreeze-status") == {"return": "frozen"}
            # at the limit the proxy thaws, although the owner is still there
            with trio.fail_after(2.0):
                await watch.until(lambda: not agent.frozen and not proxy.router.freeze.frozen, STEP,
                                  "the thaw after freeze_max")
            assert asked(agent, "guest-fsfreeze-thaw") == 1
            assert metric(proxy, THAWS, reason="too long") == 1.0
            assert metric(proxy, THAWS, reason="owner gone") is None
            assert metric(proxy, FROZEN) == 0.0
            # the owner's own late thaw is harmless: nothing was frozen any more
            assert await backup.call("guest-fsfreeze-thaw") == {"return": 0}
            assert "return" in await backup.call("guest-get-osinfo")
        # and its departure asks for no further thaw
        await watch.until(lambda: not proxy.router.clients, STEP, "the client gone")
        await trio.testing.wait_all_tasks_blocked()
        assert asked(agent, "guest-fsfreeze-thaw") == 2  # the proxy's and the owner's own
        assert metric(proxy, THAWS, reason="owner gone") is None


async def test_refused_while_frozen_without_a_round_trip(autojump_clock):
    # The agent's own text, from the agent itself (frozen, asked directly).
    reference = sim.SimAgent(sim.SimConfig(files={"/etc/hostname": b"vm\n"}))
    assert await direct_sim(reference, b'{"execute": "guest-fsfreeze-freeze"}') == b'{"return": 2}\n'
    expected = {}
    for command, payload in (
        ("guest-get-osinfo", b'{"execute": "guest-get-osinfo", "id": 7}'),
        ("guest-file-open", b'{"execute": "guest-file-open", "arguments": {"path": "/etc/hostname"}, "id": "o"}'),
        ("guest-exec", b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}}'),
        ("guest-fsfreeze-freeze", b'{"execute": "guest-fsfreeze-freeze", "id": [1]}'),
    ):
        expected[command] = (payload, await direct_sim(reference, payload))
    assert expected["guest-get-osinfo"][1] == frozen_refusal("guest-get-osinfo", b"7")
    assert expected["guest-file-open"][1] == frozen_refusal("guest-file-open", b'"o"')
    assert expected["guest-exec"][1] == frozen_refusal("guest-exec", None)

    agent = sim.SimAgent(sim.SimConfig(files={"/etc/hostname": b"vm\n"}))
    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as backup, await Client.connect(path) as monitor:
            await settled(monitor)
            assert await backup.call("guest-fsfreeze-freeze") == {"return": 2}
            before = len(agent.received)
            for command, (payload, reply) in expected.items():
                for client in (monitor, backup):
                    assert await raw_call(client, payload) == reply, command
            assert len(agent.received) == before, [r.value for r in agent.received[before:]]
            # what the agent still runs while frozen goes through
            assert await raw_call(monitor, b'{"execute": "guest-ping", "id": 1}') == b'{"return": {}, "id": 1}\n'
            assert await monitor.call("guest-fsfreeze-status") == {"return": "frozen"}
            info = await monitor.call("guest-info")
            assert info["return"]["version"] == sim.VERSION
            assert [r.value["execute"] for r in agent.received[before:]] == [
                "guest-ping", "guest-fsfreeze-status", "guest-info"]
            # thawed: the same commands reach the agent again
            assert await backup.call("guest-fsfreeze-thaw") == {"return": 2}
            reply = await monitor.call("guest-file-open", {"path": "/etc/hostname"})
            assert type(reply["return"]) is int
            assert await monitor.call("guest-file-close", {"handle": reply["return"]}) == {"return": {}}


async def direct_sim(agent: sim.SimAgent, payload: bytes) -> bytes:
    """One request straight to a simulated agent: its own reply."""
    import socket

    ours, theirs = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.serve, theirs)
        reply = await raw_call(Client(ours), payload)
        await ours.aclose()
    return reply


async def test_owner_thaws_itself(autojump_clock):
    agent = sim.SimAgent()
    async with run_proxy("sim", sim_agent=agent, freeze_max=30.0) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        backup = await Client.connect(proxy.config.listen[0])
        await settled(backup)
        assert await backup.call("guest-fsfreeze-freeze") == {"return": 2}
        assert metric(proxy, FROZEN) == 1.0
        assert await backup.call("guest-fsfreeze-thaw") == {"return": 2}
        assert not agent.frozen and not proxy.router.freeze.frozen
        assert metric(proxy, FROZEN) == 0.0
        await backup.aclose()
        await watch.until(lambda: not proxy.router.clients, STEP, "the client gone")
        # long past freeze_max: nothing more happens
        await trio.sleep(60)
        await trio.testing.wait_all_tasks_blocked()
        assert asked(agent, "guest-fsfreeze-thaw") == 1
        assert [r for r in watch.internal if r[0] == "guest-fsfreeze-thaw"] == []
        assert metric(proxy, THAWS, reason="owner gone") is None
        assert metric(proxy, THAWS, reason="too long") is None


async def test_proxy_restarted_while_frozen(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    agent = sim.SimAgent()
    # A first proxy: a client freezes, then that proxy stops (its client
    # still connected, no chance to thaw).
    async with run_proxy("sim", sim_agent=agent) as first:
        await wait_ready(first)
        backup = await Client.connect(first.config.listen[0])
        assert await backup.call("guest-fsfreeze-freeze") == {"return": 2}
    assert agent.frozen
    assert asked(agent, "guest-fsfreeze-thaw") == 0
    await backup.aclose()
    caplog.clear()
    # A new proxy on the same agent finds it frozen by nobody it knows.
    async with run_proxy("sim", sim_agent=agent) as second:
        watch = Watch(second)
        await wait_ready(second)
        await watch.until(lambda: not agent.frozen and not second.router.freeze.frozen, STEP, "the new proxy's thaw")
        assert asked(agent, "guest-fsfreeze-thaw") == 1
        assert metric(second, THAWS, reason="no owner") == 1.0
        assert metric(second, FROZEN) == 0.0
        async with await Client.connect(second.config.listen[0]) as c:
            assert await c.call("guest-fsfreeze-status") == {"return": "thawed"}
    messages = [r.getMessage() for r in caplog.records]
    assert "freeze guard: thawing the guest: the guest is frozen and no client owns the freeze" in messages
    assert "guest filesystems frozen by no client of ours" in messages


async def test_owner_gone_before_the_freeze_reply(autojump_clock):
    """The freeze is still running in the agent (it flushes every
    filesystem: Proxmox allows it an hour) when its client disappears
    (here: it closes with a reply unread, which the proxy sees as a reset).
    When the freeze completes nobody owns it: the proxy must thaw then, not
    leave the guest frozen until freeze_max."""
    agent = sim.SimAgent(sim.SimConfig(late={"guest-fsfreeze-freeze": 3.0}))
    async with run_proxy("sim", sim_agent=agent, freeze_max=600.0) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as other:
            await settled(other)
            backup = await Client.connect(path)
            await backup.send(b'{"execute": "guest-ping"}{"execute": "guest-fsfreeze-freeze"}')
            await trio.testing.wait_all_tasks_blocked()
            assert agent.frozen and proxy.router.in_flight() == 1  # frozen; the reply comes 3 s later
            await backup.aclose()
            await watch.until(lambda: len(proxy.router.clients) == 1, STEP, "the client removed")
            await watch.until(lambda: proxy.router.in_flight() == 0, STEP, "the freeze's reply")
            try:
                await watch.until(lambda: not agent.frozen, 60.0, "a thaw")
            except AssertionError:
                raise AssertionError(
                    "the guest stays frozen (freeze guard: frozen=%s, owner=%r gone=%s); it would be thawed "
                    "only after freeze_max (%g s)" % (
                        proxy.router.freeze.frozen,
                        getattr(proxy.router.freeze.owner, "number", None),
                        getattr(proxy.router.freeze.owner, "gone", None),
                        proxy.router.freeze.max_seconds,
                    )
                ) from None
            assert asked(agent, "guest-fsfreeze-thaw") == 1
