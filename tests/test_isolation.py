"""Isolation between clients: a file handle or an exec pid belongs to the
client that created it. Another client gets the agent's own error for a
handle or pid that does not exist (and nothing reaches the agent); a
client that leaves has the files it left open closed for it.

File handles against the real qemu-ga (the agent's log shows what it was
asked; after the proxy is gone a direct connection shows the handle is
closed); guest-exec (blocked in the real agent) and the timing cases
against the simulated agent under MockClock.
"""

from __future__ import annotations

import base64
import socket

import pytest
import trio
import trio.testing

from proxyutil import Client, Watch, run_proxy, wait_ready
from qgaproxy import sim
from realagent import readable_by_agent

STEP = 10.0

CONTENT = b"the first client's private file\n" + bytes(range(256)) * 4


@pytest.fixture
def readable_file():
    with readable_by_agent("private.bin", CONTENT) as path:
        yield path


def logged(agent, needle: bytes) -> int:
    return agent.log_path.read_bytes().count(needle)


async def raw_call(client: Client, payload: bytes) -> bytes:
    await client.send(payload)
    with trio.fail_after(STEP):
        return await client.read_line()


def file_requests(handle: int) -> dict[str, bytes]:
    """B's attempts on a handle, each with id "b"."""
    return {
        "guest-file-read": b'{"execute": "guest-file-read", "arguments": {"handle": %d, "count": 10}, "id": "b"}' % handle,
        "guest-file-seek": b'{"execute": "guest-file-seek", "arguments": {"handle": %d, "offset": 5, '
                           b'"whence": "set"}, "id": "b"}' % handle,
        "guest-file-write": b'{"execute": "guest-file-write", "arguments": {"handle": %d, "buf-b64": "eA=="}, '
                            b'"id": "b"}' % handle,
        "guest-file-flush": b'{"execute": "guest-file-flush", "arguments": {"handle": %d}, "id": "b"}' % handle,
        "guest-file-close": b'{"execute": "guest-file-close", "arguments": {"handle": %d}, "id": "b"}' % handle,
    }


NOWHERE = 987654  # a handle the agent never gave out


async def test_file_handles_are_private_and_closed_when_the_owner_leaves(real_agent, readable_file):
    # The agent's own answers for a handle that does not exist, measured on
    # a direct connection before the proxy connects.
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        direct = {name: conn.request(req + b"\n") for name, req in file_requests(NOWHERE).items()}
    for reply in direct.values():
        assert reply == (
            b'{"id": "b", "error": {"class": "GenericError", "desc": "handle \'%d\' has not been found"}}\n' % NOWHERE
        )

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        watch = Watch(proxy)
        path = proxy.config.listen[0]
        a = await Client.connect(path)
        async with await Client.connect(path) as b:
            with trio.fail_after(STEP):
                reply = await a.call("guest-file-open", {"path": readable_file, "mode": "r"}, id="a-open")
            handle = reply["return"]
            assert type(handle) is int, reply
            assert proxy.router.ownership.files == {handle: proxy.router.clients[0]}
            before = real_agent.log_path.read_bytes()

            # B tries A's handle every way: the agent's own not-found error.
            for name, request in file_requests(handle).items():
                got = await raw_call(b, request)
                assert got == direct[name].replace(str(NOWHERE).encode(), str(handle).encode()), name
            # None of it reached the agent: after a request of B's that did
            # (an open of a unique path), the log holds no file command on it.
            mark = "/nonexistent-iso-marker-%d" % id(b)
            reply = await b.call("guest-file-open", {"path": mark}, id="mark")
            assert "failed to open file" in reply["error"]["desc"]
            after = real_agent.log_path.read_bytes()
            assert mark.encode() in after
            new = after[len(before):]
            for name in file_requests(handle):
                assert b'"execute": "%s"' % name.encode() not in new, name

            # A still reads its file from the start: B's seek and close never happened.
            with trio.fail_after(STEP):
                reply = await a.call("guest-file-read", {"handle": handle, "count": 32}, id="a-read")
            assert base64.b64decode(reply["return"]["buf-b64"]) == CONTENT[:32], reply

            # A leaves without closing: the proxy closes the handle itself.
            await a.aclose()
            await watch.until(
                lambda: ("guest-file-close", True, "ok") in watch.internal,
                STEP,
                "the proxy's own guest-file-close",
                lambda: "internal results: %r" % watch.internal,
            )
            assert proxy.router.ownership.files == {}
            assert logged(real_agent, b'"execute": "guest-file-close", "arguments": {"handle": %d}' % handle) == 1
            # B is still served
            with trio.fail_after(STEP):
                assert await b.call("guest-ping", id=1) == {"return": {}, "id": 1}

    # The proxy is gone: ask the agent directly. The handle no longer exists.
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        got = conn.request(b'{"execute": "guest-file-read", "arguments": {"handle": %d}, "id": "b"}\n' % handle)
    assert got == direct["guest-file-read"].replace(str(NOWHERE).encode(), str(handle).encode())
    assert real_agent.alive()


# -- guest-exec (simulated agent) ----------------------------------------------------------


def agent_with(**knobs) -> sim.SimAgent:
    return sim.SimAgent(sim.SimConfig(**knobs))


async def direct_sim(agent: sim.SimAgent, payload: bytes) -> bytes:
    """One request straight to a simulated agent (no proxy): its own reply."""
    ours, theirs = socket.socketpair()
    ours = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.serve, theirs)
        client = Client(ours)
        reply = await raw_call(client, payload)
        await ours.aclose()
    return reply


def asked(agent: sim.SimAgent, command: str) -> list:
    return [r.value for r in agent.received if isinstance(r.value, dict) and r.value.get("execute") == command]


def invalid_pid(ident: bytes) -> bytes:
    return b'{"id": %s, "error": {"class": "GenericError", "desc": "Invalid parameter \'pid\'"}}\n' % ident


async def test_exec_status_cannot_be_stolen(autojump_clock):
    # The agent's own reply for a pid it does not know (or has forgotten).
    own = await direct_sim(agent_with(), b'{"execute": "guest-exec-status", "arguments": {"pid": 4000}, "id": "b"}')
    assert own == invalid_pid(b'"b"')

    agent = agent_with()
    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as a, await Client.connect(path) as b:
            reply = await a.call(
                "guest-exec", {"path": "/bin/echo", "arg": ["hello", "world"], "capture-output": True}, id="x"
            )
            pid = reply["return"]["pid"]
            # /bin/echo has exited already: without isolation B's poll would
            # take A's exit status (the agent forgets a process once reported).
            for _ in range(3):
                got = await raw_call(b, b'{"execute": "guest-exec-status", "arguments": {"pid": %d}, "id": "b"}' % pid)
                assert got == own
            assert asked(agent, "guest-exec-status") == []  # B never reached the agent
            assert pid in agent.processes

            status = await a.call("guest-exec-status", {"pid": pid}, id="a1")
            assert status["id"] == "a1"
            result = status["return"]
            assert result["exited"] is True and result["exitcode"] == 0, status
            assert base64.b64decode(result["out-data"]) == b"hello world\n"
            assert pid not in agent.processes
            assert len(asked(agent, "guest-exec-status")) == 1
            # A's second call: the agent's own error (it forgot the process).
            again = await raw_call(a, b'{"execute": "guest-exec-status", "arguments": {"pid": %d}, "id": "a2"}' % pid)
            assert again == invalid_pid(b'"a2"')
            assert await direct_sim(
                agent_with(), b'{"execute": "guest-exec-status", "arguments": {"pid": %d}, "id": "a2"}' % pid
            ) == again
            # and B's error did not change either
            got = await raw_call(b, b'{"execute": "guest-exec-status", "arguments": {"pid": %d}, "id": "b"}' % pid)
            assert got == own


async def test_monitor_polling_a_running_job(autojump_clock):
    """A backup job runs for a while; a monitoring client polls the same
    pid all along. The owner still gets its exit status and output."""
    job = lambda args, stdin: sim.FakeRun(duration=10.0, exitcode=3, stdout=b"backup done\n", stderr=b"warn\n")
    agent = agent_with(programs={"/usr/local/bin/backup": job})
    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as a, await Client.connect(path) as b:
            pid = (await a.call("guest-exec", {"path": "/usr/local/bin/backup", "capture-output": True}))["return"]["pid"]
            polls = 0
            while True:
                got = await b.call("guest-exec-status", {"pid": pid}, id="mon")
                assert got == {"id": "mon", "error": {"class": "GenericError", "desc": "Invalid parameter 'pid'"}}
                status = (await a.call("guest-exec-status", {"pid": pid}))["return"]
                polls += 1
                if status["exited"]:
                    break
                assert status == {"exited": False}
                assert polls < 20, "the job never ended"
                await trio.sleep(1.0)  # the owner's polling interval (virtual time)
            assert polls > 5  # it really was polled while running
            assert status["exitcode"] == 3
            assert base64.b64decode(status["out-data"]) == b"backup done\n"
            assert base64.b64decode(status["err-data"]) == b"warn\n"
            assert proxy.router.ownership.pids == {}


# -- files left open (simulated agent) -----------------------------------------------------


async def test_files_left_open_are_closed_by_the_proxy(autojump_clock):
    agent = agent_with(files={"/srv/a.txt": b"aaa", "/srv/b.txt": b"bbb"})
    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as keep:
            a = await Client.connect(path)
            h1 = (await a.call("guest-file-open", {"path": "/srv/a.txt"}))["return"]
            h2 = (await a.call("guest-file-open", {"path": "/srv/b.txt", "mode": "r+"}))["return"]
            h3 = (await keep.call("guest-file-open", {"path": "/srv/a.txt"}))["return"]
            closed_h2 = await a.call("guest-file-close", {"handle": h2})
            assert closed_h2 == {"return": {}}
            h4 = (await a.call("guest-file-open", {"path": "/srv/b.txt"}))["return"]
            assert set(agent.handles) == {h1, h3, h4}
            await a.aclose()
            await watch.until(lambda: set(agent.handles) == {h3}, STEP, "A's handles closed",
                              lambda: "sim handles: %r" % agent.handles)
            closes = [v["arguments"]["handle"] for v in asked(agent, "guest-file-close")]
            assert sorted(closes) == sorted([h2, h1, h4])  # A's own close, then the proxy's two
            assert closes[0] == h2
            assert set(proxy.router.ownership.files) == {h3}
            # the other client's handle is untouched and still its own
            reply = await keep.call("guest-file-read", {"handle": h3})
            assert base64.b64decode(reply["return"]["buf-b64"]) == b"aaa"


async def test_file_opened_by_a_client_that_left_before_the_reply(autojump_clock):
    """The open is still running in the agent when its client disappears
    (here: it closes its connection with a reply unread, which the proxy
    sees as a reset). Nobody can ever use that handle: the proxy must
    close it once the agent's reply tells it the number."""
    agent = agent_with(files={"/srv/slow.txt": b"x"}, late={"guest-file-open": 2.0})
    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as other:
            assert await other.call("guest-ping") == {"return": {}}
            a = await Client.connect(path)
            await a.send(b'{"execute": "guest-ping"}{"execute": "guest-file-open", "arguments": {"path": "/srv/slow.txt"}}')
            # The ping's reply is in A's socket, unread; the open ran in the
            # agent, whose reply comes 2 s later.
            await trio.testing.wait_all_tasks_blocked()
            assert len(asked(agent, "guest-file-open")) == 1 and len(agent.handles) == 1
            assert proxy.router.in_flight() == 1
            (handle,) = agent.handles
            await a.aclose()
            await watch.until(lambda: len(proxy.router.clients) == 1, STEP, "A removed")
            assert proxy.router.in_flight() == 1  # A left before the reply
            await watch.until(lambda: proxy.router.in_flight() == 0, STEP, "the open's reply")
            # ... and the handle must not stay open in the guest for good.
            try:
                await watch.until(lambda: handle not in agent.handles, STEP, "the orphan handle closed")
            except AssertionError:
                raise AssertionError(
                    "handle %d, opened for a client that left before the reply, stays open in the guest "
                    "(ownership.files: %r)" % (handle, proxy.router.ownership.files)
                ) from None
            assert proxy.router.ownership.files == {}
