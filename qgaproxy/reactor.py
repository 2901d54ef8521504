"""One trio task that waits for every client socket at once.

A trio task per connection costs, per message, a trip through trio's
scheduler and an epoll_ctl to re-arm the socket (trio registers every wait
one-shot). With many busy clients that is as much CPU as the proxy's whole
protocol work. Here the client sockets sit in an epoll set of their own,
level-triggered and registered once; one task waits for that set to be
readable (an epoll descriptor is itself pollable, so trio's loop wakes it
like any socket) and then hands each ready socket to its handler, all in
one turn. The handlers are synchronous: they read, feed the router, and
return; what their input changed is carried out once per turn.

It owns nothing of the protocol and never blocks: a handler that holds
input back (a fairness piece, a client owed too much) asks for another
turn with `again`, which also wakes the task when it waits (through an
eventfd in the set: a cancel scope around every wait would cost more than
the rest of a turn).
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import Callable, Hashable

import trio

# Sockets handled per turn at most; the rest are reported on the next
# turn (level-triggered), after trio has run every other task once.
MAX_EVENTS = 256


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._owners: dict[int, Hashable] = {}
        self._again: dict = {}  # owners to handle on the next turn (a dict keeps their order)
        self._waiting = False  # the task waits for the set to be readable
        self._woken = False  # the eventfd was written and not read yet
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)

    def watch(self, fd: int, owner: Hashable) -> bool:
        """Hand `owner` to the handler whenever fd is readable. False when
        it cannot be watched: the reactor has ended (shutting down), fd is
        not a descriptor, or the kernel refuses (the limit on epoll
        watches, no memory); the caller then drops that one connection."""
        if self._epoll.closed:
            return False
        try:
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except FileExistsError:  # (this very socket is in the set already)
                self._epoll.modify(fd, select.EPOLLIN)
        except (OSError, ValueError):
            return False
        self._owners[fd] = owner
        return True

    def unwatch(self, fd: int) -> None:
        """Stop watching fd (before it is closed); a no-op if not watched."""
        if self._owners.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._owners

    def again(self, owner: Hashable) -> None:
        """Hand `owner` to the handler on the next turn, readable or not
        (it holds input it has not fed yet)."""
        self._again[owner] = None
        if self._waiting and not self._woken:
            self._woken = True
            os.eventfd_write(self._wake, 1)

    def forget(self, owner: Hashable) -> None:
        self._again.pop(owner, None)

    async def run(self, handle: Callable[[Hashable, float], None], after: Callable[[], None]) -> None:
        """Forever: wait until a watched socket is readable (or an owner
        asked for another turn), call handle(owner, now) for each, then
        after() once."""
        epoll = self._epoll
        fd = epoll.fileno()
        wake = self._wake
        owners = self._owners
        try:
            while True:
                if self._again:
                    await trio.lowlevel.checkpoint()  # others run first: this is a new turn
                else:
                    self._waiting = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    finally:
                        self._waiting = False
                again, self._again = self._again, {}
                now = trio.current_time()
                for owner in again:
                    handle(owner, now)
                for ready, _ in epoll.poll(0, MAX_EVENTS):
                    owner = owners.get(ready)
                    if owner is not None:
                        if owner not in again:
                            handle(owner, now)
                    elif ready == wake:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(wake)
                        self._woken = False
                after()
        finally:
            epoll.close()
            os.close(wake)
