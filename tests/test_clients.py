"""Real client software, and the conversation styles of the clients that
matter, against the proxy in front of the real qemu-ga.

The agent's answers are measured directly first (before the proxy owns the
agent's only connection) and the clients' results are compared with them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import attrs
import pytest
import trio

from proxyutil import run_proxy, wait_ready

STEP = 10.0

# Requests measured directly, in the compact form libvirt and qemu.qmp write.
DIRECT = {
    "guest-ping": b'{"execute":"guest-ping"}',
    "guest-info": b'{"execute":"guest-info"}',
    "guest-get-host-name": b'{"execute":"guest-get-host-name"}',
    "guest-get-osinfo": b'{"execute":"guest-get-osinfo"}',
    "guest-no-such-command": b'{"execute":"guest-no-such-command"}',
    "guest-exec": b'{"execute":"guest-exec","arguments":{"path":"/bin/true"}}',
}


@attrs.frozen
class Setup:
    path: str  # the proxy's socket
    direct: dict  # command -> the agent's reply line (bytes, no id)
    proxy: object

    def value(self, command: str):
        """The agent's reply to command, decoded."""
        return json.loads(self.direct[command])


@pytest.fixture
async def served(real_agent):
    direct = {}
    with real_agent.connect(timeout=STEP) as conn:
        conn.sync()
        for name, request in DIRECT.items():
            direct[name] = conn.request(request + b"\n")
    assert direct["guest-ping"] == b'{"return": {}}\n'
    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        yield Setup(proxy.config.listen[0], direct, proxy)


class LineReader:
    def __init__(self, stream):
        self.stream = stream
        self.buf = b""

    async def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


# -- libvirt (src/qemu/qemu_agent.c) ---------------------------------------------


class LibvirtStyle:
    """One persistent connection; before every command a guest-sync with a
    millisecond timestamp id (no 0xFF), replies read line by line, syncs
    with another id and replies nobody waits for are ignored; commands
    carry no id."""

    def __init__(self, stream):
        self.reader = LineReader(stream)
        self.stream = stream
        self.last_id = 0

    async def sync(self) -> None:
        ident = max(int(time.time() * 1000), self.last_id + 1)
        self.last_id = ident
        await self.stream.send_all(b'{"execute":"guest-sync","arguments":{"id":%d}}\n' % ident)
        while True:
            obj = json.loads(await self.reader.line())
            if obj.get("return") == ident:
                assert obj == {"return": ident}
                return
            # libvirt: "Ignoring delayed reply to guest-sync"; a proxy that
            # is transparent never makes us get here.
            raise AssertionError("unexpected reply while syncing: %r" % obj)

    async def command(self, request: bytes) -> bytes:
        await self.sync()
        await self.stream.send_all(request + b"\n")
        return await self.reader.line() + b"\n"


async def test_libvirt_style(served):
    commands = ["guest-ping", "guest-info", "guest-get-host-name", "guest-no-such-command", "guest-exec"]

    async def one_client(rounds: int):
        stream = await trio.open_unix_socket(served.path)
        client = LibvirtStyle(stream)
        for n in range(rounds):
            for name in commands:
                assert await client.command(DIRECT[name]) == served.direct[name], (n, name)
        await stream.aclose()

    with trio.fail_after(30):
        await one_client(4)
        # Several libvirt-like clients at once (as if several tools shared
        # the channel): each sees its own conversation.
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one_client, 3)


# -- Proxmox (PVE/QMPClient.pm) ------------------------------------------------------


async def proxmox_cmd(path: str, cmd_id: int, command: bytes, more: list | None = None) -> list:
    """A connection per command queue: per command ONE write of
    guest-sync-delimited + command, no 0xFF, no id; keep everything, cut at
    the LAST 0xFF, expect two lines (the sync's return, then the reply)."""
    stream = await trio.open_unix_socket(path)
    results = []
    try:
        for n, cmd in enumerate([command] + (more or [])):
            sync_id = cmd_id * 100 + n
            await stream.send_all(
                b'{"execute":"guest-sync-delimited","arguments":{"id":%d}}\n' % sync_id + cmd + b"\n"
            )
            buf = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EOFError(buf)
                buf += chunk
                tail = buf.rsplit(b"\xff", 1)
                if len(tail) == 2 and tail[1].count(b"\n") >= 2:
                    break
            lines = tail[1].split(b"\n")
            assert lines[2:] == [b""], buf  # exactly two lines after the 0xFF
            assert json.loads(lines[0]) == {"return": sync_id}, buf
            results.append(lines[1] + b"\n")
    finally:
        await stream.aclose()
    return results


async def test_proxmox_style(served):
    # PVE's to_json: key order is Perl's hash order, and arguments is always
    # present ({} when the command has none).
    ping = b'{"arguments":{},"execute":"guest-ping"}'
    info = b'{"execute":"guest-info","arguments":{}}'
    host = b'{"arguments":{},"execute":"guest-get-host-name"}'
    with trio.fail_after(30):
        for n in range(5):
            assert await proxmox_cmd(served.path, 12340 + n, ping) == [served.direct["guest-ping"]]
        assert await proxmox_cmd(served.path, 12350, info) == [served.direct["guest-info"]]
        assert await proxmox_cmd(served.path, 12351, host) == [served.direct["guest-get-host-name"]]
        # queue_cmd: several commands on one connection, one after the other.
        assert await proxmox_cmd(served.path, 12352, ping, [info, host]) == [
            served.direct["guest-ping"],
            served.direct["guest-info"],
            served.direct["guest-get-host-name"],
        ]
        # Many Proxmox workers at once (pvestatd, the API, qm ...).
        results = {}

        async def worker(k: int):
            results[k] = await proxmox_cmd(served.path, 20000 + k, [ping, info, host][k % 3])

        async with trio.open_nursery() as nursery:
            for k in range(24):
                nursery.start_soon(worker, k)
        for k, got in results.items():
            assert got == [served.direct[["guest-ping", "guest-info", "guest-get-host-name"][k % 3]]]


# -- qemu.qmp (the library, asyncio) -------------------------------------------------


def _run_qemu_qmp(path: str) -> dict:
    from qemu.qmp import ExecuteError, QMPClient

    async def main():
        client = QMPClient("qgaproxy-test")
        client.await_greeting = False
        client.negotiate = False
        await asyncio.wait_for(client.connect(path), STEP)
        out = {}
        try:
            out["ping"] = await asyncio.wait_for(client.execute("guest-ping"), STEP)
            out["info"] = await asyncio.wait_for(client.execute("guest-info"), STEP)
            out["host"] = await asyncio.wait_for(client.execute("guest-get-host-name"), STEP)
            try:
                await asyncio.wait_for(client.execute("guest-no-such-command"), STEP)
            except ExecuteError as exc:
                out["error"] = exc.error_class, exc.error.error.desc
                out["error_id"] = exc.received.get("id"), exc.sent.get("id")
            # Pipelined: all written before any reply is read.
            out["gathered"] = await asyncio.wait_for(
                asyncio.gather(
                    *[
                        client.execute(name)
                        for name in ["guest-get-host-name", "guest-ping", "guest-info"] * 6 + ["guest-get-osinfo"]
                    ]
                ),
                STEP,
            )
            out["sync"] = await asyncio.wait_for(client.execute("guest-sync", {"id": 12345}), STEP)
            out["running"] = client.runstate.name
        finally:
            await asyncio.wait_for(client.disconnect(), STEP)
        return out

    return asyncio.run(main())


async def test_qemu_qmp_library(served):
    with trio.fail_after(60):
        out = await trio.to_thread.run_sync(_run_qemu_qmp, served.path, abandon_on_cancel=True)
    assert out["ping"] == {}
    assert out["info"] == served.value("guest-info")["return"]
    assert out["host"] == served.value("guest-get-host-name")["return"]
    missing = served.value("guest-no-such-command")["error"]
    assert out["error"] == (missing["class"], missing["desc"])
    sent_id = out["error_id"][1]
    assert isinstance(sent_id, str) and sent_id.startswith("__qmp#")
    assert out["error_id"][0] == sent_id
    want = [
        served.value(name)["return"]
        for name in ["guest-get-host-name", "guest-ping", "guest-info"] * 6 + ["guest-get-osinfo"]
    ]
    assert out["gathered"] == want
    assert out["sync"] == 12345
    assert out["running"] == "RUNNING"  # it never dropped the connection


async def test_qemu_qmp_concurrent_clients(served):
    """Several qemu.qmp clients, each pipelining with the same ids
    ("__qmp#00000", ...): each gets its own replies."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            results = []

            async def one():
                results.append(await trio.to_thread.run_sync(_run_qemu_qmp, served.path, abandon_on_cancel=True))

            for _ in range(4):
                nursery.start_soon(one)
    assert len(results) == 4
    for out in results:
        assert out["info"] == served.value("guest-info")["return"]
        assert out["gathered"][-1] == served.value("guest-get-osinfo")["return"]


# -- qmp-shell -N (the console script) -----------------------------------------------


async def test_qmp_shell(served):
    exe = shutil.which("qmp-shell")
    assert exe, "qmp-shell (from qemu.qmp) not installed"
    stdin = b"guest-ping\nguest-info\nguest-get-host-name\nguest-sync id=77\nguest-no-such-command\n"
    with trio.fail_after(60):
        result = await trio.run_process(
            [exe, "-N", served.path], stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    # Each reply is printed as json.dumps of the agent's reply (no id: the
    # shell sends none).
    printed = [json.loads(line.split("(QEMU) ")[-1]) for line in out.splitlines() if "{" in line]
    assert printed == [
        {"return": {}},
        served.value("guest-info"),
        served.value("guest-get-host-name"),
        {"return": 77},
        served.value("guest-no-such-command"),
    ], out


# -- socat (half-close after sending) -----------------------------------------------


async def _socat(path: str, data: bytes) -> bytes:
    exe = shutil.which("socat")
    assert exe, "socat not installed"
    # -t 30: socat would wait that long after its stdin ended for the
    # proxy to finish; the bound below is shorter, so a proxy that answered
    # but never closed the connection fails the test.
    with trio.fail_after(15):
        result = await trio.run_process(
            [exe, "-t30", "-", "UNIX-CONNECT:" + path], stdin=data, capture_stdout=True, capture_stderr=True
        )
    return result.stdout


async def test_socat_half_close(served):
    assert await _socat(served.path, b'{"execute":"guest-ping"}') == b'{"return": {}}\n'
    assert await _socat(served.path, b'{"execute":"guest-info"}') == served.direct["guest-info"]
    # Several requests in one go, the last with no newline.
    got = await _socat(
        served.path,
        b'{"execute":"guest-get-host-name","id":1}\n{"execute":"guest-ping","id":"b"}{"execute":"guest-info"}',
    )
    host = served.direct["guest-get-host-name"][:-2] + b', "id": 1}\n'
    assert got == host + b'{"return": {}, "id": "b"}\n' + served.direct["guest-info"]


async def test_plain_socket_half_close(served):
    """The same from a blocking socket (as a shell script's nc would)."""

    def run():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(STEP)
            s.connect(served.path)
            s.sendall(b'{"execute":"guest-info","id":9}')
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return data
                data += chunk

    with trio.fail_after(30):
        got = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    assert got == served.direct["guest-info"][:-2] + b', "id": 9}\n'
