"""The simulated agent (qgaproxy/sim.py).

Two kinds of tests:

* differential: the same bytes go to the REAL qemu-ga 7.2 (tests/realagent.py,
  run as nobody) and to the sim, and what comes back must be the same bytes;
  only values that legitimately differ (host name, clock, handle numbers, pids,
  the guest's hardware) are normalised or compared by shape. Every conversation
  starts and ends with 0xFF + guest-sync-delimited, so each case's answer is
  exactly the bytes before the sync reply, parse errors about leftovers
  included. These skip when qemu-ga is missing (fail when CI=true).
* fault knobs, under trio's MockClock (autojump_clock): latency, hangs, late
  and dropped replies, id modes, garbage on connect, closes, stop-reading.
  Waiting is always for a reply or for a bounded stretch of virtual time in
  which nothing may arrive; never a sleep for state to settle.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import string
from pathlib import Path

import pytest
import trio
import trio.testing

import realagent
from realagent import RealAgent, require_real_agent

from qgaproxy import qjson
from qgaproxy.sim import (
    COMMANDS,
    FakeRun,
    HALF_REPLY,
    SimAgent,
    SimConfig,
    add_sim_arguments,
    config_from_args,
    serve_unix,
)

STRAY_FF = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'
CORPUS = Path(__file__).parent / "wire" / "qga-7.2.json"


def ping(ident: bytes | None = None) -> bytes:
    if ident is None:
        return b'{"execute": "guest-ping"}\n'
    return b'{"execute": "guest-ping", "id": ' + ident + b"}\n"


def cmd(execute: str, arguments: dict | None = None, **extra) -> bytes:
    body: dict = {"execute": execute}
    if arguments is not None:
        body["arguments"] = arguments
    body.update(extra)
    return json.dumps(body).encode() + b"\n"


# ---------------------------------------------------------------------------
# Talking to the sim and to the real agent


class SimClient:
    """The host end of one in-memory connection to a SimAgent."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()
        self._sync_id = 900_000

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(1 << 20)
        if not chunk:
            raise EOFError(bytes(self.buf))
        self.buf += chunk

    async def recv_lines(self, n: int = 1) -> bytes:
        end = 0
        with trio.fail_after(deadline()):
            for _ in range(n):
                while (i := self.buf.find(b"\n", end)) < 0:
                    await self._fill()
                end = i + 1
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    async def request(self, data: bytes, n: int = 1) -> bytes:
        await self.send(data)
        return await self.recv_lines(n)

    async def sync(self) -> bytes:
        """0xFF + guest-sync-delimited; returns the bytes before its reply."""
        self._sync_id += 1
        await self.send(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' % self._sync_id)
        mark = b'\xff{"return": %d}\n' % self._sync_id
        with trio.fail_after(deadline()):
            while (i := self.buf.find(mark)) < 0:
                await self._fill()
        out = bytes(self.buf[:i])
        del self.buf[: i + len(mark)]
        return out

    async def silent(self, seconds: float) -> None:
        """Nothing may arrive for `seconds` (of trio time)."""
        assert not self.buf, bytes(self.buf)
        with trio.move_on_after(seconds):
            await self._fill()
            raise AssertionError("unexpected bytes: %r" % bytes(self.buf))

    async def eof(self) -> bytes:
        """Read until the sim closes; return what came before."""
        with trio.fail_after(deadline()):
            while True:
                try:
                    await self._fill()
                except EOFError:
                    out = bytes(self.buf)
                    self.buf.clear()
                    return out


@contextlib.asynccontextmanager
async def connect(agent: SimAgent):
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.serve, server_stream)
        yield SimClient(client_stream)
        # Let the agent take in everything sent (it keeps it across
        # connections), then leave; a hung agent would never see the EOF.
        await trio.testing.wait_all_tasks_blocked()
        await client_stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


def deadline() -> float:
    """How long to wait for something that must come: long in virtual time,
    bounded in real time (so a broken test fails instead of hanging)."""
    return 1e9 if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock) else 30.0


class RealClient:
    """realagent.AgentConn (blocking) driven from trio through a thread."""

    def __init__(self, agent: RealAgent):
        self.conn = agent.connect(timeout=10)

    async def send(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self.conn.send, data)

    async def sync(self) -> bytes:
        return await trio.to_thread.run_sync(self.conn.sync)

    async def request(self, data: bytes, n: int = 1) -> bytes:
        return await trio.to_thread.run_sync(self.conn.request, data, n)

    def close(self) -> None:
        self.conn.close()  # everything was read: the agent stays up


def start_real(extra_allow=frozenset()) -> RealAgent:
    """A real agent that also allows `extra_allow` (still as user nobody).
    RealAgent blocks guest-exec and guest-fsfreeze-*; the tests that need
    them run only /bin/echo, /bin/true, /bin/false, a missing path, and
    guest-fsfreeze-freeze-list of a mount point that does not exist (which
    freezes nothing: nobody could not anyway)."""
    require_real_agent()
    allow = realagent.ALLOW | frozenset(extra_allow)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(realagent, "compute_blocklist", lambda cmds: [c for c in cmds if c not in allow])
        return RealAgent().start()


async def differential(real: RealAgent, sim: SimAgent, cases: list[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    """(input, real output, sim output) for each case, in one conversation."""
    rc = RealClient(real)
    out = []
    try:
        async with connect(sim) as sc:
            await rc.sync()
            await sc.sync()
            for case in cases:
                await rc.send(case)
                got_real = await rc.sync()
                await sc.send(case)
                got_sim = await sc.sync()
                out.append((case, got_real, got_sim))
    finally:
        rc.close()
    return out


def assert_same(results) -> None:
    bad = [(c, r, s) for c, r, s in results if r != s]
    assert not bad, "\n\n".join("input: %r\nreal:  %r\nsim:   %r" % x for x in bad)


@pytest.fixture(scope="module")
def real(real_agent_module) -> RealAgent:
    return real_agent_module


def sim_like(real: RealAgent, **kw) -> SimAgent:
    return SimAgent(SimConfig(blocked=frozenset(real.blocked), **kw))


# ---------------------------------------------------------------------------
# Differential: the dispatcher, the parser, sync, errors

ID_VALUES = [b"1", b"0", b"-5", b'"abc"', b'""', b"null", b"true", b"false", b"1.5", b"0.1", b"1.0",
             b"1e5", b"2.5e-8", b"-0.0", b"9223372036854775807", b"-9223372036854775808",
             b"18446744073709551615", b"18446744073709551616", b"1e400", b"[1, {}, []]",
             b'{"z": 1, "a": [null], "m": {"y": 2, "b": 3}}', b'"\\u00e9\\u20AC\\ud83d\\ude00"',
             b"'single'", b'"a\xc0\x80b"', b'"\x7f\\u0001"']

DISPATCH_CASES = [ping(v) for v in ID_VALUES] + [
    ping(),
    b'{"id": 1, "execute": "guest-ping"}',
    b'{"execute":"guest-ping","id":"__qmp#00000"}',
    b'{"execute": "guest-ping", "arguments": {}}',
    ping(b"1") + ping(b"2") + b"\r\n" + ping(b"3"),
    b'{"execute": "guest-info"}',
    b'{"execute": "guest-info", "id": {"b": 1, "a": 2}}',
    # sync and its argument errors
    b'{"execute": "guest-sync", "arguments": {"id": 123}}',
    b'{"execute": "guest-sync", "arguments": {"id": -9223372036854775808}, "id": "s"}',
    b'{"execute": "guest-sync-delimited", "arguments": {"id": 5}, "id": "x"}',
    b'{"execute": "guest-sync"}',
    b'{"execute": "guest-sync", "arguments": {}}',
    b'{"execute": "guest-sync", "arguments": {"id": "x"}}',
    b'{"execute": "guest-sync", "arguments": {"id": 1.5}, "id": 3}',
    b'{"execute": "guest-sync", "arguments": {"id": true}}',
    b'{"execute": "guest-sync", "arguments": {"id": null}}',
    b'{"execute": "guest-sync", "arguments": {"id": 9223372036854775808}}',
    b'{"execute": "guest-sync", "arguments": {"id": 1, "foo": 2}}',
    b'{"execute": "guest-sync-delimited"}',
    b'{"execute": "guest-sync-delimited", "arguments": {"id": "a"}, "id": 1}',
    b'{"execute": "guest-sync-delimited", "arguments": {"id2": 3, "id": 1}}',
    # which unexpected argument is named depends on the visitor's hash table
    b'{"execute": "guest-ping", "arguments": {"a": 1, "b": 2}}',
    b'{"execute": "guest-ping", "arguments": {"b": 1, "a": 2}}',
    b'{"execute": "guest-ping", "arguments": {"p\\u0000a": 1, "q": 2}}',
    b'{"execute": "guest-ping", "arguments": {"\xc3\xa9t\xc3\xa9": 1}}',
    # bad JSON, bad objects
    b"}", b"]", b'{"a" 1}', b"nul", b"tru\xffe", b"\x01", b"[1, 2]", b"1 ", b'"str"', b"{'execute': 'guest-ping'}",
    b'{"execute": "guest-ping",}', b'{"execute" "guest-ping"}', b"@", b'"\\x"', b'"\\ud800"',
    b'{"execute": 1}', b'{"execute": "guest-ping", "arguments": []}', b'{"execute": "guest-ping", "control": {}}',
    b'{"exec-oob": "guest-ping", "id": 4}', b'{"id": {"a": [1, 2.5, "x"]}}',
    b'{"execute": "guest-ping", "p\\u0000a": 1, "q": 2}',
    b'{"execute": "guest-ping", "execute": "guest-info"}', b'{"a": 1, "a": }', b'{"a": 1, "a": 2 3}',
    b'{"execute": "guest-ping", "id": {"b": 1, "b": 2}}',
    # nesting: 1024 levels are allowed (and echoed), 1025 are not
    ping(b"[" * 1023 + b"]" * 1023), ping(b"[" * 1024 + b"]" * 1024),
    # 0xFF and friends
    b"\xff", b"\xff\xff", b'{"execute": "gue\xff', b'{"execute": \xff', b'{"exec\xff{"execute": "guest-ping"}',
    b"abc\xff", b"\xfe", b'{"execute": "guest-ping"}\xfe', b'{"execute": "guest-pi',
    # unknown and disabled commands
    b'{"execute": "guest-nope"}', b'{"execute": "nope", "id": []}', b'{"execute": ""}',
    b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}, "id": 6}',
    b'{"execute": "guest-shutdown", "id": 7}', b'{"execute": "guest-get-devices"}',
    b'{"execute": "guest-fsfreeze-freeze"}', b'{"execute": "guest-set-time", "arguments": {"bogus": 1}}',
    # argument errors of file commands
    b'{"execute": "guest-file-read", "arguments": {"handle": "x"}}',
    b'{"execute": "guest-file-read", "arguments": {}}',
    b'{"execute": "guest-file-read", "arguments": {"handle": 987654}, "id": 1}',
    b'{"execute": "guest-file-read", "arguments": {"handle": 987654, "count": -1}}',
    b'{"execute": "guest-file-write", "arguments": {"handle": 987654, "buf-b64": "!!"}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 987654, "offset": 1}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 987654, "offset": 1, "whence": true}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 987654, "offset": 1, "whence": null}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 987654, "offset": 1, "whence": "foo"}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 987654, "offset": 1, "whence": 1.5}}',
    b'{"execute": "guest-file-seek", "arguments": {"handle": 987654, "offset": 1, "whence": "set", "x": 1}}',
    b'{"execute": "guest-file-close", "arguments": {"handle": 987654}}',
    b'{"execute": "guest-file-flush", "arguments": {"handle": 18446744073709551615}}',
    b'{"execute": "guest-file-open", "arguments": {"path": "/nonexistent/x"}}',
    b'{"execute": "guest-file-open", "arguments": {"path": "/etc/hostname", "mode": "x"}}',
    b'{"execute": "guest-file-open", "arguments": {"path": 1}}',
    b'{"execute": "guest-file-open", "arguments": {"mode": "r"}}',
]


@pytest.mark.real_agent
async def test_dispatch_matches_real_agent(real):
    assert_same(await differential(real, sim_like(real), DISPATCH_CASES))


@pytest.mark.real_agent
async def test_guest_info_is_the_real_list(real):
    """Same commands, order, enabled and success-response flags: byte for byte."""
    results = await differential(real, sim_like(real), [b'{"execute": "guest-info", "id": 1}'])
    assert_same(results)
    assert results[0][1].endswith(STRAY_FF)  # (the sync's own 0xFF)
    listed = json.loads(results[0][1].splitlines()[0])["return"]["supported_commands"]
    assert [(c["name"], c["success-response"]) for c in listed] == [(n, s) for n, s, _ in COMMANDS]


@pytest.mark.real_agent
async def test_unexpected_argument_named_like_real_agent(real):
    """The QAPI visitor names the first leftover member of a GLib hash table:
    random key sets (up to 40 members, so the table resizes) must agree."""
    rng = random.Random(7)
    alphabet = string.ascii_lowercase + string.digits + "-_"
    cases = []
    for n in list(range(1, 10)) * 4 + [17, 25, 40]:
        keys = {"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))): 1 for _ in range(n)}
        execute = rng.choice(["guest-ping", "guest-sync", "guest-get-vcpus"])
        if execute == "guest-sync":
            keys = {"id": 1, **keys}
        cases.append(cmd(execute, keys))
    assert_same(await differential(real, sim_like(real), cases))


def shape(value):
    """Types and member names, not values: for answers that describe the
    machine (host name, clock, interfaces)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


INFO_COMMANDS = ["guest-get-host-name", "guest-get-time", "guest-get-timezone", "guest-get-osinfo",
                 "guest-get-users", "guest-get-vcpus", "guest-network-get-interfaces", "guest-get-fsinfo",
                 "guest-get-disks", "guest-get-memory-block-info"]


@pytest.mark.real_agent
async def test_information_commands_have_the_real_shape(real):
    cases = [cmd(name, id=[name]) for name in INFO_COMMANDS]
    for case, got_real, got_sim in await differential(real, sim_like(real), cases):
        r, s = json.loads(got_real.splitlines()[0]), json.loads(got_sim.splitlines()[0])
        assert r["id"] == s["id"]
        assert shape(r["return"]) == shape(s["return"]), case
        # member order comes from the names alone: the same names, the same order
        assert list(r) == list(s)


# ---------------------------------------------------------------------------
# Differential: files, exec, frozen state


@pytest.mark.real_agent
async def test_file_commands_match_real_agent(real):
    """The same file in the real guest (a temp dir the agent may use) and in
    the sim's memory; handle numbers normalised."""
    content = bytes(range(256)) + b"hello world\nline2\n"
    path = real.tmpdir / "data.bin"
    path.write_bytes(content)
    path.chmod(0o644)
    new = str(real.tmpdir / "new.txt")
    sim = sim_like(real)
    sim.put_file(str(path), content)
    steps = [
        ("open", {"path": str(path)}),
        ("read", {"count": 0}),
        ("read", {"count": 5}),
        ("read", {}),
        ("read", {}),
        ("seek", {"offset": 0, "whence": "set"}),
        ("read", {"count": len(content)}),
        ("read", {"count": 1}),
        ("seek", {"offset": -10, "whence": "end"}),
        ("read", {"count": 100}),
        ("seek", {"offset": -1000, "whence": "cur"}),
        ("seek", {"offset": 3, "whence": 1}),
        ("seek", {"offset": 100, "whence": 2}),
        ("seek", {"offset": 1, "whence": 3}),
        ("read", {"count": 50331649}),
        ("read", {"count": -1}),
        ("write", {"buf-b64": "aGVsbG8="}),
        ("write", {"buf-b64": ""}),
        ("flush", {}),
        ("close", {}),
        ("close", {}),
        ("read", {}),
        ("open", {"path": new, "mode": "w+"}),
        ("write", {"buf-b64": "aGVsbG8="}),
        ("read", {}),
        ("write", {"buf-b64": "aGVsbG8=", "count": 3}),
        ("write", {"buf-b64": "aGVsbG8=", "count": 6}),
        ("write", {"buf-b64": "aGV\nsbG8"}),
        ("write", {"buf-b64": "a=b="}),
        ("write", {"buf-b64": "a"}),
        ("write", {"buf-b64": "aGVs bG8="}),
        ("write", {"buf-b64": "aGVs\u0000bG8="}),
        ("seek", {"offset": 0, "whence": "set"}),
        ("read", {}),
        ("seek", {"offset": 20, "whence": "set"}),
        ("write", {"buf-b64": "WFla"}),
        ("seek", {"offset": 0, "whence": "set"}),
        ("read", {"count": 100}),
        ("close", {}),
        ("open", {"path": new, "mode": "a"}),
        ("read", {}),
        ("read", {"count": 0}),
        ("seek", {"offset": 0, "whence": "cur"}),
        ("write", {"buf-b64": "WFla"}),
        ("seek", {"offset": 0, "whence": "cur"}),
        ("close", {}),
        ("open", {"path": new, "mode": "r"}),
        ("write", {"buf-b64": "WFla"}),
        ("close", {}),
        ("open", {"path": str(real.tmpdir)}),
        ("read", {}),
        ("close", {}),
        ("open", {"path": str(real.tmpdir), "mode": "w"}),
        ("open", {"path": str(real.tmpdir / "nodir" / "x"), "mode": "w"}),
        ("open", {"path": str(path) + "/x", "mode": "r"}),
        ("open", {"path": str(real.tmpdir / "missing")}),
        ("open", {"path": ""}),
        ("open", {"path": str(path) + "/"}),
        ("open", {"path": str(path) + "/", "mode": "a"}),
        ("open", {"path": str(real.tmpdir / "newdir") + "/", "mode": "w"}),
        ("open", {"path": str(real.tmpdir / "missing") + "/"}),
        ("open", {"path": new, "mode": "rb+"}),
        ("close", {}),
    ]
    rc = RealClient(real)
    try:
        async with connect(sim) as sc:
            await rc.sync()
            handles = {"real": None, "sim": None}
            for op, args in steps:
                outs = {}
                for side, client in (("real", rc), ("sim", sc)):
                    h = handles[side]
                    full = dict(args) if op == "open" else {"handle": h, **args}
                    got = await client.request(cmd("guest-file-" + op, full, id=op))
                    if op == "open" and b'"return"' in got:
                        handles[side] = h = json.loads(got)["return"]
                    if h is not None:
                        got = re.sub(rb"(\"return\": |handle ')%d\b" % h, rb"\1H", got)
                    outs[side] = got
                assert outs["real"] == outs["sim"], (op, args)
            assert await rc.sync() == await sc.sync() == STRAY_FF
    finally:
        rc.close()


@pytest.fixture(scope="module")
def exec_agent():
    agent = start_real({"guest-exec", "guest-exec-status", "guest-set-vcpus", "guest-set-memory-blocks"})
    try:
        yield agent
    finally:
        agent.stop()


async def run_to_exit(client, execute_args: dict) -> tuple[bytes, bytes, bytes]:
    """guest-exec, then guest-exec-status until exited, then once more.
    Returns (exec reply, final status, second status) with the pid replaced."""
    got = await client.request(cmd("guest-exec", execute_args, id="x"))
    if b'"error"' in got:
        return got, b"", b""
    pid = json.loads(got)["return"]["pid"]
    status = cmd("guest-exec-status", {"pid": pid}, id="s")
    with trio.fail_after(10):
        while b'"exited": false' in (final := await client.request(status)):
            pass  # the real child is still running: ask again
    again = await client.request(status)
    return got.replace(str(pid).encode(), b"P"), final, again


@pytest.mark.real_agent
async def test_exec_and_set_commands_match_real_agent(exec_agent):
    sim = sim_like(exec_agent)
    runs = [
        {"path": "/bin/echo", "arg": ["a", "b c"], "capture-output": True},
        {"path": "/bin/echo", "arg": ["no capture"]},
        {"path": "/bin/true", "capture-output": True},
        {"path": "/bin/false"},
        {"path": "/bin/cat", "input-data": "aGVsbG8=", "capture-output": True},
        {"path": "echo", "arg": ["searched", "in", "PATH"], "capture-output": True},
        {"path": "/nonexistent/prog"},
        {"path": "/bin/cat", "input-data": "!!"},
        {"path": "/bin/echo", "arg": ["a", 1]},
        {"path": "/bin/echo", "arg": "a"},
        {"path": "/bin/echo", "capture-output": "separated"},
        {"arg": []},
    ]
    rc = RealClient(exec_agent)
    try:
        async with connect(sim) as sc:
            for args in runs:
                assert await run_to_exit(rc, args) == await run_to_exit(sc, args), args
            for extra in ({"pid": 1}, {"pid": "x"}, {}):
                case = cmd("guest-exec-status", extra, id=1)
                assert await rc.request(case) == await sc.request(case)
            # and the set-commands' errors, none of which changes anything
            for case in (
                cmd("guest-set-vcpus", {"vcpus": []}),
                cmd("guest-set-vcpus", {"vcpus": [{"logical-id": 9999, "online": True}]}),
                cmd("guest-set-vcpus", {"vcpus": [{"logical-id": 1}]}),
                cmd("guest-set-vcpus", {"vcpus": [{"logical-id": 1, "online": True, "x": 1}]}),
                cmd("guest-set-vcpus", {"vcpus": [1]}),
                cmd("guest-set-memory-blocks", {"mem-blks": []}),
                cmd("guest-set-memory-blocks", {"mem-blks": [{"phys-index": -1, "online": True}]}),
                cmd("guest-set-memory-blocks", {"mem-blks": [{"phys-index": "x", "online": True}]}),
                cmd("guest-set-memory-blocks", {"mem-blks": [{"phys-index": 1.5, "online": True}]}),
            ):
                assert await rc.request(case) == await sc.request(case), case
    finally:
        rc.close()


@pytest.fixture
def freeze_agent():
    agent = start_real({"guest-fsfreeze-status", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw"})
    try:
        yield agent
    finally:
        agent.stop()


@pytest.mark.real_agent
async def test_blocked_commands_stay_frozen_after_thaw(freeze_agent):
    """A freeze disables every command outside the allow-list with "the agent
    is in frozen state"; a thaw re-enables only the unblocked ones, so
    blocked commands keep that reason. guest-fsfreeze-freeze-list of a mount
    point that does not exist sets and unsets the frozen state without
    freezing anything: the real agent shows it safely."""
    cases = [
        b'{"execute": "guest-set-time"}',
        b'{"execute": "guest-fsfreeze-status"}',
        b'{"execute": "guest-fsfreeze-thaw"}',
        cmd("guest-fsfreeze-freeze-list", {"mountpoints": ["/no/such/mount/point"]}),
        cmd("guest-fsfreeze-freeze-list", {"mountpoints": "x"}),
        b'{"execute": "guest-fsfreeze-status"}',
        b'{"execute": "guest-set-time", "id": 1}',
        b'{"execute": "guest-get-devices"}',
        b'{"execute": "guest-ping"}',
        b'{"execute": "guest-info"}',
    ]
    assert_same(await differential(freeze_agent, sim_like(freeze_agent), cases))


def _corpus_input(case) -> list[bytes] | None:
    """The case's input as the writes the capture made, or None."""
    if "input" in case:
        return [case["input"].encode("latin-1")]
    if "input_parts" in case:
        return [p.encode("latin-1") for p in case["input_parts"]]
    if "input_gen" in case:
        if case["input_len"] > (1 << 30 if os.environ.get("QGASIM_SLOW") else 2 << 20):
            return None  # 64 MiB and 2M-token inputs: QGASIM_SLOW=1 to include them
        return [b"".join(
            g["text"].encode("latin-1") if "text" in g else g["repeat"].encode("latin-1") * g["count"]
            for g in case["input_gen"]
        )]
    return None


async def test_captured_corpus_replays_on_the_sim():
    """tests/wire/qga-7.2.json: the real agent's answers to many inputs,
    captured by tests/wire/capture.py over one connection. The sim must give
    the same bytes for every case it can replay: all but those where the
    real agent exited or that are timing experiments."""
    if not CORPUS.exists():
        pytest.skip("no captured corpus yet (python tests/wire/capture.py)")
    corpus = json.loads(CORPUS.read_text())
    sim = SimAgent(SimConfig(blocked=frozenset(corpus["blocked_commands"])))
    report = []
    replayed = 0
    async with connect(sim) as sc:
        await sc.sync()
        for case in corpus["cases"]:
            if case.get("special") or case.get("restarted") or "failure" in case or case.get("agent") != "alive":
                continue
            parts = _corpus_input(case)
            if parts is None or not isinstance(case.get("after_flush"), list):
                continue
            if "replies" not in case and "replies_summary" not in case:
                continue  # a two-client case: see test_half_request_corrupts_next_client
            for part in parts:
                await sc.send(part)
                await trio.testing.wait_all_tasks_blocked()  # the capture paused between parts
            got = await sc.sync()  # the case's replies, then what the flush's 0xFF caused
            after = "".join(case["after_flush"]).encode("latin-1")
            if "replies" in case:
                ok = _corpus_equal(got, "".join(case["replies"]).encode("latin-1") + after)
            else:
                summary = case["replies_summary"]
                head = got[: summary["bytes"]]
                ok = (hashlib.sha256(head).hexdigest() == summary["sha256"] and got[summary["bytes"]:] == after)
            replayed += 1
            if not ok:
                report.append("%s\n  real: %r\n  sim:  %r" % (case["name"], case.get("replies"), got[:2000]))
    assert not report, "\n".join(report)
    assert replayed > 200


_VOLATILE = re.compile(rb'("host-name": |"return": (?=\d{15,}))("[^"]*"|\d+)')


def _corpus_equal(got: bytes, want: bytes) -> bool:
    if got == want:
        return True
    # The host name and the clock are the machine's, not the agent's.
    return _VOLATILE.sub(rb"\1X", got) == _VOLATILE.sub(rb"\1X", want)


# ---------------------------------------------------------------------------
# The sim alone: state, files, exec, freeze, records


async def test_state_outlives_connections():
    sim = SimAgent(SimConfig(files={"/tmp/f": b"abc"}))
    async with connect(sim) as c1:
        opened = await c1.request(cmd("guest-file-open", {"path": "/tmp/f"}))
        assert opened == b'{"return": 1000}\n'
        await c1.send(b'{"execute": "guest-pi')  # half a request, then leave
    async with connect(sim) as c2:
        # the parser still holds the first client's half request
        assert await c2.request(b'ng", "id": 2}') == b'{"return": {}, "id": 2}\n'
        assert await c2.request(cmd("guest-file-read", {"handle": 1000})) == (
            b'{"return": {"count": 3, "buf-b64": "YWJj", "eof": true}}\n'
        )
    assert sim.connections == 2
    assert [r.raw for r in sim.received][1] == b'{"execute": "guest-ping", "id": 2}'


async def test_half_request_corrupts_next_client():
    """Measured (corpus case close_with_partial_request): the next client's
    ping is read as the rest of the string the previous client left open."""
    sim = SimAgent()
    async with connect(sim) as c1:
        await c1.send(b'{"execute": "guest-pi')
    async with connect(sim) as c2:
        await c2.send(ping(b"77"))
        want = ([b"JSON parse error, stray '-p'"]
                + [b"JSON parse error, expecting value", b"QMP input must be a JSON object"] * 2
                + [b"JSON parse error, expecting value"])
        assert await c2.recv_lines(6) == b"".join(
            b'{"error": {"class": "GenericError", "desc": "%s"}}\n' % w for w in want
        )
        assert await c2.sync() == STRAY_FF


async def test_received_records_values_and_raw_bytes():
    sim = SimAgent()
    async with connect(sim) as c:
        data = b'{"execute":"guest-ping","id":1}\n  {"execute": "guest-sync", "arguments": {"id": 2}}junk{"execute":"x"}'
        await c.send(data)
        await c.recv_lines(4)
    assert [r.raw for r in sim.received] == [
        b'{"execute":"guest-ping","id":1}',
        b'{"execute": "guest-sync", "arguments": {"id": 2}}',
        b'{"execute":"x"}',
    ]
    assert sim.received[1].value == {"execute": "guest-sync", "arguments": {"id": 2}}
    assert sim.parse_errors == ["JSON parse error, invalid keyword 'junk'"]
    assert sim.replies_sent == 4


async def test_files_in_memory():
    sim = SimAgent()
    async with connect(sim) as c:
        h = json.loads(await c.request(cmd("guest-file-open", {"path": "/tmp/new", "mode": "w"})))["return"]
        assert await c.request(cmd("guest-file-write", {"handle": h, "buf-b64": base64.b64encode(b"xyz").decode()})) == (
            b'{"return": {"count": 3, "eof": false}}\n'
        )
        assert await c.request(cmd("guest-file-read", {"handle": h})) == (
            b'{"error": {"class": "GenericError", "desc": "failed to read file: Bad file descriptor"}}\n'
        )
        await c.request(cmd("guest-file-close", {"handle": h}))
        # handles keep counting; the file is there for the next open
        assert await c.request(cmd("guest-file-open", {"path": "/tmp/new"})) == b'{"return": 1001}\n'
        assert await c.request(cmd("guest-file-read", {"handle": 1001, "count": 48 << 20})) == (
            b'{"return": {"count": 3, "buf-b64": "eHl6", "eof": true}}\n'
        )
    assert sim.file("/tmp/new") == b"xyz"
    assert sim.handles.keys() == {1001}


async def test_exec_processes_run_in_trio_time(autojump_clock):
    def crash(args, stdin):
        return FakeRun(duration=1, exitcode=None, signal=9, stderr=b"boom\n")

    sim = SimAgent(SimConfig(programs={"/usr/bin/crash": crash}))
    async with connect(sim) as c:
        assert await c.request(cmd("guest-exec", {"path": "/bin/sleep", "arg": ["5"]})) == b'{"return": {"pid": 4000}}\n'
        status = cmd("guest-exec-status", {"pid": 4000})
        assert await c.request(status) == b'{"return": {"exited": false}}\n'
        autojump_clock.jump(5)  # the fake process's run time
        assert await c.request(status) == b'{"return": {"exitcode": 0, "exited": true}}\n'
        assert await c.request(status) == (
            b'{"error": {"class": "GenericError", "desc": "Invalid parameter \'pid\'"}}\n'
        )
        await c.request(cmd("guest-exec", {"path": "crash", "capture-output": True}))
        autojump_clock.jump(1)
        assert await c.request(cmd("guest-exec-status", {"pid": 4001})) == (
            b'{"return": {"err-data": "Ym9vbQo=", "err-truncated": false, "signal": 9, "exited": true}}\n'
        )


async def test_frozen_state():
    sim = SimAgent(SimConfig(blocked={"guest-set-time"}))
    async with connect(sim) as c:
        assert await c.request(cmd("guest-fsfreeze-freeze", id=1)) == b'{"return": 2, "id": 1}\n'
        assert await c.request(cmd("guest-fsfreeze-status")) == b'{"return": "frozen"}\n'
        assert await c.request(cmd("guest-file-open", {"path": "/x"}, id=2)) == (
            b'{"id": 2, "error": {"class": "CommandNotFound", "desc": "Command guest-file-open has been disabled: '
            b'the agent is in frozen state"}}\n'
        )
        assert await c.request(cmd("guest-fsfreeze-freeze")) == (
            b'{"error": {"class": "CommandNotFound", "desc": "Command guest-fsfreeze-freeze has been disabled: '
            b'the agent is in frozen state"}}\n'
        )
        for allowed in ("guest-ping", "guest-sync", "guest-info"):
            reply = await c.request(cmd(allowed, {"id": 1} if allowed == "guest-sync" else None))
            assert reply.startswith(b'{"return": ')
        info = json.loads(await c.request(cmd("guest-info")))["return"]["supported_commands"]
        enabled = {i["name"] for i in info if i["enabled"]}
        assert enabled == {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
                           "guest-fsfreeze-status", "guest-fsfreeze-thaw"}
        assert await c.request(cmd("guest-fsfreeze-thaw")) == b'{"return": 2}\n'
        assert await c.request(cmd("guest-fsfreeze-thaw")) == b'{"return": 0}\n'
        assert (await c.request(cmd("guest-file-open", {"path": "/x"}))).startswith(b'{"error": {"class": "GenericError"')
        assert await c.request(cmd("guest-set-time")) == (
            b'{"error": {"class": "CommandNotFound", "desc": "Command guest-set-time has been disabled: '
            b'the agent is in frozen state"}}\n'
        )
        assert await c.request(cmd("guest-fsfreeze-freeze-list", {"mountpoints": ["/boot", "/nope"]})) == b'{"return": 1}\n'


async def test_every_listed_command_answers():
    """Every command the sim lists has an implementation: all those that
    need no arguments answer with a return value."""
    sim = SimAgent(SimConfig(goodbye="none"))
    skip = {"guest-get-devices", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list"}  # disabled / tested above
    async with connect(sim) as c:
        for name, success, members in COMMANDS:
            if name in skip or any(not m.startswith("*") for m, _ in members):
                continue
            if success:
                assert (await c.request(cmd(name))).startswith(b'{"return": '), name
            else:
                await c.send(cmd(name))  # no reply on success
        assert await c.request(ping(b"1")) == b'{"return": {}, "id": 1}\n'
    assert sim.goodbyes == 4


async def test_ssh_keys_in_the_guest_files():
    sim = SimAgent()
    async with connect(sim) as c:
        assert await c.request(cmd("guest-ssh-get-authorized-keys", {"username": "root"})) == (
            b'{"error": {"class": "GenericError", "desc": "failed to read \'/root/.ssh/authorized_keys\': '
            b'Failed to open file \\u201C/root/.ssh/authorized_keys\\u201D: No such file or directory"}}\n'
        )
        assert await c.request(cmd("guest-ssh-get-authorized-keys", {"username": "nosuchuser"})) == (
            b'{"error": {"class": "GenericError", "desc": "failed to lookup user \'nosuchuser\': Success"}}\n'
        )
        add = cmd("guest-ssh-add-authorized-keys", {"username": "root", "keys": ["algo key1", "algo key2"]})
        assert await c.request(add) == b'{"return": {}}\n'
        assert await c.request(cmd("guest-ssh-get-authorized-keys", {"username": "root"})) == (
            b'{"return": {"keys": ["algo key2", "algo key1"]}}\n'
        )
        await c.request(cmd("guest-ssh-remove-authorized-keys", {"username": "root", "keys": ["algo key1"]}))
    assert sim.file("/root/.ssh/authorized_keys") == b"algo key2"


def test_user_password_and_base64():
    sim = SimAgent()
    run = sim._cmd_guest_set_user_password
    run("root", base64.b64encode(b"secret").decode(), False)
    for args, desc in (
        (("root", "!!", False), "Base64 data contains invalid characters"),
        (("root", "YQpi", False), "forbidden characters in raw password"),
        (("ro:ot", "YWJj", True), "forbidden characters in username"),
    ):
        with pytest.raises(Exception) as exc:
            run(*args)
        assert exc.value.desc == desc


# ---------------------------------------------------------------------------
# Fault knobs (MockClock)


async def test_latency(autojump_clock):
    sim = SimAgent(SimConfig(latency=5))
    async with connect(sim) as c:
        await c.send(ping(b"1"))
        await c.silent(4.9)
        assert await c.recv_lines() == b'{"return": {}, "id": 1}\n'


async def test_command_latency_blocks_what_follows(autojump_clock):
    sim = SimAgent(SimConfig(command_latency={"guest-get-fsinfo": 30}))
    async with connect(sim) as c:
        assert await c.request(ping(b"0")) == b'{"return": {}, "id": 0}\n'
        await c.send(cmd("guest-get-fsinfo", id=1) + ping(b"2"))
        await c.silent(29)
        replies = (await c.recv_lines(2)).splitlines()
        assert json.loads(replies[0])["id"] == 1
        assert replies[1] == b'{"return": {}, "id": 2}'


async def test_hang_blocks_everything_until_released(autojump_clock):
    sim = SimAgent(SimConfig(hang={"guest-get-users"}))
    async with connect(sim) as c:
        await c.send(cmd("guest-get-users", id=1))
        await c.send(ping(b"2"))
        await c.silent(10_000)
        # the agent is stuck in the command: it has not even read the ping
        assert [r.value["id"] for r in sim.received] == [1]
        sim.release()
        assert await c.recv_lines(2) == b'{"return": [], "id": 1}\n{"return": {}, "id": 2}\n'


async def test_hang_outlives_the_connection(autojump_clock):
    sim = SimAgent(SimConfig(hang={"guest-get-users"}))
    first_client, first_server = trio.testing.memory_stream_pair()
    second_client, second_server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sim.serve, first_server)
        await first_client.send_all(cmd("guest-get-users"))
        await trio.testing.wait_all_tasks_blocked()
        await first_client.aclose()  # the client leaves; the agent is still stuck
        nursery.start_soon(sim.serve, second_server)
        c = SimClient(second_client)
        await c.send(ping(b"9"))
        await c.silent(1000)
        assert sim.connections == 1  # the next client waits behind the hang
        sim.release()
        assert await c.recv_lines() == b'{"return": {}, "id": 9}\n'
        assert sim.connections == 2
        await second_client.aclose()


async def test_late_reply_runs_at_once_answers_later(autojump_clock):
    sim = SimAgent(SimConfig(late={"guest-file-open": 60}))
    async with connect(sim) as c:
        await c.send(cmd("guest-file-open", {"path": "/tmp/late", "mode": "w"}, id=1) + ping(b"2"))
        await c.silent(59)
        assert "/tmp/late" in sim.fs and 1000 in sim.handles  # it ran already
        assert await c.recv_lines(2) == b'{"return": 1000, "id": 1}\n{"return": {}, "id": 2}\n'


async def test_id_mode_ignore(autojump_clock):
    sim = SimAgent(SimConfig(id_mode="ignore"))
    async with connect(sim) as c:
        assert await c.request(ping(b'"a"')) == b'{"return": {}}\n'
        assert await c.request(b'{"execute": "nope", "id": 1}') == (
            b'{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}\n'
        )
        assert await c.request(cmd("guest-sync-delimited", {"id": 3}, id=4)) == b'\xff{"return": 3}\n'


async def test_id_mode_reject(autojump_clock):
    sim = SimAgent(SimConfig(id_mode="reject"))
    async with connect(sim) as c:
        assert await c.request(ping(b"1")) == (
            b'{"error": {"class": "GenericError", "desc": "QMP input object member \'id\' is unexpected"}}\n'
        )
        assert await c.request(ping()) == b'{"return": {}}\n'
        assert await c.request(b'{"execute": "guest-sync", "arguments": {"id": 7}}') == b'{"return": 7}\n'


async def test_drop_by_command_and_every_nth(autojump_clock):
    sim = SimAgent(SimConfig(drop={"guest-file-open"}))
    async with connect(sim) as c:
        await c.send(cmd("guest-file-open", {"path": "/tmp/d", "mode": "w"}, id=1) + ping(b"2"))
        assert await c.recv_lines() == b'{"return": {}, "id": 2}\n'
        assert 1000 in sim.handles and sim.dropped == 1
        sim.config.drop = frozenset()
        sim.config.drop_every = 2
        await c.send(b"".join(ping(b"%d" % i) for i in range(3, 7)))
        assert await c.recv_lines(2) == b'{"return": {}, "id": 3}\n{"return": {}, "id": 5}\n'
        await c.silent(10)
    assert sim.dropped == 3 and sim.replies_sent == 3


@pytest.mark.parametrize("garbage", [b"garbage\x00\xff", HALF_REPLY])
async def test_garbage_on_connect(autojump_clock, garbage):
    sim = SimAgent(SimConfig(on_connect=garbage))
    async with connect(sim) as c:
        # written before anything is read
        while len(c.buf) < len(garbage):
            await c._fill()
        assert bytes(c.buf) == garbage
        c.buf.clear()
        assert await c.request(ping(b"1")) == b'{"return": {}, "id": 1}\n'


async def test_close_after_n_replies(autojump_clock):
    sim = SimAgent(SimConfig(close_after=2))
    async with connect(sim) as c:
        await c.send(ping(b"1") + ping(b"2") + ping(b"3"))
        assert await c.eof() == b'{"return": {}, "id": 1}\n{"return": {}, "id": 2}\n'
    async with connect(sim) as c:
        assert await c.request(ping(b"4")) == b'{"return": {}, "id": 4}\n'
    assert sim.connections == 2


async def test_close_on_command(autojump_clock):
    sim = SimAgent(SimConfig(close_on={"guest-get-osinfo"}))
    async with connect(sim) as c:
        await c.send(ping(b"1") + cmd("guest-get-osinfo", id=2) + ping(b"3"))
        assert await c.eof() == b'{"return": {}, "id": 1}\n'
    assert [r.value["id"] for r in sim.received] == [1, 2]


async def test_stop_reading_and_resume(autojump_clock):
    sim = SimAgent(SimConfig(stop_reading=True, on_connect=b"hello\n"))
    async with connect(sim) as c:
        await c.send(ping(b"1"))
        await c.silent(1000)  # not even the greeting garbage
        assert sim.received == []
        sim.resume()
        assert await c.recv_lines(2) == b'hello\n{"return": {}, "id": 1}\n'
        sim.stop_reading()
        await c.send(ping(b"2"))
        await c.silent(1000)
        sim.resume()
        assert await c.recv_lines() == b'{"return": {}, "id": 2}\n'


async def test_disconnect_now(autojump_clock):
    sim = SimAgent(SimConfig(hang={"guest-fstrim"}, files={"/tmp/f": b""}))
    assert not sim.disconnect()  # nothing to drop
    async with connect(sim) as c:
        await c.request(cmd("guest-file-open", {"path": "/tmp/f"}))
        await c.send(cmd("guest-fstrim", id=1) + ping(b"2"))
        await c.silent(10)
        assert sim.disconnect()  # even while a command hangs
        assert await c.eof() == b""
    assert 1000 in sim.handles  # the same agent process
    async with connect(sim) as c:
        assert await c.request(ping(b"3")) == b'{"return": {}, "id": 3}\n'
        assert sim.disconnect(restart=True)
        await c.eof()
    assert sim.handles == {} and sim.disconnects == 2


async def test_cut_next_reply_restarts_the_agent(autojump_clock):
    sim = SimAgent(SimConfig(files={"/tmp/f": b""}))
    async with connect(sim) as c:
        await c.request(cmd("guest-file-open", {"path": "/tmp/f"}))
        sim.cut_next_reply()
        await c.send(ping(b"12345") + ping(b"6"))
        assert await c.eof() == b'{"return": {},'  # half a reply, then the end
    assert sim.handles == {} and sim.cuts == 1
    async with connect(sim) as c:
        assert await c.request(ping(b"7")) == b'{"return": {}, "id": 7}\n'


async def test_inject_garbage_before_the_next_reply(autojump_clock):
    sim = SimAgent()
    async with connect(sim) as c:
        sim.inject(b"junk\n")
        sim.inject(b"\xff")
        assert await c.request(ping(b"1"), 2) == b'junk\n\xff{"return": {}, "id": 1}\n'
        assert await c.request(ping(b"2")) == b'{"return": {}, "id": 2}\n'


async def test_shutdown_no_reply_then_goodbye(autojump_clock):
    sim = SimAgent(SimConfig(files={"/tmp/f": b""}))
    async with connect(sim) as c:
        await c.request(cmd("guest-file-open", {"path": "/tmp/f"}))
        assert await c.request(cmd("guest-shutdown", {"mode": "bogus"}, id=1)) == (
            b'{"id": 1, "error": {"class": "GenericError", "desc": '
            b'"mode is invalid (valid values are: halt|powerdown|reboot"}}\n'
        )
        await c.send(cmd("guest-shutdown", id=2) + ping(b"3"))
        assert await c.eof() == b""
    assert sim.goodbyes == 1 and sim.handles == {}  # a new agent process
    async with connect(sim) as c:
        assert await c.request(cmd("guest-file-open", {"path": "/tmp/f"})) == b'{"return": 1001}\n'


async def test_suspend_goodbye_stop(autojump_clock):
    sim = SimAgent(SimConfig(goodbye="stop"))
    async with connect(sim) as c:
        await c.send(cmd("guest-suspend-ram") + ping(b"1"))
        await c.silent(1000)
        sim.resume()  # the guest wakes up
        assert await c.recv_lines() == b'{"return": {}, "id": 1}\n'


# ---------------------------------------------------------------------------
# The unix socket and the command line


async def test_serve_unix_one_client_at_a_time(tmp_path):
    path = str(tmp_path / "sim.sock")
    sim = SimAgent()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_unix, sim, path)
        with trio.fail_after(10):
            a = SimClient(await trio.open_unix_socket(path))
            assert await a.request(ping(b"1")) == b'{"return": {}, "id": 1}\n'
            b = SimClient(await trio.open_unix_socket(path))  # connects, waits
            await b.send(ping(b"2"))
            # a is still served after b wrote: the sim is busy with a alone
            assert await a.request(ping(b"3")) == b'{"return": {}, "id": 3}\n'
            assert sim.connections == 1
            await a.stream.aclose()
            assert await b.recv_lines() == b'{"return": {}, "id": 2}\n'
            assert sim.connections == 2
            await b.stream.aclose()
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


def test_command_line_options():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--listen")
    add_sim_arguments(parser)
    ns = parser.parse_args([
        "--listen", "/tmp/x", "--latency", "0.5", "--no-echo", "reject", "--hang", "guest-get-users",
        "--late", "guest-info=2", "--drop", "guest-ping", "--drop-every", "3", "--block", "guest-exec",
        "--close-after", "4", "--close-on", "guest-get-osinfo", "--on-connect", "junk",
        "--command-latency", "guest-get-fsinfo=1.5", "--file", "/tmp/a=hello",
    ])
    cfg = config_from_args(ns)
    assert cfg.latency == 0.5 and cfg.id_mode == "reject"
    assert cfg.hang == {"guest-get-users"} and cfg.late == {"guest-info": 2.0}
    assert cfg.drop == {"guest-ping"} and cfg.drop_every == 3 and cfg.blocked == {"guest-exec"}
    assert cfg.close_after == 4 and cfg.close_on == {"guest-get-osinfo"} and cfg.on_connect == b"junk"
    assert cfg.command_latency == {"guest-get-fsinfo": 1.5} and cfg.files == {"/tmp/a": b"hello"}
    assert SimAgent(cfg).file("/tmp/a") == b"hello"


def test_qdict_order_of_keys_with_nul():
    # QEMU hashes U+0000 as its modified UTF-8 form C0 80 (measured: see
    # DISPATCH_CASES, the "p\\u0000a" member is named after "q").
    assert qjson.qdict_order(["p\x00a", "q"]) == ["q", "p\x00a"]
