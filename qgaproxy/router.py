"""The router: who asked what, and where each reply goes.

This is the whole proxy as a state machine with no I/O and no clock.
The trio shell (proxy.py) feeds it bytes and times and carries out what
it asks for; tests can drive it byte by byte.

It owns:
- the clients: each one's decoder, its queue of requests not yet sent,
  and its *slots*: the replies it is owed, in the order it asked.
  A reply is written only when every earlier slot is filled, so a
  locally answered guest-sync or a proxy error never overtakes an
  earlier request's reply (clients without ids match replies by order).
- the pending table: every request in flight upstream carries an id made
  here; the agent's reply is found by that id (or, for an agent that does
  not echo ids, by order, one request at a time) and rewritten to carry
  the client's own id, or none if it sent none.
- fairness: clients with queued requests are served round robin, up to
  ``window`` requests in flight upstream.
- deadlines: a request that outlives its deadline gets a GenericError
  naming the command and the time; if it was in flight, the upstream
  resyncs, and its late reply, matching nothing, is dropped and counted.

It must never let a client's bytes reach the agent: only requests that
passed messages.check_request, re-serialized by messages.encode_request.
"""

from __future__ import annotations

import heapq
import json
import random
import time
from collections import deque
from typing import Any, Callable, Mapping

import attrs

from . import codec, messages, negotiation
from .freezeguard import DEFAULT_MAX_FROZEN, FREEZE_COMMANDS, FreezeGuard
from .isolation import Ownership
from .messages import Request
from .policy import OPEN, Policy
# The proxy's own status command (status.py): agent commands are all
# guest-*, so it cannot collide with one. Subject to listener policy.
from .status import STATUS_COMMAND
from .upstream import State, Upstream

# How many replies a client may be owed (queued, in flight, or written
# but not yet taken by the client) before we stop reading its requests.
# It bounds what one client holds; the agent itself stops reading a
# client that does not read its replies, so no well-behaved client sees it.
DEFAULT_CLIENT_BACKLOG = 64

# Requests in flight upstream when the agent echoes ids. A pty loses
# replies beyond a few hundred outstanding requests and a real VM was seen
# losing some at ~128 (none at 64); 32 keeps the agent busy (it runs one
# command at a time anyway) with a wide margin.
DEFAULT_WINDOW = 32

DEFAULT_REQUEST_TIMEOUT = 5.0


class Observer:
    """Hooks for metrics and logs; every method is optional."""

    def request_done(self, command: str | None, outcome: str, duration: float, queued: float) -> None:
        pass

    def stale_reply(self, why: str) -> None:
        pass

    def garbage(self, nbytes: int) -> None:
        pass

    def resync(self, reason: str) -> None:
        pass

    def state_changed(self, old: State, new: State, reason: str | None) -> None:
        pass

    def timeout(self, command: str, after: float, client: "Client") -> None:
        pass

    def client_disconnect_requested(self, client: "Client", why: str) -> None:
        pass

    def denied(self, client: "Client", command: str) -> None:
        pass

    def freeze_guard(self, why: str) -> None:
        pass

    def internal_result(self, command: str, ok: bool, detail: str) -> None:
        pass

    def memory_limit(self, client: "Client", total: int) -> None:
        pass

    def frozen(self, frozen: bool, owner: "Client | None") -> None:
        pass

    # The audit trail (only called when Router.audit is on): a client's
    # request reached its outcome ("ok", the agent's error class,
    # "timeout", "unavailable", "denied"), duration seconds after it
    # arrived. client.internal: the proxy's own call (a thaw, closing a
    # handle a departed client left).
    def audit(self, client: "Client", request: Request, outcome: str, duration: float) -> None:
        pass

    # Debug traces (only called when tracing is on: see Router.trace).
    def trace_request(self, client: "Client", request: Request) -> None:
        pass

    def trace_reply(self, client: "Client", command: str, value: dict) -> None:
        pass

    def trace_local(self, client: "Client", command: str, data: bytes) -> None:
        pass


@attrs.define(eq=False)
class Slot:
    """One reply a client is owed. data None: not known yet; b"": nothing
    to write (a command that never answers)."""

    data: bytes | None = None
    close: bool = False  # close the connection once this slot is written


@attrs.define(eq=False)
class Call:
    client: "Client"
    slot: Slot
    request: Request
    received: float
    deadline: float
    timeout: float
    local_reply: bytes | None = None  # answered by the proxy when its turn comes
    up_id: int | None = None
    up_id_text: bytes | None = None
    sent: float | None = None
    no_reply: bool = False
    done: bool = False
    on_reply: Callable | None = None  # the proxy's own calls: who wants the answer


@attrs.define(eq=False)
class Client:
    number: int
    listener: str
    decoder: codec.RequestDecoder
    queue: deque = attrs.field(factory=deque)  # Calls not yet sent
    slots: deque = attrs.field(factory=deque)  # Slots owed, in order
    output: list = attrs.field(factory=list)  # bytes ready to write
    queued_for_turn: bool = False
    gone: bool = False  # the connection is closed; owe it nothing
    closing: bool = False  # read nothing more; close once output is written
    no_reply_generation: int = -1  # upstream generation of its last no-reply command
    peer: Any = None  # for logs: whatever the shell knows (pid, uid)
    requests: int = 0
    answers: int = 0  # replies and errors owed to it so far, all told
    policy: Policy = OPEN
    internal: bool = False  # the proxy itself (thaws, closing left handles)
    protocol: str = "qga"  # or "qmp": see negotiation.py
    offered: bool = False  # request-negotiation answered (qga listeners)
    negotiated: bool = False
    capabilities: frozenset = frozenset()
    queued_bytes: int = 0  # size of its requests not yet sent
    output_bytes: int = 0  # size of replies not yet written

    def backlog(self) -> int:
        return len(self.slots) + len(self.output)

    def buffered(self) -> int:
        """Bytes held for this client: partial input, queued requests,
        unwritten replies."""
        return self.decoder.buffered() + self.queued_bytes + self.output_bytes

    def wants_close(self) -> bool:
        return self.closing and not self.slots and not self.output


# Messages up to this size are admitted even when the total budget is
# spent: every ordinary request is far smaller, and a flood of large ones
# must not lock out a client that only wants a guest-ping.
SMALL_MESSAGE = 64 << 10


class Budget:
    """Bytes buffered for clients, all agents of the process together."""

    def __init__(self, limit: int = 1 << 62):
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n


_ENABLED = type("_Enabled", (), {"enabled": True})()


_decode_json = json.JSONDecoder().decode

_ID_KEY = b', "id": '
_EMPTY_RETURN = b'{"return": {}'
_EMPTY_RETURN_END = len(_EMPTY_RETURN)
# Lines longer than this are passed on without being parsed (see
# Router._forward_unparsed); shorter ones are checked to be one JSON object.
LARGE_REPLY = 1 << 20
# Below this, a reply is rewritten by plain slicing; above, through a
# memoryview (one copy of the agent's text instead of two).
_SMALL_REPLY = 1 << 12
# Commands whose results the router learns from (isolation, freeze guard).
_NEEDS_VALUE = frozenset(
    {"guest-file-open", "guest-file-close", "guest-exec", "guest-exec-status", "guest-fsfreeze-status",
     "guest-fsfreeze-thaw"}
) | FREEZE_COMMANDS


_SYNC_COMMANDS = messages.SYNC_COMMANDS
# What a "qga" client may send that the proxy answers itself (negotiation.py).
_NEGOTIATION_COMMANDS = frozenset({"request-negotiation", "query-agent", "qmp_capabilities"})


def _not_available(why: str) -> str:
    return "Guest agent is not available: " + why


class Router:
    def __init__(
        self,
        upstream: Upstream,
        *,
        window: int = DEFAULT_WINDOW,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        command_timeouts: Mapping[str, float] | None = None,
        client_backlog: int = DEFAULT_CLIENT_BACKLOG,
        max_message_size: int = codec.MAX_TOKEN_SIZE,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
        freeze_max: float = DEFAULT_MAX_FROZEN,
        budget: "Budget | None" = None,
    ):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.upstream = upstream
        self.window = window
        self.request_timeout = request_timeout
        self.command_timeouts = dict(command_timeouts or {})
        self.client_backlog = client_backlog
        self.max_message_size = max_message_size
        self.observer = observer or Observer()
        rng = rng or random.SystemRandom()
        # Ids for the agent: a random start, so that replies meant for a
        # previous proxy process can never match ours.
        self._next_up_id = rng.randrange(1 << 40, 1 << 52)
        self._replies = codec.ReplyDecoder()
        self.clients: list[Client] = []
        self._client_numbers = 0
        self._turns: deque[Client] = deque()  # clients with queued calls
        self._pending: dict[int, Call] = {}  # in flight, by upstream id (echo)
        self._in_order: deque[Call] = deque()  # in flight, by order (no echo)
        self._deadlines: list = []  # heap of (deadline, seq, call)
        self._seq = 0
        # Clients with new output for the shell to write (see pop_dirty).
        self.dirty: set[Client] = set()
        self.stale_replies = 0
        self.resyncs = 0  # resyncs the router asked for (timeouts, no-reply commands)
        self.timeouts = 0  # client requests that timed out
        self.state_since_wall = wall_clock()  # when the upstream state last changed
        # Answers STATUS_COMMAND (see status.py); None: the command is unknown.
        self.status: Callable[[float], dict] | None = None
        self.audit = False  # call observer.audit (nothing is done for it when off)
        self.ownership = Ownership()
        self.freeze = FreezeGuard(freeze_max)
        self.budget = budget or Budget()
        self._disabled_text: dict[str, bytes] = {}  # command -> the agent's "disabled" desc, learned
        self._internal = Client(0, "qgaproxy", codec.RequestDecoder(), internal=True)
        # Polls of the guest exporter: sent only when nothing else is queued
        # or in flight, so they never delay a client's request.
        self._background = Client(-1, "qgaproxy-background", codec.RequestDecoder(), internal=True)
        self._last_now = 0.0
        self.wall_clock = wall_clock
        self._announced: str | None = None  # the last availability event sent
        self.trace = False  # call the observer's trace_* hooks (debug logging)

    # -- queries -------------------------------------------------------------
    def in_flight(self) -> int:
        return len(self._pending) + len(self._in_order)

    def queued(self) -> int:
        return sum(len(c.queue) for c in self.clients)

    def outstanding(self) -> list[Call]:
        """Every request not answered yet, queued or in flight (for status)."""
        calls = [call for client in self.clients for call in client.queue]
        calls += self._pending.values()
        calls += self._in_order
        return [call for call in calls if not call.done]

    def next_deadline(self) -> float | None:
        heap = self._deadlines
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        other = self.upstream.next_deadline()
        if other is not None and (best is None or other < best):
            best = other
        other = self.freeze.deadline()
        if other is not None and (best is None or other < best):
            best = other
        return best

    def pop_dirty(self) -> set[Client]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def wants_write(self) -> bool:
        upstream = self.upstream
        if upstream.writing:
            return False
        if upstream.has_outbox():
            return True
        if not upstream.can_send_requests():
            return False
        if self._turns:
            return self._window_open()
        return bool(self._background.queue) and not self._pending and not self._in_order

    def _echoes(self) -> bool:
        info = self.upstream.info
        return info.echoes_id if info is not None else True

    def _window_open(self) -> bool:
        limit = self.window if self._echoes() else 1
        return self.in_flight() < limit

    # -- clients ---------------------------------------------------------------
    def add_client(self, listener: str = "", peer: Any = None, policy: Policy = OPEN, protocol: str = "qga") -> Client:
        self._client_numbers += 1
        client = Client(
            self._client_numbers,
            listener,
            codec.RequestDecoder(self.max_message_size),
            peer=peer,
            policy=policy,
            protocol=protocol,
        )
        self.clients.append(client)
        if protocol == "qmp":
            self._push(client, messages.qjson.dumpb(self._greeting()) + b"\n")
        return client

    def _greeting(self) -> dict:
        info = self.upstream.info
        return negotiation.greeting(info.version if info is not None else None)

    def _push(self, client: Client, data: bytes) -> None:
        """Out-of-band output (greeting, events): not a reply to a request."""
        client.output.append(data)
        client.output_bytes += len(data)
        self.budget.take(len(data))
        self.dirty.add(client)

    def _negotiate(self, client: Client, request: Request) -> bytes | None:
        """The proxy's own commands for negotiation; None if not one."""
        command = request.execute
        if client.protocol == "qmp" and not client.negotiated:
            if command != "qmp_capabilities":
                return messages.error_reply(
                    messages.COMMAND_NOT_FOUND, negotiation.EXPECTING, request.has_id, request.id
                )
        elif command == "request-negotiation" and client.protocol == "qga":
            if client.negotiated:
                return messages.error_reply(messages.COMMAND_NOT_FOUND, negotiation.ALREADY, request.has_id, request.id)
            client.offered = True
            return messages.return_reply(self._greeting(), request.has_id, request.id)
        elif command == "query-agent" and client.negotiated:
            return messages.return_reply(self._agent_status(), request.has_id, request.id)
        if command != "qmp_capabilities" or not (client.protocol == "qmp" or client.offered):
            return None
        if client.negotiated:
            return messages.error_reply(messages.COMMAND_NOT_FOUND, negotiation.ALREADY, request.has_id, request.id)
        chosen, error = negotiation.select(request)
        if error is not None:
            return error
        client.negotiated = True
        client.capabilities = frozenset(chosen)
        return messages.return_reply({}, request.has_id, request.id)

    def _agent_status(self) -> dict:
        info = self.upstream.info
        status: dict = {
            "state": self.upstream.state.value,
            "since": round(self.wall_clock() - (self._last_now - self.upstream.since), 3),
            "frozen": self.freeze.frozen,
        }
        if info is not None:
            status["version"] = info.version or ""
            status["echoes-id"] = info.echoes_id
            status["commands"] = [
                {"name": name, "enabled": c.enabled, "success-response": c.success_response}
                for name, c in sorted(info.commands.items())
            ]
        return status

    def _announce(self, name: str, data: dict) -> None:
        event = negotiation.event(name, data, self.wall_clock())
        for client in self.clients:
            if "agent-events" in client.capabilities and not client.gone and not client.closing:
                self._push(client, event)

    def remove_client(self, client: Client) -> None:
        """The connection is gone: forget its queue; in-flight requests
        finish upstream and their replies are dropped."""
        if client.gone:
            return
        client.gone = True
        for call in client.queue:
            call.done = True
        client.queue.clear()
        client.slots.clear()
        client.output.clear()
        self.budget.release(client.buffered())
        client.queued_bytes = client.output_bytes = 0
        client.decoder = codec.RequestDecoder(1024)  # let its partial input go now
        if client in self.clients:
            self.clients.remove(client)
        if client.queued_for_turn:
            try:
                self._turns.remove(client)
            except ValueError:
                pass
            client.queued_for_turn = False
        self.dirty.discard(client)
        # What it left behind in the guest: close its files, and thaw a
        # freeze it owned.
        for handle in self.ownership.release(client):
            self._internal_call("guest-file-close", {"handle": handle})
        self._maybe_thaw(now=None, gone=client)

    def can_read(self, client: Client) -> bool:
        return not client.gone and not client.closing and client.backlog() < self.client_backlog

    def take_output(self, client: Client) -> bytes:
        data = b"".join(client.output)
        client.output.clear()
        self.budget.release(client.output_bytes)
        client.output_bytes = 0
        return data

    def client_data(self, client: Client, data: bytes, now: float) -> None:
        self._last_now = now
        if client.gone or client.closing:
            return
        decoder = client.decoder
        before = decoder.buffered()
        n = len(data)
        budget = self.budget
        # Past the total budget, a read that would cross it is refused
        # (unless it is a small message: see SMALL_MESSAGE).
        if budget.used + n > budget.limit and before + n > SMALL_MESSAGE:
            # Every byte buffered for every client counts against one
            # total: past it, the client that would cross it is refused
            # and hung up on; everyone else keeps being served.
            self.observer.memory_limit(client, self.budget.limit)
            slot = self._new_slot(client)
            slot.close = True
            client.closing = True
            self._fill(
                client,
                slot,
                messages.error_reply(
                    messages.GENERIC_ERROR,
                    "qgaproxy: too much data buffered for all clients (limit %d bytes); closing" % self.budget.limit,
                ),
            )
            return
        events = decoder.feed(data)
        # Held now: what the decoder still buffers, instead of what it held
        # before; what it produced is accounted below, per request.
        budget.used += decoder.buffered() - before
        for event in events:
            if type(event) is codec.Value:
                self._on_message(client, event.value, event.size, now)
            elif isinstance(event, codec.ParseError):
                self.observer.request_done(None, "invalid", 0.0, 0.0)
                slot = self._new_slot(client)
                self._fill(client, slot, messages.error_reply(messages.GENERIC_ERROR, event.desc), "(invalid)")
                if event.oversize:
                    # Beyond repair: what follows in the stream is the rest
                    # of the oversize message. Answer, then hang up.
                    slot.close = True
                    client.closing = True
                    self.observer.client_disconnect_requested(client, "message over the size limit")
                    break
            # codec.Flush: the client reset its stream; nothing to answer.

    def _new_slot(self, client: Client) -> Slot:
        slot = Slot()
        client.slots.append(slot)
        client.answers += 1
        return slot

    def _fill(self, client: Client, slot: Slot, data: bytes, command: str | None = None) -> None:
        """Give a slot its reply. command: set for replies the proxy makes
        itself, so that debug traces show them too."""
        slot.data = data
        if client.gone or client.internal:
            return
        if command is not None and self.trace and data:
            self.observer.trace_local(client, command, data)
        slots = client.slots
        moved = False
        while slots and slots[0].data is not None:
            head = slots.popleft()
            if head.data:
                client.output.append(head.data)
                client.output_bytes += len(head.data)
                self.budget.take(len(head.data))
            if head.close:
                client.closing = True
                for rest in slots:
                    rest.data = rest.data if rest.data is not None else b""
                slots.clear()
            moved = True
        if moved:
            self.dirty.add(client)

    def _on_message(self, client: Client, value: Any, size: int, now: float) -> None:
        checked = messages.check_request(value, size)
        if isinstance(checked, messages.Rejected):
            self.observer.request_done(None, "invalid", 0.0, 0.0)
            self._fill(client, self._new_slot(client), checked.reply(), "(invalid)")
            return
        client.requests += 1
        if self.trace:
            self.observer.trace_request(client, checked)
        if client.protocol == "qga" and checked.execute not in _NEGOTIATION_COMMANDS:
            local = None  # (the usual case: nothing to negotiate)
        else:
            local = self._negotiate(client, checked)
        if local is not None:
            self.observer.request_done(checked.execute, "error" if b'"error"' in local[:12] else "ok", 0.0, 0.0)
            self._fill(client, self._new_slot(client), local, checked.execute)
            return
        self._dispatch(client, checked, now)

    def _dispatch(self, client: Client, request: Request, now: float) -> None:
        slot = Slot()  # (_new_slot, inline: this is every request's path)
        client.slots.append(slot)
        client.answers += 1
        command = request.execute
        if not client.policy.allows(command):
            self.observer.denied(client, command)
            self.observer.request_done(command, "denied", 0.0, 0.0)
            if self.audit:
                self.observer.audit(client, request, "denied", 0.0)
            self._fill(
                client,
                slot,
                messages.disabled_reply(command, request.has_id, request.id, client.policy.denial_reason()),
                command,
            )
            return
        if command == STATUS_COMMAND and self.status is not None:
            # The proxy's own, answered without the agent (also while it is away).
            self.observer.request_done(command, "ok", 0.0, 0.0)
            self._fill(client, slot, messages.return_reply(self.status(now), request.has_id, request.id), command)
            return
        if not self.upstream.accepts_requests():
            self._fail_fast(client, slot, request)
            return
        local = self._answer_locally(client, request)
        if local is not None:
            self.observer.request_done(command, "error", 0.0, 0.0)
            if self.audit:
                self.observer.audit(client, request, _error_class(local), 0.0)
            self._fill(client, slot, local, command)
            return
        self._enqueue(client, slot, request, now)

    def _answer_locally(self, client: Client, request: Request) -> bytes | None:
        """The agent's own error, when we know it without asking."""
        command = request.execute
        info = self.upstream.info
        if info is not None and info.commands and command not in messages.SYNC_COMMANDS:
            known = info.commands.get(command)
            if known is None:
                return messages.not_found_reply(command, request.has_id, request.id)
            if not known.enabled and not self.freeze.frozen:
                text = self._disabled_text.get(command)
                if text is not None:
                    return messages.error_reply(messages.COMMAND_NOT_FOUND, text, request.has_id, request.id)
        if self.freeze.frozen:
            refused = self.freeze.refuses(request)
            if refused is not None:
                return refused
        return self.ownership.check(client, request)

    def _internal_call(self, command: str, arguments: dict | None, now: float | None = None) -> None:
        """A request of the proxy's own (its reply goes to no client)."""
        if self.upstream.state is State.CONNECTING:
            return
        request = Request(command, arguments, False)
        self._enqueue(self._internal, Slot(), request, self._last_now if now is None else now)

    def background_call(self, command: str, arguments: dict | None, on_reply: Callable, now: float) -> bool:
        """Queue a lowest-priority request of the proxy's own; on_reply(value)
        gets the agent's reply (or an error object). False if the channel
        is not ready or one is already waiting."""
        if self.upstream.state is not State.READY or self._background.queue:
            return False
        self._last_now = now
        self._enqueue(self._background, Slot(), Request(command, arguments, False), now, on_reply)
        return True

    def _enqueue(
        self, client: Client, slot: Slot, request: Request, now: float, on_reply: Callable | None = None
    ) -> None:
        timeout = self.command_timeouts.get(request.execute, self.request_timeout)
        call = Call(client, slot, request, now, now + timeout, timeout, on_reply=on_reply)
        if request.execute in _SYNC_COMMANDS:
            reply = _local_sync_reply(request)
            if reply is not None:
                if self.upstream.state is State.READY:
                    # The slot keeps it behind this client's earlier replies.
                    self.observer.request_done(request.execute, "ok", 0.0, 0.0)
                    self._fill(client, slot, reply, request.execute)
                    return
                call.local_reply = reply  # answered in its turn, once ready
        client.queue.append(call)
        client.queued_bytes += request.size
        self.budget.used += request.size  # (budget.take, inline: every request)
        self._seq += 1
        heapq.heappush(self._deadlines, (call.deadline, self._seq, call))
        if not client.queued_for_turn and client is not self._background:
            client.queued_for_turn = True
            self._turns.append(client)

    def _fail_fast(self, client: Client, slot: Slot, request: Request) -> None:
        state = self.upstream.state
        why = "no connection to its channel" if state is State.CONNECTING else "it does not answer"
        self.observer.request_done(request.execute, "unavailable", 0.0, 0.0)
        if self.audit and request.execute not in messages.SYNC_COMMANDS:
            self.observer.audit(client, request, "unavailable", 0.0)
        self._fill(
            client,
            slot,
            messages.error_reply(messages.GENERIC_ERROR, _not_available(why), request.has_id, request.id),
            request.execute,
        )

    # -- upstream I/O ------------------------------------------------------------
    def upstream_connected(self, now: float) -> None:
        self._last_now = now
        self._replies.reset()
        old = self.upstream.state
        self.upstream.connected(now)
        if self.upstream.state is not old:
            self._on_state_change(old, now)

    def upstream_lost(self, now: float) -> None:
        """The channel closed (QEMU exited or restarted) or failed."""
        generation = self.upstream.generation
        old = self.upstream.state
        self.upstream.lost(now)
        self._replies.reset()
        in_flight = list(self._pending.values()) + list(self._in_order)
        self._pending.clear()
        self._in_order.clear()
        for call in in_flight:
            if call.done:
                continue
            call.done = True
            if call.no_reply:
                # What QEMU's own socket does when the guest powers off: the
                # connection ends. Proxmox takes that end-of-file as success.
                self._close_after(call.client, call.slot)
                self.observer.request_done(call.request.execute, "ok", now - call.received, 0.0)
                if self.audit:
                    self.observer.audit(call.client, call.request, "ok", now - call.received)
                continue
            self._complete_error(call, _not_available("connection to its channel lost"), "unavailable", now)
        for client in list(self.clients):
            if client.no_reply_generation == generation:
                client.no_reply_generation = -1
                self._close_after(client, self._new_slot(client))
        self._fail_queued(now)
        # A new connection may be a new agent (QEMU restarted): its handles
        # and pids are not the old ones.
        self.ownership.reset()
        if old is not State.CONNECTING:
            self.state_since_wall = self.wall_clock()
            self.observer.state_changed(old, State.CONNECTING, "connection lost")

    def _close_after(self, client: Client, slot: Slot) -> None:
        slot.close = True
        self._fill(client, slot, b"")

    def _fail_queued(self, now: float) -> None:
        for call in self._background.queue:
            self._unqueued(call)
            if not call.done:
                call.done = True
                if call.on_reply is not None:
                    call.on_reply({"error": {"class": messages.GENERIC_ERROR, "desc": _not_available("gone")}})
        self._background.queue.clear()
        for client in list(self._turns):
            for call in client.queue:
                self._unqueued(call)
                if not call.done:
                    call.done = True
                    self._fail_fast(client, call.slot, call.request)
            client.queue.clear()
            client.queued_for_turn = False
        self._turns.clear()

    def _unqueued(self, call: Call) -> None:
        """A call left its client's queue: its bytes are no longer held."""
        call.client.queued_bytes -= call.request.size
        self.budget.release(call.request.size)

    def take_upstream_write(self, now: float) -> bytes:
        """Bytes to write to the agent now (the caller writes them all,
        then calls upstream_write_done)."""
        upstream = self.upstream
        if upstream.writing:
            return b""
        parts = [upstream.take_outbox()] if upstream.has_outbox() else [b""]
        if upstream.can_send_requests():
            info = upstream.info
            echo = info.echoes_id if info is not None else True  # (_echoes)
            limit = self.window if echo else 1
            pending = self._pending
            turns = self._turns
            while len(pending) + len(self._in_order) < limit:
                if turns:
                    client = turns.popleft()
                    call = client.queue.popleft()
                    if client.queue:
                        turns.append(client)
                    else:
                        client.queued_for_turn = False
                elif self._background.queue and self.in_flight() == 0 and not parts[1:]:
                    client = self._background
                    call = client.queue.popleft()
                else:
                    break
                self._unqueued(call)
                if call.done:
                    continue
                if call.local_reply is not None:
                    call.done = True
                    self.observer.request_done(call.request.execute, "ok", 0.0, now - call.received)
                    self._fill(client, call.slot, call.local_reply, call.request.execute)
                    continue
                request = call.request
                if echo:
                    call.up_id = up_id = self._next_up_id
                    self._next_up_id = up_id + 1
                    call.up_id_text = b"%d" % up_id
                    pending[up_id] = call
                else:
                    self._in_order.append(call)
                call.sent = now
                parts.append(messages.encode_request(request.execute, request.arguments, call.up_id, has_id=echo))
                if info is not None and not info.success_response(request.execute):
                    # It never answers on success, and the agent may vanish
                    # with it (shutdown, suspend): sync right behind it.
                    # Whatever arrives before that sync's reply is its error.
                    call.no_reply = True
                    client.no_reply_generation = self.upstream.generation
                    self._resync(now, "no-reply command", sentinel=False)
                    self.resyncs += 1
                    self.observer.resync("no-reply command")
                    parts.append(self.upstream.take_outbox())
                    break
        data = b"".join(parts)
        if data:
            upstream.write_started()
        return data

    def upstream_write_done(self, now: float) -> None:
        self.upstream.write_done(now)

    def upstream_data(self, data: bytes, now: float) -> None:
        self._last_now = now
        line = self._replies.one_line(data)
        if line is not None:  # (one reply, the usual read)
            self._on_line(line, now)
            return
        for event in self._replies.feed(data):
            if isinstance(event, codec.Line):
                self._on_line(event.raw, now)
            elif isinstance(event, codec.Overflow):
                self.observer.garbage(event.dropped)

    def _on_line(self, raw: bytes, now: float) -> None:
        if self._forward_unparsed(raw, now):
            return
        try:
            try:
                # The agent writes ASCII (it escapes the rest); str input
                # spares json.loads its encoding detection.
                value = _decode_json(raw.decode("ascii"))
            except UnicodeDecodeError:
                value = json.loads(raw)
        except ValueError:
            self.observer.garbage(len(raw))
            return
        if not isinstance(value, dict) or not ("return" in value or "error" in value):
            self.observer.garbage(len(raw))
            return
        if self.upstream.syncing:
            consumed, old = self.upstream.on_reply(value, now)
            if consumed:
                if old is not None:
                    self._on_state_change(old, now)
                return
        call = None
        if self._echoes():
            ident = value.get("id")
            if type(ident) is int:
                call = self._pending.pop(ident, None)
        elif self._in_order:
            call = self._in_order.popleft()
        if call is None or call.done:
            # The agent's id-less error for our own 0xFF is expected while
            # syncing; anything else matching nothing is stale.
            if not self.upstream.syncing or "id" in value:
                self.stale_replies += 1
                self.observer.stale_reply("no request waits for it")
            return
        self._complete(call, raw, value, now)

    def _forward_unparsed(self, raw: bytes, now: float) -> bool:
        """An ordinary reply (a "return" to a client's request that nothing
        here learns from) goes to its client the short way: its id is read
        from its end, where the agent writes it, and the rest is passed on
        as the agent wrote it. A line up to LARGE_REPLY is checked to be one
        JSON object holding just "return" and that id (the guest is not
        trusted: two objects on a line would answer a client's next request
        for it); a longer one (guest-file-read's, up to 64 MiB) is not
        parsed at all. raw: one line, without its newline. False when the
        reply needs the general path."""
        if not raw.startswith(b'{"return": ') or self.upstream.syncing or self.trace:
            return False
        info = self.upstream.info
        if info is not None and not info.echoes_id:  # (not self._echoes())
            return False
        end = len(raw)
        if raw[end - 1] != 0x7D:  # "}"
            return False
        pos = raw.rfind(_ID_KEY, max(0, end - 48), end)
        if pos < 0:
            return False
        digits = raw[pos + len(_ID_KEY) : end - 1]
        call = self._pending.get(int(digits)) if digits.isdigit() else None
        if call is None or call.done or call.on_reply is not None or call.up_id_text != digits:
            return False
        client = call.client
        request = call.request
        # What _learn looks at: a command it learns from, a freeze, a
        # client gone (its handles and pids are released).
        if client.internal or client.gone or request.execute in _NEEDS_VALUE or self.freeze.frozen:
            return False
        if pos == _EMPTY_RETURN_END and raw.startswith(_EMPTY_RETURN):
            pass  # {"return": {}, "id": N}: valid as it stands (guest-ping's, and every setter's)
        elif len(raw) <= LARGE_REPLY:
            try:
                value = _decode_json(raw.decode("ascii"))
            except ValueError:  # (UnicodeDecodeError is one)
                return False
            if type(value) is not dict or len(value) != 2 or "return" not in value or value.get("id") != call.up_id:
                return False
        del self._pending[call.up_id]
        call.done = True
        tail = b"".join((_ID_KEY, request.id_json(), b"}\n")) if request.has_id else b"}\n"
        if pos < _SMALL_REPLY:
            data = raw[:pos] + tail
        else:
            with memoryview(raw) as view:  # one copy of the agent's text
                data = b"".join((view[:pos], tail))
        if self.audit:
            self.observer.audit(client, request, "ok", now - call.received)
        sent = call.sent if call.sent is not None else now
        self.observer.request_done(request.execute, "ok", now - sent, sent - call.received)
        self._fill(client, call.slot, data)
        return True

    def _complete(self, call: Call, raw: bytes, value: dict, now: float) -> None:
        call.done = True
        kind = "error" if "error" in value else "return"
        request = call.request
        self._learn(call, value, now)
        if call.on_reply is not None:
            call.on_reply(value)
            return
        if self.audit:
            error = value.get("error")
            self.observer.audit(
                call.client, request, "ok" if error is None else _class_of(error), now - call.received
            )
        if call.client.internal:
            error = value.get("error")
            self.observer.internal_result(
                request.execute, error is None, str(error.get("desc")) if isinstance(error, dict) else "ok"
            )
            return
        data = messages.rewrite_id(raw, call.up_id_text, request.id_json(), kind)
        if self.trace:
            self.observer.trace_reply(call.client, request.execute, value)
        sent = call.sent if call.sent is not None else now
        self.observer.request_done(request.execute, "error" if kind == "error" else "ok", now - sent, sent - call.received)
        self._fill(call.client, call.slot, data)

    def _complete_error(self, call: Call, desc: str, outcome: str, now: float) -> None:
        call.done = True
        request = call.request
        if call.on_reply is not None:
            call.on_reply({"error": {"class": messages.GENERIC_ERROR, "desc": desc}})
            return  # an exporter poll: not audited, not a client's
        if self.audit:
            self.observer.audit(call.client, request, outcome, now - call.received)
        if call.client.internal:
            return  # the proxy's own request: not a client's, not counted as one
        self.observer.request_done(request.execute, outcome, now - call.received, 0.0)
        self._fill(
            call.client,
            call.slot,
            messages.error_reply(messages.GENERIC_ERROR, desc, request.has_id, request.id),
            request.execute,
        )

    def _resync(self, now: float, reason: str, sentinel: bool = True) -> None:
        old = self.upstream.state
        self.upstream.resync(now, reason, sentinel=sentinel)
        if self.upstream.state is not old:
            self._on_state_change(old, now)

    def _learn(self, call: Call, value: dict, now: float) -> None:
        """What a reply tells about the guest: who owns what, frozen or not,
        the agent's text for a disabled command."""
        request = call.request
        if (
            request.execute not in _NEEDS_VALUE
            and not self.freeze.frozen
            and not call.client.gone
            and "error" not in value
        ):
            return  # an ordinary reply: nothing to learn, nothing to thaw
        self.ownership.on_reply(call.client, request, value)
        was_frozen = self.freeze.frozen
        self.freeze.on_reply(None if call.client.internal else call.client, request, value, now)
        if call.client.gone:
            # It left before this reply: what it just created is nobody's.
            for handle in self.ownership.release(call.client):
                self._internal_call("guest-file-close", {"handle": handle}, now)
            self._maybe_thaw(now, gone=call.client)
        if self.freeze.frozen != was_frozen:
            # The agent's texts for disabled commands change with the freeze.
            self._disabled_text.clear()
            self.observer.frozen(self.freeze.frozen, self.freeze.owner)
        error = value.get("error")
        if isinstance(error, dict) and error.get("class") == messages.COMMAND_NOT_FOUND:
            desc = error.get("desc")
            if isinstance(desc, str) and desc.startswith("Command %s has been disabled" % request.execute):
                if not self.freeze.frozen:
                    self._disabled_text[request.execute] = desc
        self._maybe_thaw(now)

    def _maybe_thaw(self, now: float | None, gone: Client | None = None) -> None:
        why = self.freeze.should_thaw(self._last_now if now is None else now, gone)
        if why is None:
            return
        info = self.upstream.info
        if info is not None and info.commands and not info.commands.get("guest-fsfreeze-thaw", _ENABLED).enabled:
            return
        self.freeze.thaw_requested = True
        self.observer.freeze_guard(why)
        self._internal_call("guest-fsfreeze-thaw", None, now)

    def _on_state_change(self, old: State, now: float) -> None:
        new = self.upstream.state
        self.state_since_wall = self.wall_clock()
        reason = self.upstream.resync_reason or self.upstream.last_resync_reason
        self.observer.state_changed(old, new, self.upstream.resync_reason)
        if new is State.READY:
            info = self.upstream.info
            data = {"version": info.version or ""} if info is not None else {}
            if self._announced == "available" and old is State.RESYNCING:
                self._announce("AGENT_RESYNCED", dict(data, reason=reason or "resync"))
            elif self._announced != "available":
                self._announce("AGENT_AVAILABLE", data)
            self._announced = "available"
        elif new in (State.UNAVAILABLE, State.CONNECTING) and self._announced != "unavailable":
            self._announce("AGENT_UNAVAILABLE", {"state": new.value})
            self._announced = "unavailable"
        if new is State.READY:
            self._disabled_text.clear()
            self.freeze.reset()
            info = self.upstream.info
            status = info.commands.get("guest-fsfreeze-status") if info is not None else None
            if status is not None and status.enabled:
                # Frozen by someone we do not know (a proxy restart)? The
                # guard thaws it once the answer comes.
                self._internal_call("guest-fsfreeze-status", None, now)
            # Commands that never answer were followed by a sync; its reply
            # came, so they succeeded.
            for table in (list(self._pending.values()), list(self._in_order)):
                for call in table:
                    if call.no_reply and not call.done:
                        self._finish_no_reply(call, now)
        elif new is State.UNAVAILABLE:
            self._fail_queued(now)
            for call in list(self._pending.values()) + list(self._in_order):
                if call.no_reply and not call.done:
                    self._finish_no_reply(call, now)

    def _finish_no_reply(self, call: Call, now: float) -> None:
        call.done = True
        if call.up_id is not None:
            self._pending.pop(call.up_id, None)
        else:
            try:
                self._in_order.remove(call)
            except ValueError:
                pass
        self.observer.request_done(call.request.execute, "ok", now - (call.sent or now), 0.0)
        if self.audit:
            self.observer.audit(call.client, call.request, "ok", now - call.received)
        self._fill(call.client, call.slot, b"")

    # -- time ----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._last_now = now
        self._maybe_thaw(now)
        old = self.upstream.tick(now)
        if old is not None:
            self._on_state_change(old, now)
        resync = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, call = heapq.heappop(self._deadlines)
            if call.done:
                continue
            if call.sent is None:
                # Still queued: it never reached the agent.
                try:
                    call.client.queue.remove(call)
                except ValueError:
                    pass
                else:
                    self._unqueued(call)
                if not call.client.queue and call.client.queued_for_turn:
                    call.client.queued_for_turn = False
                    try:
                        self._turns.remove(call.client)
                    except ValueError:
                        pass
            elif call.no_reply:
                self._finish_no_reply(call, now)
                continue
            else:
                if call.up_id is not None:
                    self._pending.pop(call.up_id, None)
                else:
                    # Order is lost once a reply is late: the sync restores it.
                    self._in_order.clear()
                resync = True
            if not call.client.internal:
                self.timeouts += 1
                self.observer.timeout(call.request.execute, call.timeout, call.client)
            self._complete_error(
                call,
                "Guest agent command '%s' timed out after %g seconds" % (call.request.execute, call.timeout),
                "timeout",
                now,
            )
        if resync and self.upstream.state is not State.CONNECTING:
            self.resyncs += 1
            self.observer.resync("timeout")
            self._resync(now, "timeout")


def _class_of(error: Any) -> str:
    cls = error.get("class") if isinstance(error, dict) else None
    return cls if isinstance(cls, str) and cls else "error"


def _error_class(reply: bytes) -> str:
    """The error class of a reply the proxy made (for the audit trail)."""
    try:
        return _class_of(json.loads(reply).get("error"))
    except (ValueError, AttributeError):
        return "error"


def _local_sync_reply(request: Request) -> bytes | None:
    """The agent's reply to a well-formed guest-sync(-delimited), or None
    when the arguments are anything else (the agent then answers, with
    its own error text)."""
    args = request.arguments
    if not isinstance(args, dict) or len(args) != 1:
        return None
    ident = args.get("id")
    if type(ident) is not int or not (-(1 << 63) <= ident < (1 << 63)):
        return None
    reply = messages.return_reply(ident, request.has_id, request.id)
    if request.execute == "guest-sync-delimited":
        return b"\xff" + reply
    return reply
