"""The proxy end to end (trio shell, real unix sockets) against the
simulated agent, for the faults the real agent cannot produce on demand.
Time is trio's MockClock: a 5 s timeout takes no real time."""

from __future__ import annotations

import json

import pytest
import trio

from proxyutil import Client, Watch, run_proxy, wait_ready
from qgaproxy import sim
from qgaproxy.upstream import State

TIMEOUT_DESC = "Guest agent command '%s' timed out after %g seconds"


def agent(**knobs) -> sim.SimAgent:
    return sim.SimAgent(sim.SimConfig(**knobs))


def only_valid_requests_reached(a: sim.SimAgent) -> None:
    """Everything the agent parsed is a request the proxy built: an object
    with execute (a string), optional arguments (an object), and an id
    that is the proxy's own integer (or none for syncs)."""
    for received in a.received:
        value = received.value
        assert isinstance(value, dict), received
        assert set(value) <= {"execute", "arguments", "id"}, received
        assert isinstance(value["execute"], str), received
        assert isinstance(value.get("arguments", {}), dict), received
        if "id" in value:
            assert type(value["id"]) is int and value["id"] > 1 << 40, received


async def test_timeout_error_resync_late_reply_dropped_next_fine(autojump_clock):
    a = agent(late={"guest-fsfreeze-freeze": 8.0})
    async with run_proxy("sim", sim_agent=a, request_timeout=5.0) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            start = trio.current_time()
            reply = await c.call("guest-fsfreeze-freeze", id="mine")
            assert trio.current_time() - start == pytest.approx(5.0)
            assert reply == {
                "id": "mine",
                "error": {"class": "GenericError", "desc": TIMEOUT_DESC % ("guest-fsfreeze-freeze", 5)},
            }
            # the channel resyncs behind the slow command; its late reply
            # (at 8 s) matches nothing and is dropped
            await proxy.wait_state(State.READY)
            assert proxy.router.stale_replies == 1
            assert await c.call("guest-ping", id=2) == {"return": {}, "id": 2}
            # the late freeze happened in the guest, but its reply reached
            # no one: nobody owns that freeze, so the freeze guard thawed it
            assert await c.call("guest-fsfreeze-status") == {"return": "thawed"}
            assert any(r.value.get("execute") == "guest-fsfreeze-thaw" for r in a.received)
    only_valid_requests_reached(a)


async def test_hung_agent_becomes_unavailable_then_recovers(autojump_clock):
    a = agent(hang={"guest-fstrim"})
    async with run_proxy("sim", sim_agent=a, request_timeout=5.0, sync_timeout=1.0) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c, await Client.connect(
            proxy.config.listen[0]
        ) as other:
            reply = await c.call("guest-fstrim", id=1)
            assert reply["error"]["desc"] == TIMEOUT_DESC % ("guest-fstrim", 5)
            await proxy.wait_state(State.UNAVAILABLE)
            before = trio.current_time()
            reply = await other.call("guest-ping", id=7)
            assert trio.current_time() == before  # fast, not a wait
            assert reply["id"] == 7 and reply["error"]["desc"].startswith("Guest agent is not available")
            a.release()  # the hung command finishes; the queued syncs are answered
            await proxy.wait_state(State.READY)
            assert await other.call("guest-ping", id=8) == {"return": {}, "id": 8}


@pytest.mark.parametrize("mode", ["ignore", "reject"])
async def test_agent_without_id_echo(mode, autojump_clock):
    a = agent(id_mode=mode, latency=0.001)
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        assert not proxy.upstream.info.echoes_id
        results = {}

        async def client(n):
            async with await Client.connect(proxy.config.listen[0]) as c:
                for i in range(5):
                    await c.send({"execute": "guest-sync", "arguments": {"id": n * 100 + i}, "id": n})
                    await c.send({"execute": "guest-get-host-name", "id": [n, i]})
                got = [await c.reply() for _ in range(10)]
                results[n] = got

        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(client, n)
        for n, got in results.items():
            for i in range(5):
                assert got[2 * i] == {"return": n * 100 + i, "id": n}
                assert got[2 * i + 1] == {"return": {"host-name": "qgasim"}, "id": [n, i]}
    # one at a time: never two requests in flight, and no id sent to it
    assert all("id" not in r.value for r in a.received if r.value.get("execute") == "guest-get-host-name")


async def test_shutdown_no_reply_closes_sender_when_qemu_exits(autojump_clock):
    a = agent(goodbye="close", goodbye_delay=0.5)
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as sender, await Client.connect(path) as other:
            await sender.send({"execute": "guest-shutdown"})
            # no reply on success; when the channel closes, so does the sender
            with trio.fail_after(30):
                assert await sender.at_eof()
            assert sender.buf == b""
            # others are not closed; they get clear errors until it is back
            reply = await other.call("guest-ping", id=1)
            assert reply in ({"return": {}, "id": 1},) or reply["error"]["desc"].startswith(
                "Guest agent is not available"
            )
            await proxy.wait_state(State.READY)  # a new agent on the channel
            assert await other.call("guest-ping", id=2) == {"return": {}, "id": 2}


async def test_shutdown_failure_error_reaches_sender(autojump_clock):
    a = agent()
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            reply = await c.call("guest-shutdown", {"mode": "sideways"}, id=5)
            assert reply["id"] == 5 and "error" in reply
            assert await c.call("guest-ping", id=6) == {"return": {}, "id": 6}


async def test_upstream_goes_away_and_comes_back(autojump_clock):
    a = agent(close_after=6)  # per connection: stray error, sync, guest-info, 3 pings
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            answered = 0
            for i in range(20):
                reply = await c.call("guest-ping", id=i)
                assert reply["id"] == i
                if reply == {"return": {}, "id": i}:
                    answered += 1
                else:
                    assert reply["error"]["desc"].startswith("Guest agent is not available")
                    await proxy.wait_state(State.READY)
            assert answered >= 10
        assert a.connections >= 3


async def test_garbage_and_half_reply_on_connect_are_skipped(autojump_clock):
    for junk in (b"\x00garbage\n{]", sim.HALF_REPLY, b'{"return": 12345}\n', b'{"return": {}, "id": 1}\n'):
        a = agent(on_connect=junk)
        async with run_proxy("sim", sim_agent=a) as proxy:
            await wait_ready(proxy)
            async with await Client.connect(proxy.config.listen[0]) as c:
                assert await c.call("guest-ping", id=1) == {"return": {}, "id": 1}


async def test_bad_input_never_reaches_the_agent(autojump_clock):
    a = agent()
    bad = [
        b"}",
        b"[]",
        b'"x"',
        b"{}",
        b'{"id": 1}',
        b'{"execute": 1}',
        b'{"execute": "guest-ping", "arguments": []}',
        b'{"execute": "guest-ping", "foo": 1, "id": 3}',
        b'{"exec-oob": "guest-ping"}',
        b'{"execute": "guest-ping", "arguments": {"a": "\xc3\x28"}}',
        b"\xfe\xfe",
        b'{"execute": "guest-ping"' + b"\xff",
        b"[" * 1025,
    ]
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            for data in bad:
                await c.send(data + b"\n")
            await c.send(b'{"execute": "guest-ping", "id": "after"}')
            lines = []
            while True:
                reply = await c.reply()
                lines.append(reply)
                if reply.get("id") == "after":
                    break
            assert lines[-1] == {"return": {}, "id": "after"}
            assert all("error" in r for r in lines[:-1])
    only_valid_requests_reached(a)
    executed = [r.value["execute"] for r in a.received if "id" in r.value]
    # the proxy's own: guest-info (learning), guest-fsfreeze-status (the
    # freeze guard); the client's: only its one valid request
    assert executed == ["guest-info", "guest-fsfreeze-status", "guest-ping"]


async def test_client_that_never_reads_does_not_hold_up_others(autojump_clock):
    a = agent(latency=0.001)
    async with run_proxy("sim", sim_agent=a, client_backlog=8, client_write_timeout=30.0) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        hog = await trio.open_unix_socket(path)
        payload = json.dumps({"execute": "guest-get-osinfo"}).encode() * 200

        async def flood():
            try:
                await hog.send_all(payload * 200)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            async with await Client.connect(path) as c:
                for i in range(50):
                    assert await c.call("guest-ping", id=i) == {"return": {}, "id": i}
            # the hog is disconnected once its replies sat unread too long
            with trio.fail_after(300):
                while proxy.router.clients and any(cl.number == 1 for cl in proxy.router.clients):
                    await trio.sleep(1)
            nursery.cancel_scope.cancel()
        await hog.aclose()


async def test_flooding_client_does_not_starve_another(autojump_clock):
    a = agent(latency=0.01)
    async with run_proxy("sim", sim_agent=a, window=1) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as flood, await Client.connect(path) as polite:
            await flood.send(b'{"execute": "guest-ping"}' * 40)
            start = trio.current_time()
            assert await polite.call("guest-ping", id=1) == {"return": {}, "id": 1}
            # served in its turn (round robin), not after the 40 queued pings
            assert trio.current_time() - start < 0.1
            for _ in range(40):
                await flood.reply()


async def test_one_read_of_one_byte_errors_stays_within_the_backlog(autojump_clock):
    """64 KiB of stray closers in one send: each byte is an error reply of
    its own. The proxy parses it a piece at a time, so the replies it owes
    stay within the backlog plus one piece (not 64K replies for one read,
    which also held every other client up while they were made), and the
    client still gets every one of them, in order, once it reads."""
    from qgaproxy.proxy import FEED_SIZE

    async with run_proxy("sim", sim_agent=agent()) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        router = proxy.router
        path = proxy.config.listen[0]
        async with await Client.connect(path) as flood, await Client.connect(path) as other:
            await flood.send(b"}" * (64 << 10))
            await watch.until(lambda: router.clients[0].backlog() > 0 and not router.can_read(router.clients[0]),
                              10, "the flooding client paused",
                              lambda: "backlog %s" % [c.backlog() for c in router.clients])
            hog = router.clients[0]
            assert hog.backlog() <= proxy.config.client_backlog + FEED_SIZE, hog.backlog()
            assert await other.call("guest-ping", id=1) == {"return": {}, "id": 1}
            error = json.loads(await flood.read_line())
            assert error == {"error": {"class": "GenericError", "desc": error["error"]["desc"]}}
            for _ in range((64 << 10) - 1):
                assert json.loads(await flood.read_line()) == error
            assert await flood.call("guest-ping", id=2) == {"return": {}, "id": 2}


async def test_sync_answered_locally_costs_no_round_trip(autojump_clock):
    a = agent()
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        before = len(a.received)
        async with await Client.connect(proxy.config.listen[0]) as c:
            await c.send(b'{"execute":"guest-sync-delimited","arguments":{"id":77}}\n')
            assert await c.read_line() == b'\xff{"return": 77}\n'
            assert await c.call("guest-sync", {"id": 78}) == {"return": 78}
        assert not [r for r in a.received[before:] if (r.value.get("arguments") or {}).get("id") in (77, 78)]


async def test_sentinel_from_client_flushes_partial_input(autojump_clock):
    a = agent()
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            await c.send(b'{"execute": "guest-pi\xff{"execute": "guest-ping", "id": 1}')
            assert await c.reply() == {"return": {}, "id": 1}


async def test_agent_stops_reading_requests_fail_fast_then_recover(autojump_clock):
    a = agent()
    async with run_proxy("sim", sim_agent=a, request_timeout=5.0) as proxy:
        await wait_ready(proxy)
        a.stop_reading()
        async with await Client.connect(proxy.config.listen[0]) as c:
            reply = await c.call("guest-ping", id=1)
            assert reply["error"]["desc"] == TIMEOUT_DESC % ("guest-ping", 5)
            await proxy.wait_state(State.UNAVAILABLE)
            reply = await c.call("guest-ping", id=2)
            assert reply["error"]["desc"].startswith("Guest agent is not available")
            a.resume()
            await proxy.wait_state(State.READY)
            assert await c.call("guest-ping", id=3) == {"return": {}, "id": 3}


async def test_falls_back_to_guest_sync_without_the_delimited_command(autojump_clock):
    a = agent(blocked={"guest-sync-delimited"})
    async with run_proxy("sim", sim_agent=a) as proxy:
        await wait_ready(proxy)
        assert not proxy.upstream.use_delimited
        async with await Client.connect(proxy.config.listen[0]) as c:
            assert await c.call("guest-ping", id=1) == {"return": {}, "id": 1}
    syncs = [r.value["execute"] for r in a.received if r.value.get("execute", "").startswith("guest-sync")]
    assert syncs == ["guest-sync-delimited", "guest-sync"]


async def test_agent_started_late_is_served_at_once(autojump_clock):
    # QEMU accepts the socket while the guest boots; nothing reads it.
    a = agent(stop_reading=True)
    async with run_proxy("sim", sim_agent=a, sync_timeout=1.0, backoff_max=5.0) as proxy:
        await proxy.wait_state(State.UNAVAILABLE)
        async with await Client.connect(proxy.config.listen[0]) as c:
            before = trio.current_time()
            reply = await c.call("guest-ping", id=1)
            assert trio.current_time() == before
            assert reply["error"]["desc"].startswith("Guest agent is not available")
            await trio.sleep(30)  # many retries' worth of virtual time
            a.resume()  # the agent starts and reads what QEMU buffered
            up = trio.current_time()
            await proxy.wait_state(State.READY)
            assert trio.current_time() - up < 1.0
            assert await c.call("guest-ping", id=2) == {"return": {}, "id": 2}


async def test_busy_polling_only_while_the_agent_answers_within_it(autojump_clock):
    """A request to an idle agent that usually answers within busy_poll
    starts the spinner (the loop polls for the reply instead of sleeping);
    once the agent answers slower (an agent in a VM), it is not started."""
    a = agent(command_latency={})
    async with run_proxy("sim", sim_agent=a, busy_poll=0.002) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            before = proxy.busy_polls
            for i in range(10):
                assert await c.call("guest-ping", id=i) == {"return": {}, "id": i}
            assert proxy.busy_polls - before == 10
            a.config.command_latency["guest-ping"] = 0.05  # 25 times the budget
            for i in range(10):
                assert await c.call("guest-ping", id=i) == {"return": {}, "id": i}
            before = proxy.busy_polls
            for i in range(10):
                assert await c.call("guest-ping", id=i) == {"return": {}, "id": i}
            assert proxy.busy_polls == before


async def test_busy_polling_off(autojump_clock):
    async with run_proxy("sim", sim_agent=agent(), busy_poll=0.0) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            for i in range(5):
                assert await c.call("guest-ping", id=i) == {"return": {}, "id": i}
        assert proxy.busy_polls == 0


async def test_busy_polling_stops_for_a_reply_that_never_comes(autojump_clock):
    """The spinner keeps the event loop busy, so MockClock's autojump (which
    needs every task idle) could not reach the 5 s timeout if it spun on:
    the timeout reply arriving shows it stopped."""
    a = agent(drop={"guest-fsfreeze-status"})
    async with run_proxy("sim", sim_agent=a, busy_poll=0.002, request_timeout=5.0) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            reply = await c.call("guest-fsfreeze-status", id=1)
            assert reply["error"]["desc"] == TIMEOUT_DESC % ("guest-fsfreeze-status", 5)
            assert proxy.busy_polls >= 1
            await proxy.wait_state(State.READY)
            assert await c.call("guest-ping", id=2) == {"return": {}, "id": 2}


@pytest.mark.parametrize("freeze_status", ["enabled", "blocked"])
async def test_sync_sent_while_syncing_is_answered_when_ready(autojump_clock, freeze_status):
    """libvirt syncs first: a guest-sync that arrives while the proxy is still
    syncing the channel is answered by the proxy the moment the channel is
    ready (taking the upstream write answers it), not after some later event."""
    a = agent(latency=0.2, blocked={"guest-fsfreeze-status"} if freeze_status == "blocked" else ())
    async with run_proxy("sim", sim_agent=a) as proxy:
        async with await Client.connect(proxy.config.listen[0]) as c:
            assert proxy.upstream.state is not State.READY
            await c.send(b'{"execute":"guest-sync","arguments":{"id":42}}\n')
            ready_at = []

            async def note_ready():
                await proxy.wait_state(State.READY)
                ready_at.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(note_ready)
                assert await c.read_line() == b'{"return": 42}\n'
                replied_at = trio.current_time()
            assert replied_at == ready_at[0]


async def test_reader_paused_on_backlog_resumes_after_a_command_that_never_answers(autojump_clock):
    """With a backlog of one, a client's reader pauses behind guest-suspend-ram
    (which never answers on success). Its empty reply lowers the backlog
    without any output: the reader must still wake and read the next request."""
    a = agent(goodbye="none")
    async with run_proxy("sim", sim_agent=a, client_backlog=1) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            await c.send({"execute": "guest-suspend-ram"})
            await trio.sleep(1)  # (read on its own: the reader then pauses)
            await c.send({"execute": "guest-ping", "id": 1})
            with trio.fail_after(30):
                assert await c.reply() == {"return": {}, "id": 1}


async def test_a_client_that_cannot_be_watched_is_closed_and_only_it(autojump_clock, monkeypatch):
    """When the kernel refuses to watch a client's socket (the limit on
    epoll watches, no memory), that client is hung up on; the proxy and
    its other clients go on."""
    from qgaproxy.reactor import Reactor

    async with run_proxy("sim", sim_agent=agent()) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as good:
            assert await good.call("guest-ping", id=1) == {"return": {}, "id": 1}
            monkeypatch.setattr(Reactor, "watch", lambda self, fd, owner: False)
            async with await Client.connect(path) as refused:
                with trio.fail_after(10), pytest.raises(EOFError):
                    await refused.read_line()
            monkeypatch.undo()
            assert await good.call("guest-ping", id=2) == {"return": {}, "id": 2}
            async with await Client.connect(path) as later:
                assert await later.call("guest-ping", id=3) == {"return": {}, "id": 3}


async def test_a_failed_start_leaves_no_descriptors_open(tmp_path):
    """A listener that cannot be bound fails the start (a directory of
    agents retries it on every poll): nothing the proxy opened stays open."""
    import gc
    import os

    from qgaproxy.proxy import Proxy, ProxyConfig
    from qgaproxy.transport import UpstreamAddress

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for _ in range(5):
        proxy = Proxy(ProxyConfig(upstream=UpstreamAddress.parse("sim"), listen=(str(tmp_path / "no" / "x.sock"),)))
        with pytest.raises(ExceptionGroup) as failed:
            async with trio.open_nursery() as nursery:
                await proxy.start_serving(nursery)
        assert failed.group_contains(FileNotFoundError)
        del proxy
    gc.collect()
    assert open_fds() == before
