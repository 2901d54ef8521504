"""The reactor (one task waiting for every client socket) on real socket
pairs: who is handed over, how often, and when it wakes."""

from __future__ import annotations

import os
import socket

import trio
import trio.testing

from qgaproxy.reactor import Reactor


class Recorder:
    """A handler that reads what is there and notes each turn."""

    def __init__(self, reactor: Reactor):
        self.reactor = reactor
        self.turns: list[list] = [[]]
        self.changed = trio.Event()

    def handle(self, owner, now) -> None:
        name, sock = owner
        try:
            data = os.read(sock.fileno(), 65536)
        except BlockingIOError:
            data = None
        self.turns[-1].append((name, data))

    def after(self) -> None:
        self.turns.append([])
        self.changed.set()
        self.changed = trio.Event()

    def handled(self):
        return [turn for turn in self.turns if turn]

    async def wait(self, predicate) -> None:
        with trio.fail_after(10):
            while not predicate():
                await self.changed.wait()


def pairs(n: int):
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        a.setblocking(False)
        out.append((a, b))
    return out


async def test_every_ready_socket_in_one_turn_then_after_once():
    reactor = Reactor()
    rec = Recorder(reactor)
    socks = pairs(3)
    owners = [("c%d" % i, a) for i, (a, _) in enumerate(socks)]
    for owner in owners:
        reactor.watch(owner[1].fileno(), owner)
    for _, b in socks:
        b.send(b"x")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, rec.handle, rec.after)
        await rec.wait(lambda: rec.handled())
        nursery.cancel_scope.cancel()
    # All three in the first turn (the turn's order is epoll's).
    assert sorted(rec.handled()[0]) == [("c0", b"x"), ("c1", b"x"), ("c2", b"x")]
    for a, b in socks:
        a.close()
        b.close()


async def test_again_wakes_a_waiting_reactor_without_new_bytes():
    reactor = Reactor()
    rec = Recorder(reactor)
    (a, b), = pairs(1)
    owner = ("held", a)
    reactor.watch(a.fileno(), owner)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, rec.handle, rec.after)
        await trio.testing.wait_all_tasks_blocked()
        assert rec.handled() == []  # nothing readable: it waits
        reactor.again(owner)
        await rec.wait(lambda: rec.handled())
        assert rec.handled() == [[("held", None)]]  # handed over with nothing to read
        nursery.cancel_scope.cancel()
    a.close()
    b.close()


async def test_an_owner_is_handled_once_a_turn_even_when_also_readable():
    """One that asked for another turn (it holds input back) and whose
    socket is readable too is handed over once in that turn, not twice."""
    reactor = Reactor()
    rec = Recorder(reactor)
    (a, b), = pairs(1)
    owner = ("both", a)
    reactor.watch(a.fileno(), owner)
    b.send(b"y")
    reactor.again(owner)

    def hold(owner, now):  # works on what it holds: reads nothing
        rec.turns[-1].append((owner[0], "held"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, hold, rec.after)
        await rec.wait(lambda: len(rec.handled()) >= 2)  # (the socket stays readable)
        nursery.cancel_scope.cancel()
    assert rec.handled()[0] == [("both", "held")]
    a.close()
    b.close()


async def test_unwatched_sockets_are_not_handed_over_and_can_be_watched_again():
    reactor = Reactor()
    rec = Recorder(reactor)
    (a, b), (c, d) = pairs(2)
    quiet, loud = ("quiet", a), ("loud", c)
    reactor.watch(a.fileno(), quiet)
    reactor.watch(c.fileno(), loud)
    reactor.unwatch(a.fileno())
    reactor.unwatch(a.fileno())  # (twice: a no-op)
    assert not reactor.watching(a.fileno()) and reactor.watching(c.fileno())
    b.send(b"1")
    d.send(b"2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, rec.handle, rec.after)
        await rec.wait(lambda: rec.handled())
        assert rec.handled() == [[("loud", b"2")]]
        reactor.watch(a.fileno(), quiet)  # its byte is still there
        await rec.wait(lambda: len(rec.handled()) == 2)
        assert rec.handled()[1] == [("quiet", b"1")]
        nursery.cancel_scope.cancel()
    for s in (a, b, c, d):
        s.close()


async def test_the_ended_reactor_closed_its_descriptors_and_watches_nothing():
    before = len(os.listdir("/proc/self/fd"))
    reactor = Reactor()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, lambda owner, now: None, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(os.listdir("/proc/self/fd")) == before  # its epoll and eventfd are closed
    (a, b), = pairs(1)
    assert not reactor.watch(a.fileno(), ("late", a))  # shutting down: nothing to watch with
    reactor.unwatch(a.fileno())
    reactor.again(("late", a))  # (no wake-up to write to)
    assert not reactor.watching(a.fileno())
    a.close()
    b.close()


async def test_what_cannot_be_watched_is_refused_not_raised():
    reactor = Reactor()
    assert not reactor.watch(-1, ("not a descriptor", None))
    (a, b), = pairs(1)
    assert reactor.watch(a.fileno(), ("twice", a)) and reactor.watch(a.fileno(), ("twice", a))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reactor.run, lambda owner, now: None, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert not reactor.watch(b.fileno(), ("after the end", b))
    a.close()
    b.close()
