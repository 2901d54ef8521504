"""The proxy in front of the real qemu-ga: transparency, routing, bad input,
and the agent going away and coming back.

Differential tests measure the agent directly first (the proxy must not be
running then: qemu-ga 7.2 in unix-listen mode serves one client at a time),
then send the very same bytes through the proxy and compare bytes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess

import pytest
import trio
import trio.testing

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy.upstream import State
from realagent import readable_by_agent

# Generous bounds: they only turn a hang into a failure.
STEP = 10.0

NOT_AVAILABLE = "Guest agent is not available"


# -- helpers ------------------------------------------------------------------


def marker(n) -> bytes:
    """A request whose reply ends a differential exchange (and proves the
    connection still works)."""
    return b'{"execute": "guest-ping", "id": "marker-%s"}\n' % str(n).encode()


def _is_marker(line: bytes, n) -> bool:
    return line == b'{"return": {}, "id": "marker-%s"}\n' % str(n).encode()


def direct_lines(conn, payload: bytes, count: int) -> list[bytes]:
    """Send payload on a synced direct connection, read `count` replies."""
    conn.send(payload)
    return [conn.recv_lines(1) for _ in range(count)]


def direct_until_marker(agent, payload: bytes, n) -> list[bytes]:
    """The agent's own replies to payload, through the marker's reply."""
    with agent.connect(timeout=STEP) as conn:
        conn.sync()
        conn.send(payload + marker(n))
        lines = []
        while True:
            line = conn.recv_lines(1)
            lines.append(line)
            if _is_marker(line, n):
                return lines


async def proxy_until_marker(client: Client, payload: bytes, n, limit: int = 5000) -> list[bytes]:
    await client.send(payload + marker(n))
    lines = []
    with trio.fail_after(STEP):
        while True:
            line = await client.read_line()
            lines.append(line)
            if _is_marker(line, n):
                return lines
            assert len(lines) < limit, lines[:5]


async def proxy_lines(client: Client, count: int) -> list[bytes]:
    with trio.fail_after(STEP):
        return [await client.read_line() for _ in range(count)]


_STATS = re.compile(rb'("(?:rx|tx)-(?:bytes|packets|errs|dropped)": )\d+')


def no_counters(line: bytes) -> bytes:
    """guest-network-get-interfaces reports live packet counters; anything on
    the machine (even this test suite's own loopback traffic) moves them
    between two runs. Blank the numbers, keep every other byte."""
    return _STATS.sub(rb"\1#", line)


def respawn(agent) -> None:
    """Start a new qemu-ga on the same socket path, exactly as the fixture
    did (same argv, as nobody); the fixture's teardown stops it."""
    assert not agent.alive()
    env = dict(os.environ, QGA_CONF=str(agent.tmpdir / "no-such-qemu-ga.conf"))
    with open(agent.tmpdir / "stdout-respawn.txt", "ab") as out:
        agent.proc = subprocess.Popen(
            agent.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=agent.tmpdir,
            start_new_session=True,
        )


async def written_upstream(proxy, count: int) -> None:
    """Wait (bounded) until `count` requests are written to the agent and
    no write is in progress."""
    with trio.fail_after(STEP):
        while proxy.router.in_flight() < count or proxy.upstream.writing:
            await trio.lowlevel.checkpoint()


async def kill_agent(agent) -> None:
    # SIGKILL: qemu-ga busy writing replies may take long to act on SIGTERM.
    agent.proc.kill()
    await trio.to_thread.run_sync(agent.proc.wait, STEP)


@pytest.fixture
def readable_file():
    """A file user nobody can read: world-readable, in a world-accessible dir."""
    with readable_by_agent("data.txt", b"hello from the guest\n\x00\x01\xfe\xff binary too\n" * 40) as path:
        yield path


# -- 1. transparency -------------------------------------------------------------

SIMPLE = [
    b'{"execute": "guest-ping"}',
    b'{"execute": "guest-ping", "id": 1}',
    b'{"execute": "guest-info"}',
    b'{"execute": "guest-info", "id": "info"}',
    b'{"execute": "guest-get-host-name"}',
    b'{"execute": "guest-get-host-name", "id": 7}',
    b'{"execute": "guest-network-get-interfaces"}',
    b'{"execute": "guest-network-get-interfaces", "id": [1, "n"]}',
]

IDS = [
    None,  # no id member at all
    b"0",
    b"1",
    b"-1",
    b"9223372036854775807",
    b"18446744073709551615",
    b"18446744073709551616",
    b"1.5",
    b"0.1",
    b"-0.0",
    b"1e300",
    b"2E-3",
    b'"abc"',
    b'""',
    b'"\\u00e9 \\ud83d\\ude00 \\n\\t\\"q\\""',
    b"'single'",
    b"null",
    b"true",
    b"false",
    b"{}",
    b"[]",
    b'{"a": [1, 2.5, {"b": null, "c": [true, "x"]}], "z": {"y": {}}}',
    b'[[[]], {"k": "v"}, -7, "s"]',
]


def _with_id(command: bytes, ident: bytes | None) -> bytes:
    if ident is None:
        return b'{"execute": "%s"}' % command
    return b'{"execute": "%s", "id": %s}' % (command, ident)


async def test_transparent_commands_and_files(real_agent, readable_file):
    path = readable_file.encode()
    open_req = b'{"execute": "guest-file-open", "arguments": {"path": "%s", "mode": "r"}, "id": "open"}' % path
    handle_re = re.compile(rb'^\{"return": (\d+), "id": "open"\}\n$')

    def file_requests(handle: bytes) -> list[bytes]:
        return [
            b'{"execute": "guest-file-read", "arguments": {"handle": %s, "count": 100}, "id": 1}' % handle,
            b'{"execute": "guest-file-read", "arguments": {"handle": %s}}' % handle,
            b'{"execute": "guest-file-read", "arguments": {"handle": %s, "count": 10}, "id": "eof"}' % handle,
            b'{"execute": "guest-file-close", "arguments": {"handle": %s}, "id": 2}' % handle,
            b'{"execute": "guest-file-read", "arguments": {"handle": %s}, "id": "closed"}' % handle,
        ]

    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        direct = [conn.request(r + b"\n") for r in SIMPLE]
        direct_open = conn.request(open_req)
        m = handle_re.match(direct_open)
        assert m, direct_open
        direct_handle = m.group(1)
        direct_file = [conn.request(r) for r in file_requests(direct_handle)]

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            for request, expected in zip(SIMPLE, direct):
                await client.send(request)
                (got,) = await proxy_lines(client, 1)
                if b"guest-network-get-interfaces" in request:
                    assert b'"statistics"' in got
                    assert no_counters(got) == no_counters(expected)
                else:
                    # guest-info included: byte for byte.
                    assert got == expected
            await client.send(open_req)
            (got_open,) = await proxy_lines(client, 1)
            m = handle_re.match(got_open)
            assert m, got_open
            handle = m.group(1)
            assert got_open.replace(handle, b"H", 1) == direct_open.replace(direct_handle, b"H", 1)
            got_file = []
            for request in file_requests(handle):
                await client.send(request)
                got_file += await proxy_lines(client, 1)
            expected_file = [line.replace(direct_handle, handle) for line in direct_file]
            assert got_file == expected_file
            # What was read really is the file (not just equal garbage).
            assert b'"buf-b64": "aGVsbG8gZnJvbSB0aGUgZ3Vlc3QK' in got_file[0]
            assert b'"eof": true' in got_file[2]


async def test_ids_echoed_as_the_agent_does(real_agent):
    commands = [b"guest-ping", b"guest-get-host-name", b"guest-no-such-command", b"guest-exec"]
    requests = [_with_id(cmd, ident) for ident in IDS for cmd in commands]
    # An invalid request still carries its id back (the dispatcher's errors).
    requests += [b'{"arguments": {}, "id": %s}' % ident for ident in IDS if ident is not None]
    requests += [b'{"execute": "guest-ping", "bogus": 1, "id": %s}' % ident for ident in IDS if ident is not None]
    requests += [
        b'{"execute": "guest-sync", "arguments": {"id": 42}, "id": %s}' % ident for ident in IDS if ident is not None
    ]
    requests += [
        b'{"execute": "guest-sync-delimited", "arguments": {"id": 43}, "id": %s}' % ident
        for ident in IDS
        if ident is not None
    ]
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        direct = [conn.request(r + b"\n") for r in requests]
    # The agent did echo them (else this would compare nothing useful).
    assert b'"id": 0.10000000000000001' in b"".join(direct)
    assert b'"id": {"a": [1, 2.5, {"b": null, "c": [true, "x"]}], "z": {"y": {}}}' in b"".join(direct)

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            # One at a time, then the whole lot pipelined in one write.
            got = []
            for request in requests:
                await client.send(request + b"\n")
                got += await proxy_lines(client, 1)
            for request, want, have in zip(requests, direct, got):
                assert have == want, request
            await client.send(b"".join(requests))  # no separators at all
            got = await proxy_lines(client, len(requests))
            for request, want, have in zip(requests, direct, got):
                assert have == want, request


# -- 2. many clients, colliding ids, pipelined -------------------------------------

N_CLIENTS = 32
PER_CLIENT = 28


def _client_requests(i: int) -> list[bytes]:
    """Client i's requests. Ids collide across clients on purpose; the
    command at each position differs between neighbours, and the unknown
    command names and sync ids are unique, so a reply delivered to the
    wrong client or out of order is visible."""
    group = i % 4
    if group == 0:
        ids = [b"1", b"2", b"3"]
    elif group == 1:
        ids = [b'"a"', b'"b"']
    elif group == 2:
        ids = [None]
    else:
        ids = [b"1", b'"a"', None, b"null", b"1.5"]
    out = []
    for k in range(PER_CLIENT):
        ident = ids[k % len(ids)]
        kind = (i + k) % 7
        if kind == 0:
            body = b'"execute": "guest-ping"'
        elif kind == 1:
            body = b'"execute": "guest-info"'
        elif kind == 2:
            body = b'"execute": "guest-get-host-name"'
        elif kind == 3:
            body = b'"execute": "guest-sync-delimited", "arguments": {"id": %d}' % (1_000_000 * (i + 1) + k)
        elif kind == 4:
            body = b'"execute": "guest-network-get-interfaces"'
        elif kind == 5:
            body = b'"execute": "guest-nope-c%d-r%d"' % (i, k)
        else:
            body = b'"execute": "guest-exec", "arguments": {"path": "/bin/true"}'
        if ident is not None:
            body += b', "id": ' + ident
        out.append(b"{" + body + b"}")
        # A guest-sync marker with an id unique to this client and position
        # after every request.
        out.append(b'{"execute": "guest-sync", "arguments": {"id": %d}}' % (7_000_000 * (i + 1) + k))
    return out


async def test_concurrent_clients_colliding_ids(real_agent):
    per_client = [_client_requests(i) for i in range(N_CLIENTS)]
    distinct = sorted({r for reqs in per_client for r in reqs})
    expected_for: dict[bytes, bytes] = {}
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        for start in range(0, len(distinct), 50):
            batch = distinct[start : start + 50]
            conn.send(b"\n".join(batch) + b"\n")
            for request in batch:
                expected_for[request] = no_counters(conn.recv_lines(1))
    assert any(b"has not been found" in v for v in expected_for.values())
    assert any(b"has been disabled" in v for v in expected_for.values())

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        path = proxy.config.listen[0]
        clients = [await Client.connect(path) for _ in range(N_CLIENTS)]
        results: dict[int, list[bytes]] = {}
        go = trio.Event()

        async def writer(i: int, client: Client):
            stream = b"".join(r + (b"\n" if n % 3 else b"") for n, r in enumerate(per_client[i]))
            await go.wait()
            # Fragment differently per client: requests split across writes.
            size = 11 + 13 * i
            for start in range(0, len(stream), size):
                await client.send(stream[start : start + size])
                await trio.lowlevel.checkpoint()

        async def reader(i: int, client: Client):
            results[i] = await proxy_lines(client, len(per_client[i]))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, client in enumerate(clients):
                    nursery.start_soon(writer, i, client)
                    nursery.start_soon(reader, i, client)
                go.set()
        for client in clients:
            await client.aclose()

    for i in range(N_CLIENTS):
        want = [expected_for[r] for r in per_client[i]]
        have = [no_counters(line) for line in results[i]]
        for n, (request, w, h) in enumerate(zip(per_client[i], want, have)):
            assert h == w, (i, n, request)


# -- 3. bad input: the agent's own answers -------------------------------------------

BAD_INPUT = {
    "invalid-json-trailing-comma": b'{"execute": "guest-ping",}',
    "invalid-json-missing-colon": b'{"execute" "guest-ping", "id": 1}',
    "invalid-json-bad-number": b'{"execute": "guest-ping", "id": 01}',
    "invalid-json-bad-keyword": b'{"execute": "guest-ping", "id": nul}',
    "stray-close": b"]",
    "non-object-array": b"[1, 2]",
    "non-object-int": b"42 ",
    "non-object-string": b'"guest-ping"',
    "non-object-null": b"null ",
    "missing-execute": b'{"arguments": {}}',
    "missing-execute-with-id": b'{"arguments": {}, "id": 7}',
    "unexpected-member": b'{"execute": "guest-ping", "foo": 1, "id": "u"}',
    "unexpected-members-order": b'{"zzz": 1, "execute": "guest-ping", "aaa": 2, "id": "u"}',
    "unexpected-argument": b'{"execute": "guest-ping", "arguments": {"x": 1}, "id": 9}',
    "execute-int": b'{"execute": 1, "id": 3}',
    "execute-int-no-id": b'{"execute": 1}',
    "arguments-list": b'{"execute": "guest-ping", "arguments": [], "id": [1]}',
    "arguments-string": b'{"execute": "guest-ping", "arguments": "x"}',
    "argument-wrong-type": b'{"execute": "guest-file-read", "arguments": {"handle": "x"}, "id": 4}',
    "utf8-in-string": b'{"execute": "guest-ping", "id": "a\xc3(b"}',
    "utf8-surrogate-in-string": b'{"execute": "guest-ping", "id": "\xed\xa0\x80"}',
    "utf8-overlong-in-string": b'{"execute": "guest-ping", "id": "\xc1\xbf"}',
    "utf8-modified-nul-in-string": b'{"execute": "guest-ping", "id": "a\xc0\x80b"}',
    "utf8-valid-in-string": b'{"execute": "guest-ping", "id": "\xc3\xa9\xf0\x9f\x98\x80"}',
    "utf8-outside-string": b'{"execute": "guest-ping", \xc3\xa9 "id": 1}',
    "byte-fe-outside-string": b'\xfe{"execute": "guest-ping", "id": 2}',
    "control-char-in-string": b'{"execute": "guest-ping", "id": "a\x01b"}',
    "duplicate-key": b'{"execute": "guest-ping", "execute": "guest-info", "id": 1}',
    "noncharacter-escape": b'{"execute": "guest-ping", "id": "\\uFDD0"}',
    "noncharacter-raw": b'{"execute": "guest-ping", "id": "\xef\xbf\xbe"}',
    "single-quoted": b"{'execute': 'guest-ping', 'id': 'sq'}",
    "single-quoted-escape": b"{'execute': 'guest-get-host-name', 'id': 'it\\'s \"x\"'}",
    "single-quoted-mixed": b"{\"execute\": 'guest-ping', 'id': \"dq\"}",
    "single-quoted-bad": b"{'execute': 'guest-ping', 'id': 'it''s'}",
    "unknown-command": b'{"execute": "guest-bogus", "id": {"x": 1}}',
    "disabled-command": b'{"execute": "guest-set-time", "id": "t"}',
    "disabled-no-reply-command": b'{"execute": "guest-suspend-disk", "id": "s"}',
    "oob": b'{"exec-oob": "guest-ping", "id": "oob"}',
    "sync-bad-arguments": b'{"execute": "guest-sync", "arguments": {"id": "x"}, "id": 5}',
    "sync-missing-arguments": b'{"execute": "guest-sync-delimited", "id": 6}',
    "several-in-one": b'[]{}{"execute": "guest-ping", "id": 1}"x"',
    "huge-integer-id": b'{"execute": "guest-ping", "id": 1' + b"0" * 5000 + b"}",
    "huge-negative-integer-id": b'{"execute": "guest-ping", "id": -9' + b"9" * 400 + b"}",
    "long-float-id": b'{"execute": "guest-ping", "id": 0.' + b"1" * 3000 + b"e-5}",
    "long-bad-keyword": b'{"execute": "guest-ping", "id": ' + b"x" * 3000 + b"}",
    "long-string-id": b'{"execute": "guest-ping", "id": "' + b"\\u00e9" * 20000 + b'"}',
    # Numbers past a double's range are infinite to the agent's strtod; the
    # proxy's copy of the request must be too (found by fuzz_requests).
    "infinite-argument": b'{"execute": "guest-sync", "arguments": {"id": 184E6744073749561}, "id": 8}',
    "negative-infinite-argument": b'{"execute": "guest-file-read", "arguments": {"handle": -1e400}, "id": 9}',
}


@pytest.mark.parametrize("name", list(BAD_INPUT))
async def test_bad_input_like_the_agent(real_agent, name):
    payload = BAD_INPUT[name]
    direct = direct_until_marker(real_agent, payload, 1)
    # What follows the payload must work on that connection, and it must be
    # this test's marker: the payload did not leave the parser mid-message.
    assert _is_marker(direct[-1], 1)

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            got = await proxy_until_marker(client, payload, 1)
            assert got == direct
            # Again on the same connection, then plain service.
            got = await proxy_until_marker(client, payload, 1)
            assert got == direct
            await client.send(b'{"execute": "guest-ping", "id": "after"}')
            assert await proxy_lines(client, 1) == [b'{"return": {}, "id": "after"}\n']


async def test_nesting_over_the_limit(real_agent):
    payload = b'{"execute": "guest-ping", "id": ' + b"[" * 1024 + b"]" * 1024 + b"}"
    direct = direct_until_marker(real_agent, payload, 1)
    assert direct[0] == b'{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}\n'

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            got = await proxy_until_marker(client, payload, 1)
            assert got[0] == direct[0]
            await client.send(b'{"execute": "guest-ping", "id": "after"}')
            assert await proxy_lines(client, 1) == [b'{"return": {}, "id": "after"}\n']


def _deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# Nesting the agent accepts (1024 levels counting the outer object): each
# reaches a different place in the proxy that writes JSON.
AT_LIMIT = {
    "id-echoed-by-agent": b'{"execute": "guest-ping", "id": ' + _deep(1023) + b"}",
    "arguments-sent-upstream": b'{"execute": "guest-ping", "arguments": {"x": ' + _deep(1022) + b"}}",
    "id-of-rejected-message": b'{"arguments": {}, "id": ' + _deep(1023) + b"}",
    "id-of-local-sync": b'{"execute": "guest-sync", "arguments": {"id": 1}, "id": ' + _deep(1023) + b"}",
}


@pytest.mark.parametrize("name", list(AT_LIMIT))
async def test_nesting_at_the_limit(real_agent, name):
    payload = AT_LIMIT[name]
    direct = direct_until_marker(real_agent, payload, 2)
    assert len(direct) == 2 and b"limit exceeded" not in direct[0], direct[0][:200]

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            got = await proxy_until_marker(client, payload, 2)
            assert got == direct


OVERSIZE = {
    # One string token over 64 MiB.
    "one-token": b'{"execute": "guest-ping", "arguments": {"x": "' + b"a" * ((64 << 20) + 16) + b'"}}',
    # Many tokens whose sizes add up to over 64 MiB.
    "many-tokens": b'{"execute": "guest-ping", "arguments": {"x": ['
    + b",".join([b'"' + b"b" * (1 << 20) + b'"'] * 66)
    + b"]}}",
}


@pytest.mark.parametrize("name", list(OVERSIZE))
async def test_oversize_message(real_agent, name):
    payload = OVERSIZE[name]
    assert len(payload) > 64 << 20
    with real_agent.connect(timeout=30) as conn:
        conn.sync()
        conn.send(payload)
        (direct_first,) = direct_lines(conn, b"", 1)
        conn.sync(timeout=30)  # read through whatever the rest caused
    assert b"limit exceeded" in direct_first

    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        path = proxy.config.listen[0]
        async with await Client.connect(path) as client:

            async def send_it():
                try:
                    await client.send(payload + b'\n{"execute": "guest-ping"}\n')
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the proxy hung up while we were still writing

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_it)
                    first = await client.read_line()
                    # Then the proxy closes the connection: nothing else.
                    rest = b""
                    while True:
                        try:
                            chunk = await client.stream.receive_some(1 << 16)
                        except trio.BrokenResourceError:
                            break
                        if not chunk:
                            break
                        rest += chunk
            assert first == direct_first
            assert client.buf + rest == b""
        # The proxy itself is fine.
        async with await Client.connect(path) as other:
            await other.send(b'{"execute": "guest-ping", "id": 1}')
            assert await proxy_lines(other, 1) == [b'{"return": {}, "id": 1}\n']


# -- 4. 0xFF from a client --------------------------------------------------------------

async def test_ff_mid_request_drops_it(real_agent):
    victim = b'{"execute": "guest-get-host-name", "arguments": {}, "id": "victim"}'
    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            await client.send(victim)
            (victim_reply,) = await proxy_lines(client, 1)
            assert victim_reply.startswith(b'{"return": {"host-name": ')
            for cut in range(len(victim) + 1):
                after = b'{"execute": "guest-ping", "id": "after-%d"}' % cut
                if cut % 2:
                    await client.send(victim[:cut])
                    await client.send(b"\xff")
                    await client.send(after)
                else:
                    await client.send(victim[:cut] + b"\xff" + after)
                want = [b'{"return": {}, "id": "after-%d"}\n' % cut]
                if cut == len(victim):
                    want.insert(0, victim_reply)  # it was complete before the 0xFF
                assert await proxy_lines(client, len(want)) == want, cut
            # Several 0xFF in a row, and one inside a pipelined burst.
            await client.send(b"\xff\xff" + victim[:10] + b"\xff\xff{\"execute\": \"guest-ping\"}")
            assert await proxy_lines(client, 1) == [b'{"return": {}}\n']
            # Nothing else was queued for this connection.
            await client.send(b'{"execute": "guest-ping", "id": "last"}')
            assert await proxy_lines(client, 1) == [b'{"return": {}, "id": "last"}\n']


# -- 5. and 6. the agent going away and coming back -------------------------------------

async def _ping(client: Client, ident: int) -> bytes:
    await client.send(b'{"execute": "guest-ping", "id": %d}' % ident)
    (line,) = await proxy_lines(client, 1)
    return line


def _assert_not_available(line: bytes, ident: int) -> None:
    assert line.startswith(b'{"id": %d, "error": {"class": "GenericError", "desc": "%s' % (ident, NOT_AVAILABLE.encode())), line


async def test_agent_restart(real_agent):
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        info = conn.request(b'{"execute": "guest-info"}\n')

    # request_timeout far above the wait bounds: a request that waited for
    # its deadline instead of failing fast makes this test fail.
    async with run_proxy("unix:" + str(real_agent.path), request_timeout=60, backoff_max=0.5) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        path = proxy.config.listen[0]
        clients = [await Client.connect(path) for _ in range(3)]
        for n, client in enumerate(clients):
            assert await _ping(client, n) == b'{"return": {}, "id": %d}\n' % n

        await kill_agent(real_agent)
        with trio.fail_after(STEP):
            await proxy.wait_state(State.CONNECTING)
        for n, client in enumerate(clients):
            _assert_not_available(await _ping(client, 100 + n), 100 + n)
        # A client arriving during the outage too; pipelined requests each
        # get their error, in order.
        late = await Client.connect(path)
        await late.send(b'{"execute": "guest-info", "id": 1}{"execute": "guest-ping", "id": 2}')
        for ident, line in zip((1, 2), await proxy_lines(late, 2)):
            _assert_not_available(line, ident)
        clients.append(late)

        respawn(real_agent)
        with trio.fail_after(STEP + 5):
            await wait_ready(proxy)
        for n, client in enumerate(clients):
            assert await _ping(client, 200 + n) == b'{"return": {}, "id": %d}\n' % (200 + n)
        await clients[0].send(b'{"execute": "guest-info"}')
        assert await proxy_lines(clients[0], 1) == [info]

        # Once more, to show it was not a one-off.
        await kill_agent(real_agent)
        with trio.fail_after(STEP):
            await proxy.wait_state(State.CONNECTING)
        _assert_not_available(await _ping(clients[1], 300), 300)
        respawn(real_agent)
        with trio.fail_after(STEP + 5):
            await wait_ready(proxy)
        assert await _ping(clients[1], 301) == b'{"return": {}, "id": 301}\n'
        for client in clients:
            await client.aclose()


async def test_proxy_before_agent(real_agent):
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        info = conn.request(b'{"execute": "guest-info"}\n')
    await kill_agent(real_agent)
    if real_agent.path.exists():
        real_agent.path.unlink()  # qemu-ga leaves it behind; this is "not there yet"

    async with run_proxy("unix:" + str(real_agent.path), request_timeout=60, backoff_max=0.5) as proxy:
        assert proxy.upstream.state is State.CONNECTING
        async with await Client.connect(proxy.config.listen[0]) as client:
            for n in range(3):
                _assert_not_available(await _ping(client, n), n)
            await client.send(b'{"execute": "guest-info"}')
            (line,) = await proxy_lines(client, 1)
            assert line.startswith(b'{"error": {"class": "GenericError", "desc": "%s' % NOT_AVAILABLE.encode()), line
            assert proxy.upstream.state is State.CONNECTING

            respawn(real_agent)
            with trio.fail_after(STEP + 5):
                await wait_ready(proxy)
            assert await _ping(client, 10) == b'{"return": {}, "id": 10}\n'
            await client.send(b'{"execute": "guest-info"}')
            assert await proxy_lines(client, 1) == [info]


async def test_agent_dies_under_load(real_agent):
    """The agent killed while a client has many requests in flight: every
    request still gets exactly one reply, in order, with its own id: the
    agent's answer or the not-available error; none hangs."""
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        info = conn.request(b'{"execute": "guest-info"}\n')
    count = 400
    async with run_proxy("unix:" + str(real_agent.path), request_timeout=60, backoff_max=0.5) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            requests = b"".join(b'{"execute": "guest-info", "id": %d}' % n for n in range(count))

            async def send_all():
                await client.send(requests)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                first = await proxy_lines(client, 1)  # the agent is busy with them now
                await kill_agent(real_agent)
                rest = await proxy_lines(client, count - 1)
            answered = failed = 0
            for n, line in enumerate(first + rest):
                if line == info[:-2] + b', "id": %d}\n' % n:
                    answered += 1
                else:
                    _assert_not_available(line, n)
                    failed += 1
            assert answered >= 1
            respawn(real_agent)
            with trio.fail_after(STEP + 5):
                await wait_ready(proxy)
            await client.send(b'{"execute": "guest-info", "id": 1}')
            assert await proxy_lines(client, 1) == [info[:-2] + b', "id": 1}\n']


async def test_agent_killed_with_requests_unread(real_agent):
    """Deterministic version: the agent is stopped (SIGSTOP) so the proxy's
    requests sit unread in its socket, then killed: the proxy's end of the
    channel fails with a reset, not a clean end-of-file. Each request gets
    its not-available error and the proxy serves again once an agent is back."""
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        info = conn.request(b'{"execute": "guest-info"}\n')
    async with run_proxy("unix:" + str(real_agent.path), request_timeout=60, backoff_max=0.5) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            real_agent.proc.send_signal(signal.SIGSTOP)
            await client.send(b"".join(b'{"execute": "guest-ping", "id": %d}' % n for n in range(10)))
            # Wait until the proxy has written them all to the agent.
            await written_upstream(proxy, 10)
            real_agent.proc.kill()
            await trio.to_thread.run_sync(real_agent.proc.wait, STEP)
            for n, line in enumerate(await proxy_lines(client, 10)):
                _assert_not_available(line, n)
            respawn(real_agent)
            with trio.fail_after(STEP + 5):
                await wait_ready(proxy)
            await client.send(b'{"execute": "guest-info", "id": 1}')
            assert await proxy_lines(client, 1) == [info[:-2] + b', "id": 1}\n']


@pytest.mark.parametrize("how", ["close", "reset", "half-request"])
async def test_client_leaves_with_replies_unread(real_agent, how):
    """A client that pipelines requests and goes away without reading the
    replies (what makes qemu-ga 7.2 itself exit), or that resets the
    connection, or leaves half a request: the proxy drops what it was owed
    and keeps serving everyone else; the agent never sees the half request."""
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        info = conn.request(b'{"execute": "guest-info"}\n')
    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        path = proxy.config.listen[0]
        for round_ in range(3):
            leaver = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            leaver.connect(path)
            if how == "half-request":
                leaver.sendall(b'{"execute": "guest-ping", "id": ')
            else:
                leaver.sendall(b'{"execute": "guest-info"}' * 40)
            if how == "reset":
                leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            leaver.close()
            async with await Client.connect(path) as other:
                # Enough work to outlast the leaver's replies: they are
                # written (and fail) while this client is being served.
                await other.send(b"".join(b'{"execute": "guest-info", "id": %d}' % n for n in range(40)))
                got = await proxy_lines(other, 40)
                assert got == [info[:-2] + b', "id": %d}\n' % n for n in range(40)], round_
                await other.send(b'{"execute": "guest-ping"}')
                assert await proxy_lines(other, 1) == [b'{"return": {}}\n']
    assert real_agent.alive()


async def test_agent_hung_then_resumes(real_agent):
    """An agent that accepts nothing and answers nothing (stopped): the
    proxy's sync goes unanswered, requests fail fast saying so; when the
    agent runs again the proxy notices by itself and serves."""
    real_agent.proc.send_signal(signal.SIGSTOP)
    try:
        async with run_proxy(
            "unix:" + str(real_agent.path), request_timeout=60, sync_timeout=0.5, backoff_max=0.5
        ) as proxy:
            with trio.fail_after(STEP):
                await proxy.wait_state(State.UNAVAILABLE)
            async with await Client.connect(proxy.config.listen[0]) as client:
                for n in range(3):
                    line = await _ping(client, n)
                    _assert_not_available(line, n)
                    assert b"does not answer" in line
                real_agent.proc.send_signal(signal.SIGCONT)
                with trio.fail_after(STEP + 5):
                    await wait_ready(proxy)
                assert await _ping(client, 10) == b'{"return": {}, "id": 10}\n'
                await client.send(b'{"execute": "guest-get-host-name"}')
                (line,) = await proxy_lines(client, 1)
                assert line.startswith(b'{"return": {"host-name": ')
    finally:
        real_agent.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("waiting_for", ["a-reply", "a-sync"])
async def test_proxy_idles_while_waiting(real_agent, waiting_for):
    """While the proxy waits for the agent (a request in flight, or a sync
    unanswered), it has nothing to run: every task is blocked. A proxy
    that spins here burns a CPU for as long as an agent is slow or absent."""
    try:
        if waiting_for == "a-sync":
            real_agent.proc.send_signal(signal.SIGSTOP)
        async with run_proxy(
            "unix:" + str(real_agent.path), request_timeout=60, sync_timeout=0.5, backoff_max=0.5
        ) as proxy:
            async with await Client.connect(proxy.config.listen[0]) as client:
                if waiting_for == "a-reply":
                    with trio.fail_after(STEP):
                        await wait_ready(proxy)
                    real_agent.proc.send_signal(signal.SIGSTOP)
                    await client.send(b'{"execute": "guest-ping", "id": 1}')
                    await written_upstream(proxy, 1)
                else:
                    with trio.fail_after(STEP):
                        await proxy.wait_state(State.UNAVAILABLE)
                    assert proxy.router.next_deadline() is not None  # it will retry the sync
                with trio.fail_after(5):
                    await trio.testing.wait_all_tasks_blocked()
                real_agent.proc.send_signal(signal.SIGCONT)
                if waiting_for == "a-reply":
                    assert await proxy_lines(client, 1) == [b'{"return": {}, "id": 1}\n']
                else:
                    with trio.fail_after(STEP + 5):
                        await wait_ready(proxy)
    finally:
        real_agent.proc.send_signal(signal.SIGCONT)


async def test_large_reads_byte_for_byte(real_agent):
    """Replies over a MiB go to their client without being parsed (only the
    id at their end is read): still byte for byte the agent's, with each
    client's own id of any kind, also several in flight at once."""
    ids = [b'"s"', b"7", b'{"k": [1, "x"]}', b"null", None]

    def requests(handle: bytes) -> list[bytes]:
        out = []
        for i, ident in enumerate(ids):
            member = b', "id": %s' % ident if ident is not None else b""
            out.append(b'{"execute": "guest-file-seek", "arguments": {"handle": %s, "offset": %d, "whence": "set"}}\n' % (handle, i))
            out.append(b'{"execute": "guest-file-read", "arguments": {"handle": %s, "count": %d}%s}\n'
                       % (handle, (1 << 20) + 4096 * i, member))
        return out

    with readable_by_agent("large.bin", os.urandom(3 << 20)) as path:
        open_req = b'{"execute": "guest-file-open", "arguments": {"path": "%s", "mode": "r"}}\n' % path.encode()
        with real_agent.connect(timeout=STEP) as conn:
            conn.sync()
            direct_handle = conn.request(open_req).split(b" ")[1].rstrip(b"}\n")
            direct = [conn.request(r) for r in requests(direct_handle)]
            conn.request(b'{"execute": "guest-file-close", "arguments": {"handle": %s}}\n' % direct_handle)
        assert all(len(line) > (1 << 20) for line in direct[1::2]), [line[:120] for line in direct]

        async with run_proxy("unix:" + str(real_agent.path)) as proxy:
            with trio.fail_after(STEP):
                await wait_ready(proxy)
            async with await Client.connect(proxy.config.listen[0]) as client:
                await client.send(open_req)
                (opened,) = await proxy_lines(client, 1)
                handle = opened.split(b" ")[1].rstrip(b"}\n")
                # All at once: the reads are in flight together.
                await client.send(b"".join(requests(handle)))
                got = await proxy_lines(client, len(direct))
        assert got == direct
