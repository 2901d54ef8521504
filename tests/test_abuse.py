"""Abusive clients against a real proxy process (`python -m qgaproxy serve`)
in front of the simulated agent on a unix socket, while well-behaved
clients keep being served.

First 10,000 idle connections (some holding half a request; the test
raises its RLIMIT_NOFILE soft limit for them, which the proxy inherits, or
skips if the hard limit forbids), then, while they stay open and for a
bounded time, all at once: clients that pipeline requests and never read,
slowloris clients sending requests a byte at a time, connect-and-close
loops (closing at every point of a conversation), 0xFF floods, a flood of
stray closers (an error reply per byte), oversize messages, deeply nested
and random garbage. Meanwhile well-behaved clients (tests/chaosutil.py
ChaosClient: every reply checked against its request) must get every reply,
none timed out (the request timeout is generous; nothing here asserts a
latency), and a new client connecting while the 10,000 are open is served.
Afterwards the proxy is alive, exits 0 on SIGTERM, and its descriptors are
back to what they were before the abuse.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest
import trio

from chaosutil import ChaosCrowd, file_path, file_pattern
from proxyutil import Client, ProxyProcess, connect_unix, fd_count

IDLE_CONNECTIONS = 10_000
WELL_BEHAVED = 12
ABUSE_SECONDS = 8.0
SLOWLORIS = 100
MAX_MESSAGE = 1 << 20  # the proxy's limit here (cheaper to exceed than 64 MiB)
#: Bounds on waits: they only turn a hang into a failure.
STEP = 60.0
#: Descriptors the test process needs beyond the idle connections (the
#: agent, the abusers, the well-behaved clients, Python itself).
SPARE_FDS = 1024


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip("RLIMIT_NOFILE hard limit %d < %d needed for %d connections" % (hard, need, IDLE_CONNECTIONS))
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class Abuse:
    """Counters of what the abusers did and saw."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.problems: list[str] = []

    def add(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


async def _connect(path: str) -> trio.SocketStream:
    with trio.fail_after(STEP):
        return await connect_unix(path)


async def until_stop(stop: trio.Event, fn, *args) -> None:
    """Run fn(*args, stop, ...) and cancel it once stop is set (wherever it
    is blocked: a proxy that stopped reading it, say)."""
    async with trio.open_nursery() as nursery:
        async def watch():
            await stop.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await fn(*args)
        nursery.cancel_scope.cancel()


def idle_connections(path: str, n: int, held: list) -> None:
    """n connections that send nothing, or half a request, and stay
    (blocking connects in a thread of their own: a blocking connect to a
    unix socket waits for room in the listen backlog)."""
    rng = random.Random(1)
    for i in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        held.append(s)
        if rng.random() < 0.2:
            s.sendall(b'{"execute": "guest-ping", "id": %d' % i)


async def never_reads(path: str, stop: trio.Event, abuse: Abuse) -> None:
    """Pipelines big replies and never reads; reconnects when dropped."""
    request = b'{"execute": "guest-info", "id": "never-reads"}\n' * 64
    while not stop.is_set():
        stream = await _connect(path)
        try:
            while not stop.is_set():
                await stream.send_all(request)
                abuse.add("never-read requests sent", 64)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            abuse.add("never-read clients dropped by the proxy")
        finally:
            await trio.aclose_forcefully(stream)


async def slowloris(path: str, i: int, stop: trio.Event, abuse: Abuse) -> None:
    """A request a byte at a time with pauses; then its reply must come."""
    async with Client(await _connect(path)) as client:
        k = 0
        while not stop.is_set():
            ident = "slow-%d-%d" % (i, k)
            data = b'{"execute": "guest-ping", "id": "%s"}' % ident.encode()
            for b in range(len(data)):
                await client.send(data[b:b + 1])
                await trio.sleep(0.05)
            with trio.fail_after(STEP):
                reply = await client.reply()
            if reply != {"return": {}, "id": ident}:
                abuse.problems.append("slowloris got %r for %s" % (reply, ident))
            abuse.add("slowloris requests answered")
            k += 1


async def connect_and_close(path: str, stop: trio.Event, abuse: Abuse, seed: int) -> None:
    """Connect and leave at every point of a conversation."""
    rng = random.Random(seed)
    request = b'{"execute": "guest-get-host-name", "id": 1}\n'
    while not stop.is_set():
        stream = await _connect(path)
        how = rng.randrange(6)
        try:
            if how == 1:
                await stream.send_all(request[: rng.randrange(1, len(request))])
            elif how == 2:
                await stream.send_all(request * rng.randint(1, 20))
            elif how == 3:
                await stream.send_all(b"\xff" * rng.randint(1, 1000))
            elif how == 4:
                await stream.send_all(request)
                await stream.send_eof()  # half-close: the reply still comes
                with trio.fail_after(STEP):
                    data = b""
                    while chunk := await stream.receive_some(4096):
                        data += chunk
                if json.loads(data) != {"return": {"host-name": "qgasim"}, "id": 1}:
                    abuse.problems.append("half-closed client got %r" % data[:200])
            elif how == 5:
                await stream.send_all(request)
                await stream.receive_some(1)  # one byte of the reply, then gone
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
        abuse.add("connect-and-close")


async def ff_flood(path: str, stop: trio.Event, abuse: Abuse) -> None:
    """Megabytes of 0xFF, with half requests in between; never reads (0xFF
    gets no reply)."""
    chunk = b"\xff" * (256 << 10) + b'{"execute": "guest-ping", "id": "cut'
    async with Client(await _connect(path)) as client:
        while not stop.is_set():
            await client.send(chunk)
            abuse.add("0xFF bytes sent", len(chunk))
        # The flood answered nothing: a request now gets exactly its reply.
        await client.send(b'\xff{"execute": "guest-ping", "id": "after-flood"}')
        with trio.fail_after(STEP):
            reply = await client.reply()
        if reply != {"return": {}, "id": "after-flood"}:
            abuse.problems.append("after a 0xFF flood: %r" % reply)


async def error_flood(path: str, stop: trio.Event, abuse: Abuse) -> None:
    """64 KiB of stray closers at a time, each an error reply of its own,
    all read back (and all the same line)."""
    stream = await _connect(path)
    try:
        line = None
        while not stop.is_set():
            await stream.send_all(b"}" * (64 << 10))
            data = bytearray()
            lines = 0
            with trio.fail_after(STEP):
                while lines < (64 << 10):
                    chunk = await stream.receive_some(1 << 20)
                    if not chunk:
                        raise trio.BrokenResourceError("closed")
                    lines += chunk.count(b"\n")
                    data += chunk
            if line is None:
                line = data[: data.index(b"\n") + 1]
                if set(json.loads(line)) != {"error"}:
                    abuse.problems.append("a stray '}' got %r" % line)
            if data != line * (64 << 10):
                abuse.problems.append("stray closers: not one error each: %r" % data[:300])
            abuse.add("stray closers answered", 64 << 10)
    finally:
        await trio.aclose_forcefully(stream)


OVERSIZE_REPLY = {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}


async def oversize(path: str, stop: trio.Event, abuse: Abuse) -> None:
    """Messages over the limit: an error, then the connection closes."""
    big = b'{"execute": "guest-ping", "arguments": {"pad": "' + b"A" * (MAX_MESSAGE + 1000) + b'"}}'
    while not stop.is_set():
        stream = await _connect(path)
        client = Client(stream)
        try:
            await client.send(big)
            with trio.fail_after(STEP):
                reply = await client.reply()
                closed = await client.at_eof()
            if reply != OVERSIZE_REPLY or not closed:
                abuse.problems.append("oversize: %r, closed %s" % (reply, closed))
            abuse.add("oversize messages refused")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            abuse.add("oversize messages refused")  # closed while we still wrote
        finally:
            await client.aclose()


async def garbage(path: str, stop: trio.Event, abuse: Abuse, seed: int) -> None:
    """Deep nesting, random bytes, stray closers; reads what comes back."""
    rng = random.Random(seed)
    while not stop.is_set():
        async with Client(await _connect(path)) as client:
            kind = rng.randrange(3)
            if kind == 0:
                data = b"[" * 5000 + b"]" * 5000
            elif kind == 1:
                data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4000)))
            else:
                data = b"}}]]" * 100
            await client.send(data + b'\xff{"execute": "guest-ping", "id": "after-garbage"}')
            with trio.fail_after(STEP):
                while True:
                    reply = await client.reply()
                    if reply.get("id") == "after-garbage":
                        break
                    if "error" not in reply:
                        abuse.problems.append("garbage got a non-error reply: %r" % reply)
                        break
            abuse.add("garbage rounds")


async def test_abusive_clients_others_still_served():
    raise_nofile(IDLE_CONNECTIONS + SPARE_FDS)
    tmp = tempfile.mkdtemp(prefix="qgaproxy-abuse-")
    agent_path = os.path.join(tmp, "agent.sock")
    listen = os.path.join(tmp, "proxy.sock")
    config_path = os.path.join(tmp, "qgaproxy.toml")
    with open(config_path, "w") as f:
        f.write(textwrap.dedent("""\
            [log]
            level = "warning"
            [defaults]
            request_timeout = 60.0
            max_message_size = %d
            client_write_timeout = 3.0
            [defaults.command_timeouts]
            "guest-ping" = 60.0
            [[agent]]
            name = "abused"
            upstream = "unix:%s"
              [[agent.listener]]
              path = "%s"
              max_clients = %d
            """ % (MAX_MESSAGE, agent_path, listen, IDLE_CONNECTIONS + 1000)))
    # The agent in a process of its own too: what this process spends on
    # driving the abusers must not slow the agent down.
    agent_argv = [sys.executable, "-m", "qgaproxy.sim", "--listen", agent_path]
    for name in ["w%03d" % i for i in range(WELL_BEHAVED)] + ["n000"]:
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(file_pattern(name))
        agent_argv.append("--file=%s=@%s" % (file_path(name), os.path.join(tmp, name)))
    abuse = Abuse()
    held: list = []
    proxy = None
    agent_log = open(os.path.join(tmp, "agent.log"), "wb")
    agent = subprocess.Popen(agent_argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=agent_log, start_new_session=True)
    try:
        proxy = ProxyProcess(["--config", config_path], os.path.join(tmp, "proxy.log"), step=STEP)
        # Listening and served before the abuse starts (the agent is synced).
        with trio.fail_after(STEP):
            while True:
                assert proxy.proc.poll() is None, proxy.lines[-20:]
                try:
                    async with await Client.connect(listen) as c:
                        if "return" in await c.call("guest-ping"):
                            break
                except OSError:
                    pass  # not listening yet
                await trio.sleep(0.05)
        fds_idle = fd_count(proxy.pid)

        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            crowd = ChaosCrowd(nursery, listen, WELL_BEHAVED, prefix="w", depth=4, call_bound=STEP)
            # First the 10,000 (a thread of blocking connects), while the
            # well-behaved clients are served ...
            with trio.fail_after(STEP):
                await trio.to_thread.run_sync(idle_connections, listen, IDLE_CONNECTIONS, held)
            abuse.add("idle connections held", len(held))
            # ... and accepted by the proxy, all at once.
            with trio.fail_after(STEP):
                while (fds_peak := fd_count(proxy.pid)) < fds_idle + IDLE_CONNECTIONS:
                    await trio.sleep(0.05)
            # ... then, while they stay open, everything else at once.
            for i in range(8):
                nursery.start_soon(until_stop, stop, never_reads, listen, stop, abuse)
            for i in range(SLOWLORIS):
                nursery.start_soon(slowloris, listen, i, stop, abuse)
            for i in range(4):
                nursery.start_soon(until_stop, stop, connect_and_close, listen, stop, abuse, i)
            for i in range(2):
                nursery.start_soon(ff_flood, listen, stop, abuse)
            nursery.start_soon(until_stop, stop, error_flood, listen, stop, abuse)
            nursery.start_soon(until_stop, stop, oversize, listen, stop, abuse)
            for i in range(2):
                nursery.start_soon(until_stop, stop, garbage, listen, stop, abuse, i)
            # A newcomer is served while all that goes on.
            newcomer = ChaosCrowd(nursery, listen, 1, prefix="n", depth=2, call_bound=STEP)
            await newcomer.until(lambda: newcomer.tally()["ok"] >= 50, STEP, "a newcomer served")
            await trio.sleep(ABUSE_SECONDS)  # how long the abuse goes on (not a wait for a state)
            stop.set()
            for sock in held:
                sock.close()
            tally = await crowd.stop(STEP)
            tally_new = await newcomer.stop(STEP)
        alive = proxy.proc.poll() is None
        # Everyone gone: the proxy's descriptors are back to idle.
        with trio.fail_after(STEP):
            while (fds_after := fd_count(proxy.pid)) > fds_idle:
                await trio.sleep(0.1)
        rc = await trio.to_thread.run_sync(proxy.stop)
    finally:
        if proxy is not None and proxy.proc.poll() is None:
            proxy.stop()
        agent.terminate()
        agent.wait(STEP)
        agent_log.close()
    mismatches = crowd.mismatches() + newcomer.mismatches()
    print("\n[abuse] well-behaved: %s; newcomer: %s; mismatches %d"
          % (dict(tally), dict(tally_new), len(mismatches)))
    print("[abuse] abusers: %s" % abuse.counts)
    print("[abuse] proxy descriptors: idle %d, with the abusers %d, after %d; exit status %s"
          % (fds_idle, fds_peak, fds_after, rc))
    errors = [line for line in proxy.lines if "Traceback" in line or "ERROR" in line or "internal error" in line]
    assert alive and rc == 0, proxy.lines[-30:]
    assert not errors, errors[:10]
    assert not mismatches, mismatches[:5]
    assert not abuse.problems, abuse.problems[:5]
    # Every request of the well-behaved clients got its proper reply: no
    # timeouts, no "not available".
    assert set(tally) == {"ok"} and set(tally_new) == {"ok"}, (tally, tally_new)
    assert abuse.counts.get("idle connections held") == IDLE_CONNECTIONS
    assert fds_peak >= fds_idle + IDLE_CONNECTIONS
    for what in ("slowloris requests answered", "connect-and-close", "oversize messages refused",
                 "garbage rounds", "never-read requests sent", "never-read clients dropped by the proxy",
                 "0xFF bytes sent", "stray closers answered"):
        assert abuse.counts.get(what, 0) > 0, (what, abuse.counts)
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)
