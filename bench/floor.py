"""The floor under (b): a trio server that answers every client's ping
itself, with the proxy's own I/O: one task reads every client through
qgaproxy.reactor.Reactor (their sockets in one epoll set), each read is
answered by a write on the spot. No agent, no parsing, no ids. No program
built on that I/O serves more requests per second on the same machine,
so it shows how much of (b) the machine and the I/O library leave.

With --tasks it is the design the proxy had before: a trio task per
client (wait until readable, read, write on the spot), for comparison.

    python bench/floor.py LISTEN_SOCKET [--tasks]
"""

import json
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qgaproxy.reactor import Reactor  # noqa: E402

PONG = b'{"return": {}}\n'


def _answer(line: bytes) -> bytes:
    if b"guest-sync" not in line:
        return PONG
    ident = json.loads(line.lstrip(b"\xff"))["arguments"]["id"]
    return b'\xff{"return": %d}\n' % ident


class Conn:
    __slots__ = ("stream", "fd", "buf")

    def __init__(self, stream):
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.buf = b""

    def answer(self, data: bytes) -> bytes:
        """What this read's complete lines get back."""
        buf = self.buf + data
        if b"guest-sync" in buf:  # a sync (only at connect): its own answer
            lines = buf.split(b"\n")
            self.buf = lines.pop()
            return b"".join(_answer(line) for line in lines)
        lines = buf.count(b"\n")
        self.buf = buf[buf.rfind(b"\n") + 1 :]
        return PONG * lines


async def serve_task(stream) -> None:
    """--tasks: one trio task per client."""
    conn = Conn(stream)
    try:
        while True:
            await trio.lowlevel.wait_readable(conn.fd)
            data = os.read(conn.fd, 65536)
            if not data:
                return
            out = conn.answer(data)
            if out:
                sent = os.write(conn.fd, out)  # on the spot, as the proxy writes
                if sent < len(out):
                    await stream.send_all(out[sent:])
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def main(listen_path: str, tasks: bool) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(listen_path)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    if tasks:
        await trio.serve_listeners(serve_task, [listener])
        return
    reactor = Reactor()

    def handle(conn: Conn, now: float) -> None:
        try:
            data = os.read(conn.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            reactor.unwatch(conn.fd)
            conn.stream.socket.close()
            return
        out = conn.answer(data)
        if out:
            try:
                os.write(conn.fd, out)  # (a ping's reply always fits a fresh socket buffer)
            except OSError:  # it left; its end of file comes next
                pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, handle, lambda: None)
        while True:
            stream = await listener.accept()
            conn = Conn(stream)
            reactor.watch(conn.fd, conn)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], "--tasks" in sys.argv[2:])
