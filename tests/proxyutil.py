"""Shared helpers for tests that run the proxy in-process (trio)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import trio

from qgaproxy.proxy import Proxy, ProxyConfig
from qgaproxy.transport import UpstreamAddress


@contextlib.asynccontextmanager
async def run_proxy(upstream: str, listen: list[str] | None = None, *, sim_agent=None, **options):
    """Start a Proxy in a nursery; yield it once every listener accepts.

    upstream: "unix:PATH", "serial:PATH" or "sim". listen defaults to one
    socket in a fresh temporary directory (proxy.config.listen[0])."""
    tmp = None
    if listen is None:
        tmp = tempfile.mkdtemp(prefix="qgaproxy-test-")
        listen = [os.path.join(tmp, "proxy.sock")]
    config = ProxyConfig(upstream=UpstreamAddress.parse(upstream), listen=tuple(listen), **options)
    proxy = Proxy(config, sim_agent=sim_agent)
    async with trio.open_nursery() as nursery:
        await proxy.start_serving(nursery)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
    for path in listen:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if tmp:
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


async def wait_ready(proxy: Proxy) -> None:
    """Wait until the upstream is synced (bounded by the caller's timeout)."""
    from qgaproxy.upstream import State

    await proxy.wait_state(State.READY)


class Client:
    """A raw agent-protocol client over a unix socket (trio)."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, path: str) -> "Client":
        return cls(await trio.open_unix_socket(path))

    async def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        await self.stream.send_all(data)

    async def read_line(self) -> bytes:
        """One reply line including its newline (and any 0xFF before it)."""
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError("connection closed; buffered %r" % self.buf[:200])
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    async def reply(self) -> dict:
        return json.loads((await self.read_line()).lstrip(b"\xff"))

    async def call(self, execute: str, arguments: dict | None = None, **extra) -> dict:
        message = {"execute": execute}
        if arguments is not None:
            message["arguments"] = arguments
        message.update(extra)
        await self.send(message)
        return await self.reply()

    async def at_eof(self) -> bool:
        chunk = await self.stream.receive_some(1 << 16)
        self.buf += chunk
        return not chunk

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


# ---------------------------------------------------------------------------
# Busy clients for fault scenarios (tests/vm/test_vm_proxy.py,
# tests/test_serial.py): each keeps requests pipelined through the proxy and
# checks every reply as it comes: exactly one per request, in order, with the
# request's own id and a body that fits the command it sent.
# ---------------------------------------------------------------------------

import collections  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

NOT_AVAILABLE = "Guest agent is not available: "
_TIMED_OUT = re.compile(r"^Guest agent command '([^']*)' timed out after [0-9.]+ seconds$")


class Progress:
    """A wake-up the busy clients pulse after every reply; tests wait on
    predicates over the clients' records, each wait bounded."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def until(self, predicate, timeout: float, what: str = "condition", describe=None) -> None:
        try:
            with trio.fail_after(timeout):
                while not predicate():
                    await self._event.wait()
        except trio.TooSlowError:
            extra = describe() if describe else ""
            raise AssertionError(f"{what}: not reached within {timeout}s {extra}") from None

