"""The floor under (b): a trio server that answers every client's ping
itself, with the proxy's own I/O: one task reads every client through
qgaproxy.reactor.Reactor (their sockets in one epoll set), each read is
answered by a write on the spot. No agent, no parsing, no ids. No program
built on that I/O serves more requests per second on the same machine,
so it shows how much of (b) the machine and the I/O library leave.

With --tasks it is the design the proxy had before: a trio task per
client (wait until readable, read, write on the spot), for comparison.

With --agent AGENT_SOCKET it is the floor of a multiplexer: the same
reactor reads every client and the agent's channel, each client's
requests go to the agent as they came, and the agent's replies go back in
order (a queue of who asked: the agent answers one request at a time, in
order). No parsing, no ids, no timeouts, no checks: nothing a real proxy
may leave out, except all of its logic. It answers syncs itself (the
benchmark's clients send one at connect) and is not a usable proxy.

With --router AGENT_SOCKET it is the floor of the proxy's own logic: the
proxy's router (qgaproxy.router: parsing, checks, ids, per-client order,
the pending table) behind the thinnest shell there is, the same reactor
for every client and the agent, every write on the spot; no timer task,
no metrics, no logs, no pausing, no writer tasks. Every request the proxy
serves costs at least this.

    python bench/floor.py LISTEN_SOCKET [--tasks | --agent AGENT_SOCKET | --router AGENT_SOCKET]
"""

import json
import os
import random
import sys
from collections import deque
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
    __slots__ = ("stream", "fd", "buf", "client")

    def __init__(self, stream):
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.buf = b""
        self.client = None  # --router: its client in the router

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


def read(reactor: Reactor, conn: Conn) -> bytes | None:
    """A read from a client: its bytes; b"" when it has left (it is then
    watched no more, and closed); None when nothing was there."""
    try:
        data = os.read(conn.fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        data = b""
    if not data:
        reactor.unwatch(conn.fd)
        conn.stream.socket.close()
    return data


async def serve(listener, reactor: Reactor, handle, after, accepted=lambda conn: None) -> None:
    """The reactor's task, and every new client watched by it (after
    accepted(conn))."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, handle, after)
        while True:
            conn = Conn(await listener.accept())
            accepted(conn)
            reactor.watch(conn.fd, conn)


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


async def open_agent(path: str) -> trio.SocketStream:
    """The agent's channel, synced (0xFF, guest-sync-delimited)."""
    agent = await trio.open_unix_socket(path)
    ident = random.randrange(1 << 40)
    await agent.send_all(b'\xff{"execute":"guest-sync-delimited","arguments":{"id":%d}}\n' % ident)
    seen = b""
    while b'{"return": %d}\n' % ident not in seen:
        seen += await agent.receive_some(65536)
    return agent


async def multiplex(listener, agent_path: str) -> None:
    """--agent: requests to the agent as they came, replies back in order."""
    agent = await open_agent(agent_path)
    agent_fd = agent.socket.fileno()
    reactor = Reactor()
    waiting: deque = deque()  # who asked, one entry per request sent
    to_agent: list = []
    state = {"rest": b""}  # the agent's partial reply line

    def handle(conn, now: float) -> None:
        if conn is agent:
            data = state["rest"] + os.read(agent_fd, 65536)
            end = data.rfind(b"\n") + 1
            state["rest"] = data[end:]
            replies: dict = {}
            for line in data[:end].splitlines(keepends=True):
                asker = waiting.popleft()
                replies[asker] = replies.get(asker, b"") + line
            for asker, out in replies.items():
                if asker.fd >= 0:
                    try:
                        os.write(asker.fd, out)
                    except OSError:
                        pass
            return
        data = read(reactor, conn)
        if not data:
            if data is not None:
                conn.fd = -1  # (its replies still to come go nowhere)
            return
        buf = conn.buf + data
        if b"guest-sync" in buf:  # the benchmark client's sync, at connect
            conn.buf = b""
            os.write(conn.fd, conn.answer(data))
            return
        end = buf.rfind(b"\n") + 1
        conn.buf = buf[end:]
        if end:
            to_agent.append(buf[:end])
            waiting.extend([conn] * buf.count(b"\n", 0, end))

    def after() -> None:
        if to_agent:
            data = b"".join(to_agent)
            to_agent.clear()
            sent = os.write(agent_fd, data)  # (a floor: what 16 pings need always fits)
            assert sent == len(data)

    reactor.watch(agent_fd, agent)
    await serve(listener, reactor, handle, after)


async def routed(listener, agent_path: str) -> None:
    """--router: the proxy's router behind the thinnest shell."""
    from qgaproxy.router import Router
    from qgaproxy.upstream import Timings, Upstream

    router = Router(Upstream(Timings(sync_timeout=1.0)))
    agent = await trio.open_unix_socket(agent_path)
    agent_fd = agent.socket.fileno()
    reactor = Reactor()
    conns: dict = {}  # router client -> Conn

    def handle(conn, now: float) -> None:
        if conn is agent:
            router.upstream_data(os.read(agent_fd, 65536), now)
            return
        data = read(reactor, conn)
        if data:
            router.client_data(conn.client, data, now)
        elif data is not None:
            conns.pop(conn.client, None)
            router.remove_client(conn.client)

    def after() -> None:
        now = trio.current_time()
        for client in router.pop_dirty():
            conn = conns.get(client)
            if conn is not None:
                try:
                    os.write(conn.fd, router.take_output(client))
                except OSError:
                    pass
        while router.wants_write():
            data = router.take_upstream_write(now)
            if data:
                os.write(agent_fd, data)
            router.upstream_write_done(now)

    def accepted(conn: Conn) -> None:
        conn.client = router.add_client()
        conns[conn.client] = conn

    router.upstream_connected(trio.current_time())
    reactor.watch(agent_fd, agent)
    after()
    await serve(listener, reactor, handle, after, accepted)


async def main(listen_path: str, tasks: bool, agent_path: str | None, router_path: str | None) -> None:
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(listen_path)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    if tasks:
        await trio.serve_listeners(serve_task, [listener])
        return
    if agent_path:
        await multiplex(listener, agent_path)
        return
    if router_path:
        await routed(listener, router_path)
        return
    reactor = Reactor()

    def handle(conn: Conn, now: float) -> None:
        data = read(reactor, conn)
        out = conn.answer(data) if data else b""
        if out:
            try:
                os.write(conn.fd, out)  # (a ping's reply always fits a fresh socket buffer)
            except OSError:  # it left; its end of file comes next
                pass

    await serve(listener, reactor, handle, lambda: None)


if __name__ == "__main__":
    args = sys.argv[2:]

    def option(name: str) -> str | None:
        return args[args.index(name) + 1] if name in args else None

    trio.run(main, sys.argv[1], "--tasks" in args, option("--agent"), option("--router"))
