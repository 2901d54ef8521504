"""The trio shell around the router: sockets, tasks, time.

One task owns the upstream channel (connect, read; a second one writes),
one task reads every client connection (reactor.py: their sockets in one
epoll set), a task per connection writes what could not be written on
the spot, one task keeps time. They share a single Router (single-threaded
trio: no locks) and wake each other through per-purpose signals; nothing
here decides anything about the protocol. Every wait has a bound: client
writes have a deadline, requests have deadlines kept by the router, reads
pause when a client is owed too much.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import attrs
import trio

from . import audit, status, transport
from .audit import AuditConfig
from .metrics import MetricsRegistry
from .reactor import Reactor
from .router import DEFAULT_CLIENT_BACKLOG, DEFAULT_REQUEST_TIMEOUT, DEFAULT_WINDOW, Budget, Client, Observer, Router
from .transport import UpstreamAddress
from .upstream import State, Timings, Upstream

log = logging.getLogger("qgaproxy")

# Per read. Bytes read but not yet parsed are outside the buffer budget,
# so this bounds what a thousand clients can hold uncounted.
READ_SIZE = 64 * 1024
# What the parser takes at once from one client before the client's
# backlog is checked again, and (if that piece made replies) before the
# next turn of the reader: input that is all one-byte errors ("}}}}", NUL bytes)
# costs an error reply per byte, and a whole read of it would hold every
# other client up for a second and queue 64K replies past the backlog; a
# piece of this size is about 10 ms of such replies at most.
# Pieces that make nothing (the middle of a big request) go on at once, and
# grow: a 48 MiB request is not cut into 512-byte bites.
FEED_SIZE = 512
# The weight of each new reply time in the running estimate that decides
# whether busy polling is worth it (see Proxy._spin_loop).
REPLY_TIME_WEIGHT = 0.125

# What a peer going away looks like from a trio stream.
_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@attrs.frozen
class ProxyConfig:
    """One agent's runtime settings (see config.py for the file form)."""

    upstream: UpstreamAddress
    listen: tuple[str, ...] = ()
    name: str = "default"
    # Listener details (mode, owner, group, name); when empty, one
    # ListenerConfig per path in listen with socket_mode.
    listeners: tuple = ()
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    command_timeouts: tuple = ()
    window: int = DEFAULT_WINDOW
    sync_timeout: float = 1.0
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    max_message_size: int = 64 << 20
    client_backlog: int = DEFAULT_CLIENT_BACKLOG
    # A client that leaves replies unread this long is disconnected.
    client_write_timeout: float = 30.0
    socket_mode: int = 0o660
    # On SIGTERM: how long in-flight requests may take to finish.
    shutdown_grace: float = 2.0
    metrics: tuple[str, int] | None = None
    connect_timeout: float = 5.0
    freeze_max: float = 600.0
    # Seconds between polls of the guest exporter; 0: no guest metrics.
    guest_metrics_interval: float = 0.0
    # Busy polling (seconds; 0: off): after a request goes to an idle
    # agent that usually answers within this time, the event loop keeps
    # polling instead of sleeping, for at most this long (see _spin_loop).
    busy_poll: float = 200e-6
    # unix-listen: who may connect as the channel (QEMU's uid); empty: any
    # peer the socket's mode (0660) lets in.
    upstream_peer_uids: tuple = ()
    # The audit trail (an audit.AuditConfig) of a proxy that is the whole
    # process; under a Server, the server's shared log is used instead.
    audit: AuditConfig | None = None

    def listener_configs(self) -> tuple:
        if self.listeners:
            return self.listeners
        from .config import ListenerConfig

        return tuple(ListenerConfig(path, mode=self.socket_mode) for path in self.listen)

    def listen_paths(self) -> tuple[str, ...]:
        return tuple(listener.path for listener in self.listener_configs())

    @classmethod
    def from_agent(cls, agent, **extra) -> "ProxyConfig":
        """From a config.AgentConfig."""
        s = agent.settings
        return cls(
            upstream=agent.upstream,
            name=agent.name,
            listeners=agent.listeners,
            request_timeout=s.request_timeout,
            command_timeouts=s.command_timeouts,
            window=s.window,
            sync_timeout=s.sync_timeout,
            backoff_min=s.backoff_min,
            backoff_max=s.backoff_max,
            max_message_size=s.max_message_size,
            client_backlog=s.client_backlog,
            client_write_timeout=s.client_write_timeout,
            shutdown_grace=s.shutdown_grace,
            connect_timeout=s.connect_timeout,
            freeze_max=s.freeze_max,
            guest_metrics_interval=s.guest_metrics_interval,
            busy_poll=s.busy_poll_us / 1e6,
            upstream_peer_uids=agent.upstream_peer_uids,
            **extra,
        )


class Signal:
    """A reusable wake-up: wait() returns after the next set()."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        event = self._event
        await event.wait()
        if self._event is event:
            self._event = trio.Event()


@attrs.define(eq=False)
class Session:
    client: Client
    stream: trio.abc.Stream
    listener: str
    peer: tuple | None
    writable: Signal = attrs.field(factory=Signal)
    # The socket's descriptor: watched by the reactor for reads, and for
    # writes made on the spot (see _write_now).
    fd: int = -1
    # Bytes a write on the spot could not place: the writer task sends
    # them (with its deadline) before anything else.
    rest: bytes = b""
    sending: bool = False  # the writer task is inside send_all
    reading: bool = True  # False once the client is read no more (end of input, closing, an error)
    paused: bool = False  # not watched for now: the client is owed too much
    # A read not fed to the router yet (from `held_at` on; see
    # Proxy._client_input), and the size of the next piece.
    held: bytes = b""
    held_at: int = 0
    piece: int = 0
    # Cancelled to end the connection (a read error, an internal error).
    cancel: trio.CancelScope = attrs.field(factory=trio.CancelScope)


def _write_now(fd: int, data: bytes) -> int:
    """Write what the kernel takes at once, without waiting: the fast path
    that spares a task switch per message when a socket is writable (it
    almost always is). Returns the count written; an error counts as 0 and
    is left for the writer task's send_all to meet and report."""
    try:
        return os.write(fd, data)
    except OSError:  # EAGAIN, EINTR, or an error the writer task will meet
        return 0


async def _receive(stream, fd: int) -> bytes:
    """stream.receive_some(READ_SIZE), one system call shorter: wait until
    the socket is readable, then read (trio's own tries the read first,
    which on a quiet socket fails with EAGAIN and then waits anyway)."""
    if fd < 0:
        return await stream.receive_some(READ_SIZE)
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            continue


def _fileno(stream) -> int:
    """The descriptor under a trio stream, or -1 (no fast path)."""
    sock = getattr(stream, "socket", None)
    if sock is not None:
        return sock.fileno()
    fileno = getattr(stream, "fileno", None)
    return fileno() if fileno is not None else -1


class _AgentLog(logging.LoggerAdapter):
    """Log lines of one agent, prefixed with its name when there are several."""

    def __init__(self, logger: logging.Logger, name: str):
        super().__init__(logger, {"agent": name})
        self._prefix = "" if name == "default" else "[%s] " % name

    def process(self, msg, kwargs):
        kwargs.setdefault("extra", {}).update(self.extra)
        return self._prefix + msg, kwargs


class _Fanout(Observer):
    """Passes router events to metrics and logs."""

    def __init__(self, proxy: "Proxy"):
        self.proxy = proxy
        self.log = proxy.log

    def request_done(self, command, outcome, duration, queued):
        proxy = self.proxy
        if duration > 0.0:  # it went to the agent: how long the agent took
            # Capped: one timeout (5 s) must not turn polling off for the
            # next hundred requests; a slow agent still pushes it off.
            sample = min(duration, 2 * proxy.config.busy_poll)
            proxy._reply_time += (sample - proxy._reply_time) * REPLY_TIME_WEIGHT
        # Counted after the replies are written (Proxy._after): off the
        # path a reply takes.
        done = proxy._done
        done.append((command, outcome, duration, queued))
        if len(done) >= 1024:
            self.proxy._count_done()

    def stale_reply(self, why):
        self.log.debug("dropped a reply that matches no request: %s", why)
        if self.proxy.metrics:
            self.proxy.metrics.stale_reply(why)

    def garbage(self, nbytes):
        self.log.info("dropped %d bytes from the agent that were not a reply", nbytes)
        if self.proxy.metrics:
            self.proxy.metrics.garbage(nbytes)

    def resync(self, reason):
        self.log.info("resyncing the agent channel (%s)", reason)
        if self.proxy.metrics:
            self.proxy.metrics.resync(reason)

    def state_changed(self, old, new, reason):
        upstream = self.proxy.upstream
        info = upstream.info
        extra = ""
        if new is State.READY and info is not None:
            extra = " (agent %s, %d commands, %s)" % (
                info.version,
                len(info.commands),
                "echoes ids" if info.echoes_id else "does not echo ids: one request at a time",
            )
        self.log.info("agent %s -> %s%s%s", old.value, new.value, " after " + reason if reason and new is not State.READY else "", extra)
        if self.proxy.metrics:
            self.proxy.metrics.state_changed(old, new, reason)
        self.proxy._state_changed.set()

    def timeout(self, command, after, client):
        self.log.warning("command %s from client %d timed out after %gs", command, client.number, after)
        if self.proxy.metrics:
            self.proxy.metrics.timeout(command, after, client)

    def client_disconnect_requested(self, client, why):
        self.log.warning("closing client %d: %s", client.number, why)

    def trace_request(self, client, request):
        from . import redact

        self.log.debug(
            "client %d -> %s%s%s",
            client.number,
            request.execute,
            " arguments=%s" % json.dumps(redact.arguments(request.execute, request.arguments)) if request.arguments is not None else "",
            " id=%s" % request.id_json().decode() if request.has_id else "",
        )

    def trace_reply(self, client, command, value):
        from . import redact

        text = json.dumps(redact.reply(command, value))
        if len(text) > 2000:
            text = text[:2000] + "...(%d bytes)" % len(text)
        self.log.debug("client %d <- %s %s", client.number, command, text)

    def trace_local(self, client, command, data):
        from . import redact

        if command in redact.SECRET_ARGUMENTS:
            text = "<reply redacted: %d bytes>" % len(data)
        else:
            text = data.decode("ascii", "replace").strip()
        if len(text) > 2000:
            text = text[:2000] + "...(%d bytes)" % len(text)
        self.log.debug("client %d <- %s %s (from the proxy)", client.number, command, text)

    def denied(self, client, command):
        self.log.info("client %d on %s: %s denied by policy", client.number, client.listener, command)
        self.proxy.metrics.denied(client, command)

    def freeze_guard(self, why):
        self.log.warning("freeze guard: thawing the guest: %s", why)
        self.proxy.metrics.freeze_guard(why)

    def frozen(self, frozen, owner):
        who = "client %d" % owner.number if owner is not None else "no client of ours"
        self.log.info("guest filesystems %s", "frozen by " + who if frozen else "thawed")
        self.proxy.metrics.frozen_changed(frozen)

    def internal_result(self, command, ok, detail):
        if ok:
            self.log.info("proxy's own %s: done", command)
        else:
            self.log.warning("proxy's own %s failed: %s", command, detail)

    def audit(self, client, request, outcome, duration):
        log = self.proxy.audit_log
        if log is None or not audit.wanted(client, request.execute):
            return
        log.write(
            audit.record(
                wall=time.time(),
                agent=self.proxy.config.name,
                client=client,
                command=request.execute,
                arguments=request.arguments,
                outcome=outcome,
                duration=duration,
                full=log.full,
            )
        )

    def memory_limit(self, client, total):
        self.log.warning("closing client %d: the total buffer limit (%d bytes) is reached", client.number, total)
        self.proxy.metrics.memory_limit(client, total)


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        sim_agent=None,
        metrics_registry: MetricsRegistry | None = None,
        budget: Budget | None = None,
        audit_log=None,
    ):
        """audit_log: an audit.AuditLog shared by the process (a Server's);
        without one, config.audit opens one of this proxy's own."""
        self.config = config
        self.log = _AgentLog(log, config.name)
        self.upstream = Upstream(
            Timings(sync_timeout=config.sync_timeout, backoff_min=config.backoff_min, backoff_max=config.backoff_max)
        )
        self.metrics_registry = metrics_registry or MetricsRegistry()
        self.metrics = self.metrics_registry.for_agent(config.name, self.upstream)
        self.router = Router(
            self.upstream,
            window=config.window,
            request_timeout=config.request_timeout,
            command_timeouts=dict(config.command_timeouts),
            client_backlog=config.client_backlog,
            max_message_size=config.max_message_size,
            observer=_Fanout(self),
            freeze_max=config.freeze_max,
            budget=budget,
        )
        self._open_clients: dict[str, int] = {}
        self.router.trace = log.isEnabledFor(logging.DEBUG)
        self.router.status = self._status
        self._own_audit = False
        self.audit_log = None
        if audit_log is None and config.audit is not None:
            audit_log = audit.open_log(config.audit)
            self._own_audit = audit_log is not None
        self.set_audit(audit_log)
        self.metrics.watch_router(self.router)
        self._sim_agent = sim_agent
        self._sessions: dict[Client, Session] = {}
        self._upstream_wake = Signal()
        self._done: list[tuple] = []  # finished requests not yet counted in the metrics
        # The channel's descriptor while connected (-1: none), for writes
        # made on the spot; what they could not place waits in _up_rest.
        self._up_fd = -1
        self._up_rest = b""
        self._up_sending = False
        self._timer_wake = Signal()
        # Busy polling: the spinner task polls until _spin_until (a
        # time.perf_counter() reading) while a reply is due.
        self._spin_wake = Signal()
        self._spin_until = 0.0
        self._reactor: Reactor | None = None  # made by start_serving
        self._reply_time = 0.0  # running estimate of the agent's reply time, seconds
        self.busy_polls = 0  # times the spinner was started
        self._timer_at: float | None = None
        self._listeners: list[trio.SocketListener] = []
        self._bound_paths: list[str] = []  # only these socket files are ours to remove
        self._upstream_listener: trio.SocketListener | None = None
        self._nursery: trio.Nursery | None = None
        self.ready = trio.Event()
        self.metrics_listeners = []
        self._draining = False
        self._state_changed = Signal()
        self._drained = Signal()

    def set_audit(self, audit_log) -> None:
        """Where audit records go from now on (None: nowhere, and the
        router does no work for them)."""
        self.audit_log = audit_log
        self.router.audit = audit_log is not None

    def _status(self, now: float) -> dict:
        listeners = [listener.label for listener in self.config.listener_configs()]
        return status.build(self.router, name=self.config.name, listeners=listeners, now=now, wall=time.time())

    def status(self) -> dict:
        """This agent's live status (status.build), now."""
        return self._status(trio.current_time())

    # -- the one place that turns router changes into wake-ups -----------------
    def _after(self) -> None:
        router = self.router
        # Replies first: a reply's latency ends when it is written.
        if router.dirty:
            self._write_replies()
        if router.wants_write():
            # On the spot when the agent is idle: that is the latency a lone
            # request sees. When it is busy anyway, the writer task's next
            # turn sends everything the clients queued meanwhile in one write.
            if self._up_fd < 0 or self._up_sending or self._up_rest or router.in_flight() or self._write_upstream_now():
                self._upstream_wake.set()
            elif self.config.busy_poll and self._reply_time <= self.config.busy_poll and router.in_flight():
                self._spin_until = time.perf_counter() + self.config.busy_poll
                self.busy_polls += 1
                self._spin_wake.set()
            if router.dirty:
                # What taking the upstream write answered itself (a sync
                # that waited for the channel to be ready).
                self._write_replies()
        deadline = router.next_deadline()
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            self._timer_at = deadline
            self._timer_wake.set()
        if self._done:
            self._count_done()
        if self._draining:
            self._drained.set()

    def _write_replies(self) -> None:
        """Write what clients are owed, on the spot where their sockets take
        it; wake the writer tasks for the rest, and readers paused on what
        they were owed (a reply of nothing, for a command that never
        answers, also lowers it)."""
        for client in self.router.pop_dirty():
            session = self._sessions.get(client)
            if session is None:
                continue
            written = False
            if not session.sending and not session.rest:
                self._write_client_now(session)
                written = not (session.rest or client.output or client.wants_close() or client.gone)
            if session.paused:
                self._resume(session)
            if not written:  # (all written: no need to wake the writer)
                session.writable.set()

    def _count_done(self) -> None:
        done, self._done = self._done, []
        request_done = self.metrics.request_done
        for args in done:
            request_done(*args)

    def _write_upstream_now(self) -> bool:
        """Write what the router has for the agent; True if the writer task
        has work left (what the kernel did not take, or more to send)."""
        router = self.router
        now = trio.current_time()
        while True:
            data = self._take_upstream(now)
            if data:
                sent = _write_now(self._up_fd, data)
                if sent < len(data):
                    self._up_rest = memoryview(data)[sent:]  # no copy of a large write
                    return True
                router.upstream_write_done(now)
            if not router.wants_write():
                return False

    def _write_client_now(self, session: Session) -> None:
        client = session.client
        if not client.output:
            return
        data = self._take_output(session)
        sent = _write_now(session.fd, data)
        if sent < len(data):
            session.rest = memoryview(data)[sent:]  # no copy of a large reply

    def _take_upstream(self, now: float) -> bytes:
        data = self.router.take_upstream_write(now)
        self.metrics.bytes_agent_out.inc(len(data))
        return data

    def _take_output(self, session: Session) -> bytes:
        data = self.router.take_output(session.client)
        self.metrics.bytes_client_out.inc(len(data))
        if session.paused:
            self._resume(session)
        return data

    # -- running -------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled or until SIGTERM/SIGINT (then drain and return)."""
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self.start_serving(nursery)
                    task_status.started(self)
                    async for signum in signals:
                        self.log.info("%s: stopping", signal.Signals(signum).name)
                        break
                    await self.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            self.remove_socket_files()
            self.close_audit()

    def close_audit(self) -> None:
        """Close the audit log if this proxy opened it."""
        if self._own_audit and self.audit_log is not None:
            self.audit_log.close()
        if self._own_audit:
            self.set_audit(None)

    async def start_serving(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        config = self.config
        if config.metrics is not None:
            # Standalone (not under a Server): this proxy is the whole process.
            self.metrics_registry.health = lambda: {config.name: self.upstream.state.value}
            self.metrics_registry.status = lambda: {config.name: self.status()}
            self.metrics_listeners = await nursery.start(
                _serve_metrics, self.metrics_registry, config.metrics[0], config.metrics[1]
            )
        try:
            for listener_config in config.listener_configs():
                listener = await transport.open_unix_listener(
                    listener_config.path, listener_config.mode, listener_config.owner, listener_config.group
                )
                self._listeners.append(listener)
                self._bound_paths.append(listener_config.path)
                nursery.start_soon(self._accept_loop, listener, listener_config)
            if config.upstream.kind == "unix-listen":
                # Listen before saying ready, so QEMU can connect from then on.
                self._upstream_listener = await transport.open_unix_listener(config.upstream.path, 0o660, backlog=1)
                self._bound_paths.append(config.upstream.path)
        except BaseException:
            for listener in self._listeners:
                listener.socket.close()
            self.remove_socket_files()
            raise
        nursery.start_soon(self._upstream_loop)
        # Made only now that nothing can fail before its task runs: the
        # task closes its descriptors when it ends.
        self._reactor = Reactor()
        nursery.start_soon(self._reactor.run, self._client_input, self._after)
        nursery.start_soon(self._timer_loop)
        if config.busy_poll > 0:
            nursery.start_soon(self._spin_loop)
        if config.guest_metrics_interval > 0:
            from . import exporter

            nursery.start_soon(exporter.poll, self, self.metrics.guest_state, config.guest_metrics_interval)
        self.log.info(
            "qgaproxy ready: listening on %s, upstream %s",
            ", ".join(config.listen_paths()),
            config.upstream,
        )
        self.ready.set()
        if config.metrics is not None:
            self.metrics_registry.serving = True

    async def wait_state(self, *states: State) -> None:
        """Return once the upstream is in one of the given states."""
        while self.upstream.state not in states:
            await self._state_changed.wait()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish for a short grace
        period, remove the socket files."""
        for listener in self._listeners:
            with trio.CancelScope(shield=True):
                await listener.aclose()
        self.remove_socket_files()
        self._draining = True
        with trio.move_on_after(self.config.shutdown_grace):
            while any(c.slots for c in self.router.clients):
                await self._drained.wait()

    def remove_socket_files(self) -> None:
        """Remove the socket files this proxy created (and only those)."""
        if self._upstream_listener is not None:
            self._upstream_listener.socket.close()
            self._upstream_listener = None
        paths, self._bound_paths = self._bound_paths, []
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # -- time -------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        router = self.router
        while True:
            deadline = router.next_deadline()
            self._timer_at = deadline
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await self._timer_wake.wait()
            router.tick(trio.current_time())
            # What we sleep until next: _after() wakes us only for an
            # earlier deadline than this.
            self._timer_at = router.next_deadline()
            self._after()

    async def _spin_loop(self) -> None:
        """Busy polling. A process that sleeps in epoll_wait and is woken by
        the agent's reply pays a wake-up (on a small VM host, about as long
        as a whole reply from an agent on the host). So after a request goes
        to an idle agent that usually answers within config.busy_poll, this
        task keeps the event loop turning without sleeping (each turn polls
        the sockets, timeout 0), until the reply is in or the time is up.
        The estimate makes it spin only where it pays: an agent in a VM
        that takes a millisecond gets no spinning at all. Real time, not
        trio's clock, bounds it (a test's MockClock does not move here)."""
        router = self.router
        while True:
            await self._spin_wake.wait()
            while router.in_flight() and time.perf_counter() < self._spin_until:
                await trio.lowlevel.cancel_shielded_checkpoint()

    # -- upstream ----------------------------------------------------------------------
    async def _open_upstream(self) -> trio.abc.Stream:
        address = self.config.upstream
        if address.kind == "unix":
            return await transport.open_unix(address.path)
        if address.kind == "unix-listen":
            # QEMU connects to us (-chardev socket,server=off,reconnect=N):
            # nothing else can take its one connection before we do.
            while True:
                stream = await self._upstream_listener.accept()
                allowed = self.config.upstream_peer_uids
                peer = transport.peer_credentials(stream)
                if not allowed or (peer is not None and peer[1] in allowed):
                    return stream
                self.log.warning(
                    "refused a connection on the channel socket from pid %s uid %s: not an allowed peer",
                    peer[0] if peer else "?",
                    peer[1] if peer else "?",
                )
                await trio.aclose_forcefully(stream)
        if address.kind == "tcp":
            return await transport.open_tcp(address.host, address.port)
        if address.kind == "vsock":
            return await transport.open_vsock(address.cid, address.port)
        if address.kind == "serial":
            return await transport.open_serial(address.path)
        if address.kind == "sim":
            from . import sim

            if self._sim_agent is None:
                self._sim_agent = sim.SimAgent(sim.SimConfig())
            ours, theirs = _socketpair_streams()
            self._nursery.start_soon(_serve_sim, self._sim_agent, theirs)
            return ours
        raise AssertionError(address)

    async def _upstream_loop(self) -> None:
        router = self.router
        upstream = self.upstream
        failures = 0
        while True:
            now = trio.current_time()
            if upstream.reconnect_at > now:
                await trio.sleep_until(upstream.reconnect_at)
            stream = None
            # Waiting for QEMU to connect to us has no deadline: that is
            # the connecting state (requests fail fast meanwhile).
            timeout = math.inf if self.config.upstream.kind == "unix-listen" else self.config.connect_timeout
            try:
                with trio.fail_after(timeout):
                    stream = await self._open_upstream()
            except (OSError, trio.TooSlowError) as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    self.log.warning("cannot open the agent channel %s: %s", self.config.upstream, exc)
                router.upstream_lost(trio.current_time())
                self._after()
                continue
            failures = 0
            self.log.info("connected to the agent channel %s", self.config.upstream)
            self.metrics.connected()
            router.upstream_connected(trio.current_time())
            self._after()
            why = "failed while writing"  # unless the reader says otherwise
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._upstream_writer, stream, nursery.cancel_scope)
                    self._up_fd = _fileno(stream)
                    self._after()
                    why = await self._upstream_reader(stream)
                    nursery.cancel_scope.cancel()
                self.log.warning("the agent channel %s", why)
            finally:
                self._up_fd = -1
                self._up_rest = b""
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                router.upstream_lost(trio.current_time())
                self._after()

    async def _upstream_reader(self, stream) -> str:
        """Read until the channel ends; return how it ended."""
        router = self.router
        fd = _fileno(stream)
        while True:
            try:
                data = await _receive(stream, fd)
            except _CONNECTION_ERRORS as exc:
                return "failed: %s" % (exc.__cause__ or exc)
            if not data:
                return "closed"
            self.metrics.bytes_agent_in.inc(len(data))
            router.upstream_data(data, trio.current_time())
            self._after()

    async def _upstream_writer(self, stream, cancel_scope: trio.CancelScope) -> None:
        router = self.router
        while True:
            while not (self._up_rest or router.wants_write()):
                await self._upstream_wake.wait()
            if self._up_rest:
                # The rest of a write made on the spot (see _after).
                data, self._up_rest = self._up_rest, b""  # (a memoryview)
            else:
                data = self._take_upstream(trio.current_time())
            if data:
                # What the kernel takes at once, on the spot; the rest with
                # send_all (which waits until the agent reads).
                sent = _write_now(self._up_fd, data) if self._up_fd >= 0 else 0
                if sent:
                    data = memoryview(data)[sent:]
                self._up_sending = True
                try:
                    if data:
                        await stream.send_all(data)
                    else:
                        await trio.lowlevel.checkpoint()  # (send_all would have let others run)
                except _CONNECTION_ERRORS as exc:
                    self.log.warning("writing to the agent channel failed: %s", exc.__cause__ or exc)
                    cancel_scope.cancel()
                    return
                finally:
                    self._up_sending = False
                router.upstream_write_done(trio.current_time())
            self._after()

    # -- clients --------------------------------------------------------------------------
    async def _accept_loop(self, listener: trio.SocketListener, listener_config) -> None:
        name = listener_config.label
        policy = listener_config.policy()
        try:
            while True:
                try:
                    stream = await listener.accept()
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    return
                except OSError as exc:
                    # EMFILE and friends: back off instead of spinning.
                    self.log.warning("accept on %s failed: %s", name, exc)
                    await trio.sleep(0.1)
                    continue
                refusal = self._refusal(stream, policy)
                if refusal is not None:
                    self.log.warning("refused a client on %s: %s", name, refusal)
                    self.metrics.refused(name, refusal.split(" (")[0])
                    await trio.aclose_forcefully(stream)
                    continue
                self._open_clients[name] = self._open_clients.get(name, 0) + 1
                self._nursery.start_soon(self._serve_client, stream, name, policy, listener_config.protocol)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()

    def _refusal(self, stream, policy) -> str | None:
        """Why a new connection may not stay, or None."""
        if self._open_clients.get(policy.name, 0) >= policy.max_clients:
            return "too many clients (%d)" % policy.max_clients
        if policy.peer_uids or policy.peer_gids:
            peer = transport.peer_credentials(stream)
            uid = peer[1] if peer else None
            gids = transport.peer_groups(peer[0], peer[2], getattr(stream, "socket", None)) if peer else frozenset()
            if not policy.admits(uid, gids):
                return "peer not allowed (pid %s, uid %s, gids %s)" % (
                    peer[0] if peer else "?",
                    uid if uid is not None else "?",
                    ",".join(str(g) for g in sorted(gids)) or "?",
                )
        return None

    async def _serve_client(self, stream: trio.SocketStream, listener: str, policy=None, protocol: str = "qga") -> None:
        from .policy import OPEN

        peer = transport.peer(stream)
        client = self.router.add_client(listener, peer, policy or OPEN, protocol)
        session = Session(client, stream, listener, peer, fd=_fileno(stream))
        self._sessions[client] = session
        self.metrics.client_opened(listener)
        pid, uid = (peer[0], peer[1]) if peer else ("?", "?")
        self.log.info("client %d connected on %s (pid %s, uid %s)", client.number, listener, pid, uid)
        try:
            with session.cancel:
                if self._reactor.watch(session.fd, session):
                    await self._client_writer(session)
                else:
                    self.log.warning("closing client %d: its socket cannot be watched for reading", client.number)
        finally:
            self._stop_reading(session)
            self.router.remove_client(client)
            self._sessions.pop(client, None)
            self._open_clients[listener] = self._open_clients.get(listener, 1) - 1
            self.metrics.client_closed(listener)
            self.log.info(
                "client %d disconnected (pid %s, uid %s; %d requests)", client.number, pid, uid, client.requests
            )
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self._after()

    # -- reading clients (the reactor's handler: synchronous, never waits) ----------
    def _client_input(self, session: Session, now: float) -> None:
        """One turn of one client's input: a read (or what was held back
        from the last one) fed to the router a piece at a time. Pieces end
        on line breaks where there is one, so the next starts on a message
        boundary, where the decoder's fast path applies. A piece that made
        replies ends the client's turn (the rest is held for the next, so
        that input of one-byte errors cannot hold up everyone else), and a
        client owed too much is not read until it is owed less. What the
        input changed is carried out once per turn (the reactor calls
        _after)."""
        router = self.router
        client = session.client
        if not session.reading:
            return
        if not router.can_read(client):
            self._pause_reading(session)
            return
        data = session.held
        if data:
            start, piece = session.held_at, session.piece
            session.held = b""
        else:
            try:
                data = os.read(session.fd, READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # reset by the peer, or worse: the connection is over
                self._stop_reading(session)
                session.cancel.cancel()
                return
            if not data:
                # Half-close: the client is done sending but still owed
                # replies (socat, Proxmox): answer, then close.
                client.closing = True
                session.writable.set()
                self._stop_reading(session)
                return
            self.metrics.bytes_client_in.inc(len(data))
            start, piece = 0, FEED_SIZE
        n = len(data)
        while True:  # (it may read: checked above, and below before every further piece)
            end = start + piece
            if end < n:
                nl = data.rfind(b"\n", start, end)
                if nl > start:
                    end = nl + 1
            answers = client.answers
            try:
                router.client_data(client, data if start == 0 and end >= n else data[start:end], now)
            except Exception:
                # A bug must cost this client its connection, not every
                # client the proxy: log it loudly and hang up.
                self.log.exception("internal error on client %d's input; closing it", client.number)
                self._stop_reading(session)
                session.cancel.cancel()
                return
            start = end
            if start >= n:
                return
            if client.answers > answers:
                # Making replies: the rest waits for the next turn.
                session.held, session.held_at, session.piece = data, start, FEED_SIZE
                self._reactor.again(session)
                return
            piece = min(piece * 8, READ_SIZE)  # the middle of a big request
            if not router.can_read(client):
                session.held, session.held_at, session.piece = data, start, piece
                self._pause_reading(session)
                return

    def _pause_reading(self, session: Session) -> None:
        """The client is owed too much (or closes): stop watching its socket
        until it is owed less (see _resume)."""
        client = session.client
        self._reactor.unwatch(session.fd)
        if client.closing or client.gone:
            self._stop_reading(session)
        else:
            session.paused = True

    def _resume(self, session: Session) -> None:
        """Replies were taken or slots filled: read the client again if it
        is now owed little enough."""
        client = session.client
        if not session.reading:
            session.paused = False
        elif client.closing or client.gone:
            self._stop_reading(session)
        elif self.router.can_read(client):
            session.paused = False
            if not self._reactor.watch(session.fd, session):
                self.log.warning("closing client %d: its socket cannot be watched for reading", client.number)
                self._stop_reading(session)
                session.cancel.cancel()
            elif session.held:
                self._reactor.again(session)

    def _stop_reading(self, session: Session) -> None:
        """Read this client no more (its input ended, it closes, it is gone)."""
        session.reading = False
        session.paused = False
        session.held = b""
        self._reactor.unwatch(session.fd)
        self._reactor.forget(session)

    async def _client_writer(self, session: Session) -> None:
        client = session.client
        while True:
            while not (session.rest or client.output):
                if client.wants_close() or client.gone:
                    return
                await session.writable.wait()
            if session.rest:
                # The rest of a write made on the spot (see _after).
                data, session.rest = session.rest, b""
            else:
                data = self._take_output(session)
            session.sending = True
            try:
                with trio.move_on_after(self.config.client_write_timeout) as scope:
                    try:
                        await session.stream.send_all(data)
                    except _CONNECTION_ERRORS:
                        return  # it left; what it was owed goes nowhere
            finally:
                session.sending = False
            if scope.cancelled_caught:
                self.log.warning(
                    "closing client %d: it left replies unread for %gs",
                    client.number,
                    self.config.client_write_timeout,
                )
                return


def _socketpair_streams():
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), trio.SocketStream(trio.socket.from_stdlib_socket(b))


async def _serve_sim(agent, stream) -> None:
    try:
        await agent.serve(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _serve_metrics(metrics, host, port, *, task_status=trio.TASK_STATUS_IGNORED):
    from .metrics import serve_metrics

    await serve_metrics(metrics, host, port, task_status=task_status)
