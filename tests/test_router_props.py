"""The router's promise under any interleaving (hypothesis, stateful).

The promise: every request a client sends gets exactly one reply or one
clear error, to that client, with its own id, in the order it sent them;
no reply ever reaches another client; the core never raises; and once
everything is done or every client gone, its tables, slots and budget
are empty again.

The machine below drives a real Router + Upstream with no I/O, as the
trio shell (proxy.py) does, against a model agent that answers like
qemu-ga and misbehaves only in ways the agent protocol allows:

- an agent that echoes ids may answer requests carrying ids in any
  order; replies without an id (sync replies, parse errors) keep their
  order among themselves, since only order can place them;
- an agent that does not echo ids answers strictly in order;
- with ids, replies may also be duplicated or carry unknown ids;
- garbage lines, 0xFF, replies cut by a lost connection, replies left
  over from a previous connection, an agent restart, a stuck write, and
  time running past request and sync timeouts.

Every request that reaches the agent carries a marker ("n") that the
agent sends back, so a reply that went to the wrong client or out of
order is seen at once. The profile (tests/conftest.py) sets the number
of examples: "ci" by default, HYPOTHESIS_PROFILE=long for a long run.
"""

from __future__ import annotations

import json
import random
from typing import Any

import attrs
from hypothesis import event, note, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qgaproxy import codec, messages, qjson
from qgaproxy.router import Router
from qgaproxy.upstream import State, Timings, Upstream

REQUEST_TIMEOUT = 5.0
SYNC_TIMEOUT = 1.0
MAX_MESSAGE = 2048
WINDOW = 4
BACKLOG = 6

ABSENT = object()  # no "id" member

# -- what clients send ---------------------------------------------------------

_id_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_id_values = st.recursive(
    _id_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _decode_one(data: bytes) -> list:
    return codec.RequestDecoder().feed(data)


def _agent_accepts(value: Any) -> bool:
    """Whether the agent's parser takes this id back as one value (it
    rejects noncharacters, lone surrogates and a few code points)."""
    try:
        text = qjson.dumpb(value, qdict_order=False)
    except (TypeError, UnicodeEncodeError):
        return False
    events = _decode_one(b"[" + text + b"]")
    return len(events) == 1 and isinstance(events[0], codec.Value)


ids = st.one_of(st.just(ABSENT), _id_values.filter(_agent_accepts))

# Malformed input and non-objects; each leaves the parser at rest, so the
# number of errors it makes does not depend on what surrounds it.
MALFORMED = [
    b'{"execute": }',
    b"abc ",
    b"}",
    b']',
    b'{"a" "b"}',
    b'{"a": 1 "b": 2}',
    b"[1 2]",
    b"{1: 2}",
    b'{"a": "\\x"}',
    b'{"execute": @}',
    b"\x00",
    b"\xfe",
    b'{"execute": "guest-ping",}',
    b"'unterminated\n'",
    b'"bad\x01string"\n',
    b"01 ",
]
NON_OBJECTS = [b"[1]", b'"x"', b"5 ", b"null ", b"[]", b"true ", b"-1.5e3 "]

KINDS = [
    "echo", "echo", "echo", "echo", "ping", "sync", "sync-delimited", "badsync", "unknown",
    "shutdown", "rejected", "nonobject", "malformed", "flushed", "oversize", "qmp_capabilities",
    "request-negotiation",
]

# Whether an entry may end with no line at all (a command that does not
# answer on success), and whether a proxy-initiated close may follow it.
SILENT_OK = {"shutdown"}
CLOSES = {"shutdown", "oversize"}


@attrs.define
class Expect:
    """One reply a client is owed, and what it may be."""

    kind: str
    id_text: bytes | None = None  # the id as the agent would write it; None: no id
    marker: int | None = None
    sync: int | None = None


@st.composite
def messages_to_send(draw):
    """(kind, id, detail) tuples; turned into bytes by the machine, which
    hands out the markers."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(KINDS))
        detail = None
        if kind in ("malformed",):
            detail = draw(st.sampled_from(MALFORMED))
        elif kind == "nonobject":
            detail = draw(st.sampled_from(NON_OBJECTS))
        elif kind == "rejected":
            detail = draw(st.sampled_from(["lacks", "not-a-string", "extra", "arguments"]))
        elif kind in ("sync", "sync-delimited"):
            detail = draw(st.integers(-(1 << 63), (1 << 63) - 1))
        elif kind == "flushed":
            detail = draw(st.floats(0, 1))  # where the request is cut
        out.append((kind, draw(ids), detail))
    return out


def _request_bytes(execute: Any, arguments: Any, ident: Any, style: int = 0) -> bytes:
    body: dict = {"execute": execute}
    if arguments is not None:
        body["arguments"] = arguments
    if ident is not ABSENT:
        body["id"] = ident
    if style == 0:
        return qjson.dumpb(body, qdict_order=False)
    return qjson.dumpb(body, qdict_order=False) + b"\n"


# -- the model agent ---------------------------------------------------------

AGENT_COMMANDS = {
    "guest-sync": True,
    "guest-sync-delimited": True,
    "guest-info": True,
    "guest-ping": True,
    "test-echo": True,
    "guest-shutdown": False,
    "guest-fsfreeze-status": True,
}


class ModelAgent:
    """qemu-ga as far as the router can tell: one parser for the agent's
    whole life, replies produced in order, delivered as the test says."""

    def __init__(self, echo: bool):
        self.echo = echo
        self.shutdown_fails = False
        self.restart()

    def restart(self) -> None:
        self.decoder = codec.RequestDecoder(flush_on_sentinel=False)
        self.outbox: list[tuple[bool, bytes]] = []  # (has an id, bytes), in production order
        self.delivered: list[bytes] = []  # replies with ids, for duplicates

    def receive(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            if isinstance(event, codec.ParseError):
                self.outbox.append((False, messages.error_reply(messages.GENERIC_ERROR, event.desc)))
                continue
            request = messages.check_request(event.value)
            if isinstance(request, messages.Rejected):
                has_id = request.has_id and self.echo
                self.outbox.append((has_id, messages.error_reply(messages.GENERIC_ERROR, request.desc, has_id, request.id)))
                continue
            has_id = request.has_id and self.echo
            reply = self._answer(request, has_id)
            if reply is not None:
                self.outbox.append((has_id, reply))

    def _answer(self, request: messages.Request, has_id: bool) -> bytes | None:
        name, args, ident = request.execute, request.arguments or {}, request.id
        if name not in AGENT_COMMANDS:
            return messages.not_found_reply(name, has_id, ident)
        if name in ("guest-sync", "guest-sync-delimited"):
            n = args.get("id")
            if type(n) is not int:
                return messages.error_reply(
                    messages.GENERIC_ERROR, "Invalid parameter type for 'id', expected: integer", has_id, ident
                )
            reply = messages.return_reply(n, has_id, ident)
            return b"\xff" + reply if name == "guest-sync-delimited" else reply
        if name == "guest-info":
            commands = [
                {"enabled": True, "name": c, "success-response": ok} for c, ok in AGENT_COMMANDS.items()
            ]
            return messages.return_reply({"version": "7.2.22", "supported_commands": commands}, has_id, ident)
        if name == "guest-fsfreeze-status":
            return messages.return_reply("thawed", has_id, ident)
        if name == "guest-shutdown":
            if self.shutdown_fails:
                return messages.error_reply(messages.GENERIC_ERROR, "shutdown failed %s" % args.get("n"), has_id, ident)
            return None
        if name == "test-echo":
            return messages.return_reply({"n": args.get("n")}, has_id, ident)
        return messages.return_reply({}, has_id, ident)

    def deliverable(self) -> list[int]:
        """Indexes of replies the agent may write next."""
        if not self.outbox:
            return []
        if not self.echo:
            return [0]
        first_idless = next((i for i, (has_id, _) in enumerate(self.outbox) if not has_id), None)
        return [i for i, (has_id, _) in enumerate(self.outbox) if has_id or i == first_idless]


# -- the machine -------------------------------------------------------------------


@attrs.define(eq=False)
class ModelClient:
    client: Any = attrs.field(repr=False)
    name: str
    protocol: str
    entries: list = attrs.field(factory=list)
    positions: set = attrs.field(factory=lambda: {0})  # where in entries the lines read so far may end
    unsent: bytearray = attrs.field(factory=bytearray)
    reference: codec.RequestDecoder = attrs.field(factory=lambda: codec.RequestDecoder(MAX_MESSAGE), repr=False)
    eof: bool = False  # the client shut down its sending side
    greeted: bool = False
    lines: int = 0
    closed_by_proxy: bool = False


def _expected(reference: codec.RequestDecoder, data: bytes) -> list[Expect]:
    """The replies owed for data, as the agent's parser frames it (fed
    whole here; the router's decoder gets it in pieces)."""
    out = []
    for event in reference.feed(data):
        if isinstance(event, codec.ParseError):
            out.append(Expect("oversize" if event.oversize else "parse-error"))
        elif isinstance(event, codec.Value):
            checked = messages.check_request(event.value)
            if isinstance(checked, messages.Rejected):
                out.append(Expect("rejected", _canonical(checked.id) if checked.has_id else None))
                continue
            id_text = _canonical(checked.id) if checked.has_id else None
            args = checked.arguments or {}
            name = checked.execute
            if name == "test-echo":
                out.append(Expect("echo", id_text, marker=args["n"]))
            elif name in ("guest-sync", "guest-sync-delimited") and type(args.get("id")) is int:
                kind = "sync" if name == "guest-sync" else "sync-delimited"
                out.append(Expect(kind, id_text, sync=args["id"]))
            else:
                kind = {
                    "guest-ping": "ping",
                    "guest-sync": "badsync",
                    "no-such-command": "unknown",
                    "guest-shutdown": "shutdown",
                }.get(name, name)
                out.append(Expect(kind, id_text))
    return out


def _closure(entries: list, positions: set) -> set:
    out = set()
    for p in positions:
        out.add(p)
        while p < len(entries) and entries[p].kind in SILENT_OK:
            p += 1
            out.add(p)
    return out


def _canonical(value: Any) -> bytes:
    return qjson.dumpb(value)


def _parse_line(line: bytes) -> Any:
    events = codec.RequestDecoder().feed(line + b"\n")
    assert len(events) == 1 and isinstance(events[0], codec.Value), line
    return events[0].value


def _matches(entry: Expect, line: bytes, sentinel: bool) -> bool:
    value = _parse_line(line)
    if not isinstance(value, dict):
        return False
    keys = set(value) - {"id"}
    if keys not in ({"return"}, {"error"}):
        return False
    if ("id" in value) != (entry.id_text is not None):
        return False
    if entry.id_text is not None:
        # Byte-exact, where the agent puts it: first in an error, last in a
        # return (QDict order).
        if "error" in value and not line.startswith(b'{"id": ' + entry.id_text + b", "):
            return False
        if "return" in value and not line.endswith(b', "id": ' + entry.id_text + b"}"):
            return False
    if "error" in value:
        error = value["error"]
        if not (isinstance(error, dict) and set(error) == {"class", "desc"}):
            return False
        if not (isinstance(error["class"], str) and isinstance(error["desc"], str)):
            return False
        return not sentinel
    result = value["return"]
    kind = entry.kind
    if kind in ("sync", "sync-delimited"):
        return type(result) is int and result == entry.sync and sentinel == (kind == "sync-delimited")
    if sentinel:
        return False
    if kind == "echo":
        return result == {"n": entry.marker}
    if kind == "ping":
        return result == {}
    return kind in ("qmp_capabilities", "request-negotiation")


class RouterMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.upstream = Upstream(Timings(sync_timeout=SYNC_TIMEOUT), rng=random.Random(1))
        self.router = Router(
            self.upstream,
            window=WINDOW,
            request_timeout=REQUEST_TIMEOUT,
            client_backlog=BACKLOG,
            max_message_size=MAX_MESSAGE,
            rng=random.Random(2),
        )
        self.clients: list[ModelClient] = []
        self.gone: list[ModelClient] = []
        self.markers = 0
        self.connected = False
        self.in_write: bytes | None = None  # taken from the router, not yet written
        self.agent = ModelAgent(echo=True)

    @initialize(echo=st.booleans(), ready=st.booleans())
    def start(self, echo, ready):
        self.agent.echo = echo
        if ready:
            self.connected = True
            self.router.upstream_connected(self.now)
            self._round_trip()
            assert self.upstream.state is State.READY

    def _round_trip(self) -> None:
        """A healthy agent: everything written is read and answered, in order."""
        for _ in range(100):
            if self.in_write is not None:
                self._write_done()
            while self.router.wants_write():
                self.in_write = self.router.take_upstream_write(self.now)
                self._write_done()
            if not self.agent.outbox:
                return
            while self.agent.outbox:
                has_id, reply = self.agent.outbox.pop(0)
                if has_id:
                    self.agent.delivered.append(reply)
                self.router.upstream_data(reply, self.now)
        raise AssertionError("no end to the round trips")

    @precondition(lambda self: self.connected)
    @rule()
    def agent_keeps_up(self):
        self._round_trip()
        self._settle()

    # -- clients -----------------------------------------------------------------
    @precondition(lambda self: len(self.clients) < 4)
    @rule(protocol=st.sampled_from(["qga", "qga", "qga", "qmp"]))
    def connect_client(self, protocol):
        client = self.router.add_client("test", protocol=protocol)
        self.clients.append(ModelClient(client, "c%d" % client.number, protocol))
        self._settle()

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def disconnect_client(self, data):
        mc = data.draw(st.sampled_from(self.clients))
        self.router.remove_client(mc.client)
        self.clients.remove(mc)
        self.gone.append(mc)
        self._settle()

    @precondition(lambda self: any(not mc.eof for mc in self.clients))
    @rule(data=st.data(), batch=messages_to_send(), newline=st.booleans())
    def client_writes(self, data, batch, newline):
        mc = data.draw(st.sampled_from([mc for mc in self.clients if not mc.eof]))
        data = b"".join(self._message(kind, ident, detail, newline) for kind, ident, detail in batch)
        mc.unsent += data
        mc.entries.extend(_expected(mc.reference, data))
        self._settle()

    @precondition(lambda self: any(not mc.eof for mc in self.clients))
    @rule(data=st.data(), batch=messages_to_send())
    def client_sends_and_proxy_reads(self, data, batch):
        """The same, with the shell reading it at once, in pieces."""
        mc = data.draw(st.sampled_from([mc for mc in self.clients if not mc.eof]))
        payload = b"".join(self._message(kind, ident, detail, True) for kind, ident, detail in batch)
        mc.unsent += payload
        mc.entries.extend(_expected(mc.reference, payload))
        while mc.unsent and self.router.can_read(mc.client):
            size = data.draw(st.integers(1, len(mc.unsent)))
            chunk = bytes(mc.unsent[:size])
            del mc.unsent[:size]
            self.router.client_data(mc.client, chunk, self.now)
        self._settle()

    @precondition(lambda self: any(mc.unsent for mc in self.clients))
    @rule(data=st.data())
    def proxy_reads_client(self, data):
        """The shell reads what a client sent, in a chunk of any size,
        when the router lets it."""
        mc = data.draw(st.sampled_from([mc for mc in self.clients if mc.unsent]))
        if not self.router.can_read(mc.client):
            return
        size = data.draw(st.integers(1, len(mc.unsent)))
        chunk = bytes(mc.unsent[:size])
        del mc.unsent[:size]
        self.router.client_data(mc.client, chunk, self.now)
        self._settle()

    @precondition(lambda self: any(not mc.eof for mc in self.clients))
    @rule(data=st.data())
    def client_half_closes(self, data):
        mc = data.draw(st.sampled_from([mc for mc in self.clients if not mc.eof]))
        mc.eof = True
        self._settle()

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def client_reads(self, data):
        mc = data.draw(st.sampled_from(self.clients))
        self._read(mc)
        self._settle()

    # -- the upstream --------------------------------------------------------------
    @precondition(lambda self: not self.connected)
    @rule(dice=st.integers(0, 3))
    def agent_channel_opens(self, dice):
        if dice:
            self.connected = True
            self.router.upstream_connected(self.now)
        else:
            self.router.upstream_lost(self.now)  # connect failed
        self._settle()

    @precondition(lambda self: self.connected)
    @rule(data=st.data(), dice=st.integers(0, 2))
    def agent_channel_lost(self, data, dice):
        """The channel closes: mid-write, mid-reply, or between."""
        if dice:
            return  # rarer than the rest: a lost channel fails everything in flight
        if self.in_write is not None:
            cut = data.draw(st.integers(0, len(self.in_write)))
            self.agent.receive(self.in_write[:cut])
            self.in_write = None
        choices = self.agent.deliverable()
        if choices and data.draw(st.booleans()):
            i = data.draw(st.sampled_from(choices))
            _, reply = self.agent.outbox[i]
            self.router.upstream_data(reply[: data.draw(st.integers(1, len(reply)))], self.now)
            # The agent wrote the rest; the next connection does not see it.
            del self.agent.outbox[i]
        self.connected = False
        self.router.upstream_lost(self.now)
        self._settle()

    @precondition(lambda self: self.connected and self.in_write is None and self.router.wants_write())
    @rule(complete=st.booleans())
    def router_writes(self, complete):
        data = self.router.take_upstream_write(self.now)
        assert data, "wants_write() but nothing to write"
        self.in_write = data
        if complete:
            self._write_done()
        self._settle()

    @precondition(lambda self: self.in_write is not None)
    @rule()
    def write_completes(self):
        self._write_done()
        self._settle()

    @precondition(lambda self: self.connected and self.agent.deliverable())
    @rule(data=st.data(), pieces=st.integers(1, 3))
    def agent_replies(self, data, pieces):
        i = data.draw(st.sampled_from(self.agent.deliverable()))
        has_id, reply = self.agent.outbox.pop(i)
        if has_id:
            self.agent.delivered.append(reply)
        self._deliver(reply, data, pieces)
        self._settle()

    @precondition(lambda self: self.connected and self.agent.echo and self.agent.delivered)
    @rule(data=st.data())
    def agent_duplicates_a_reply(self, data):
        self._deliver(data.draw(st.sampled_from(self.agent.delivered)), data, 1)
        self._settle()

    @precondition(lambda self: self.connected and self.agent.echo)
    @rule(ident=st.one_of(st.integers(-1000, 1000), st.text(max_size=3), st.none()), error=st.booleans())
    def agent_replies_with_an_unknown_id(self, ident, error):
        if error:
            reply = messages.error_reply(messages.GENERIC_ERROR, "stale", True, ident)
        else:
            reply = messages.return_reply({"n": -1}, True, ident)
        self.router.upstream_data(reply, self.now)
        self._settle()

    @precondition(lambda self: self.connected)
    @rule(garbage=st.binary(max_size=40).filter(lambda b: b"\n" not in b and not _looks_like_reply(b)))
    def agent_writes_garbage(self, garbage):
        self.router.upstream_data(garbage + b"\n", self.now)
        self._settle()

    @rule(fails=st.booleans())
    def agent_shutdown_behaviour(self, fails):
        self.agent.shutdown_fails = fails

    @rule(echo=st.booleans(), dice=st.integers(0, 2))
    def agent_restarts(self, echo, dice):
        """qemu-ga restarts (or QEMU does, with another guest agent when
        the channel is down): its parser and unsent replies are gone."""
        if dice:
            return
        self.agent.restart()
        if not self.connected:
            self.agent.echo = echo
        self._settle()

    @rule(dt=st.sampled_from([0.001, 0.3, 1.0, 2.5, REQUEST_TIMEOUT]))
    def time_passes(self, dt):
        self.now += dt
        self.router.tick(self.now)
        self._settle()

    @precondition(lambda self: any(not call.done for _, _, call in self.router._deadlines))
    @rule()
    def time_runs_to_a_request_deadline(self):
        """Straight to the next request's timeout."""
        self.now = max(self.now, min(d for d, _, call in self.router._deadlines if not call.done))
        self.router.tick(self.now)
        self._settle()

    # -- helpers -------------------------------------------------------------------
    def _message(self, kind: str, ident: Any, detail: Any, newline: bool) -> bytes:
        end = b"\n" if newline else b""
        if kind in ("malformed", "nonobject"):
            return detail + end
        if kind == "rejected":
            bodies = {
                "lacks": {},
                "not-a-string": {"execute": 1},
                "extra": {"execute": "guest-ping", "bogus": 1},
                "arguments": {"execute": "guest-ping", "arguments": [1]},
            }
            body = dict(bodies[detail])
            if ident is not ABSENT:
                body["id"] = ident
            return qjson.dumpb(body, qdict_order=False) + end
        if kind == "oversize":
            return _request_bytes("test-echo", {"pad": "a" * (MAX_MESSAGE + 10)}, ident) + end
        if kind == "flushed":
            whole = _request_bytes("test-echo", {"n": 0}, ident)
            return whole[: int(detail * (len(whole) - 1))] + b"\xff"
        self.markers += 1
        n = self.markers
        command, arguments = {
            "echo": ("test-echo", {"n": n}),
            "ping": ("guest-ping", None),
            "sync": ("guest-sync", {"id": detail}),
            "sync-delimited": ("guest-sync-delimited", {"id": detail}),
            "badsync": ("guest-sync", {"id": "x%d" % n}),
            "unknown": ("no-such-command", {"n": n}),
            "shutdown": ("guest-shutdown", {"n": n}),
            "qmp_capabilities": ("qmp_capabilities", None),
            "request-negotiation": ("request-negotiation", None),
        }[kind]
        return _request_bytes(command, arguments, ident) + end

    def _write_done(self) -> None:
        data, self.in_write = self.in_write, None
        self.agent.receive(data)
        self.router.upstream_write_done(self.now)

    def _deliver(self, reply: bytes, data, pieces: int) -> None:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(reply)), max_size=pieces - 1)))
        start = 0
        for cut in cuts + [len(reply)]:
            if cut > start:
                self.router.upstream_data(reply[start:cut], self.now)
                start = cut

    def _read(self, mc: ModelClient) -> None:
        out = self.router.take_output(mc.client)
        if not out:
            return
        assert out.endswith(b"\n"), out
        for line in out[:-1].split(b"\n"):
            mc.lines += 1
            if mc.protocol == "qmp" and not mc.greeted:
                assert line.startswith(b'{"QMP": '), line
                mc.greeted = True
                continue
            sentinel = line.startswith(b"\xff")
            if sentinel:
                line = line[1:]
            entries = mc.entries
            nxt = set()
            for p in _closure(entries, mc.positions):
                if p < len(entries) and _matches(entries[p], line, sentinel):
                    nxt.add(p + 1)
            note("%s got %r" % (mc.name, line))
            event("reply: " + _describe(line))
            assert nxt, "%s: reply %r fits none of %r at %r" % (mc.name, line, entries, sorted(mc.positions))
            mc.positions = nxt

    def _settle(self) -> None:
        """What the shell does after every event: a client that sent
        everything and half-closed is marked closing; a client the router
        is done with is closed and removed."""
        for mc in list(self.clients):
            client = mc.client
            if mc.eof and not mc.unsent and not client.closing:
                client.closing = True
            if client.wants_close():
                reach = _closure(mc.entries, mc.positions)
                if not mc.eof:
                    assert any(
                        e.kind in CLOSES for e in mc.entries[: max(reach) + 1]
                    ), "%s closed by the proxy without cause: %r" % (mc.name, mc.entries)
                elif not any(e.kind in CLOSES for e in mc.entries):
                    assert len(mc.entries) in reach, "%s closed while owed %r" % (mc.name, mc.entries)
                mc.closed_by_proxy = True
                self.router.remove_client(client)
                self.clients.remove(mc)
                self.gone.append(mc)

    # -- invariants --------------------------------------------------------------------
    @invariant()
    def tables_are_consistent(self):
        router = self.router
        for mc in self.gone:
            assert not mc.client.output and not mc.client.slots and not mc.client.queue
            assert mc.client not in router.clients
        live = [mc.client for mc in self.clients]
        assert router.clients == live
        for client in live + [router._internal, router._background]:
            queued = sum(call.request.size for call in client.queue)
            assert client.queued_bytes == queued, (client.number, client.queued_bytes, queued)
            assert client.output_bytes == sum(len(d) for d in client.output)
        assert router.budget.used == sum(c.buffered() for c in live), (
            router.budget.used,
            sum(c.buffered() for c in live),
        )
        for up_id, call in router._pending.items():
            assert call.up_id == up_id and not call.done
        assert all(not call.done for call in router._in_order)
        if self.upstream.info is not None:
            limit = WINDOW if self.upstream.info.echoes_id else 1
            # no-reply commands may sit beside the window until their sync
            flying = list(router._pending.values()) + list(router._in_order)
            assert len([c for c in flying if not c.no_reply]) <= limit
        assert set(router._turns) == {c for c in live + [router._internal] if c.queue}
        assert len(router._turns) == len(set(router._turns))

    # -- the end: everything done, then everyone gone -------------------------------------
    def teardown(self):
        try:
            self._drain()
        finally:
            super().teardown()

    def _drain(self):
        event("upstream state before the end: " + self.upstream.state.value)
        event("stale replies dropped: %s" % ("yes" if self.router.stale_replies else "no"))
        self.agent.shutdown_fails = False
        for mc in self.clients:
            mc.eof = True
        for _ in range(5000):
            if self.in_write is not None:
                self._write_done()
            if not self.connected:
                self.connected = True
                self.router.upstream_connected(self.now)
            for mc in self.clients:
                if mc.unsent and self.router.can_read(mc.client):
                    self.router.client_data(mc.client, bytes(mc.unsent), self.now)
                    mc.unsent.clear()
                self._read(mc)
            self._settle()
            while self.router.wants_write():
                self.in_write = self.router.take_upstream_write(self.now)
                self._write_done()
            if self.agent.outbox:
                _, reply = self.agent.outbox.pop(0)
                self.router.upstream_data(reply, self.now)
                continue
            if not self.clients and not self.router.in_flight() and not self.router.queued():
                break
            self.now += 0.5
            self.router.tick(self.now)
        else:
            raise AssertionError("the router did not settle: %r" % [(mc.name, mc.entries, mc.positions) for mc in self.clients])
        router = self.router
        self.now += 2 * REQUEST_TIMEOUT
        router.tick(self.now)
        assert router.next_deadline() is None or self.upstream.next_deadline() is not None
        assert not router._pending and not router._in_order and not router._turns
        assert not router._deadlines
        assert router.budget.used == 0
        assert not router._internal.queue and not router._background.queue
        assert router._internal.queued_bytes == 0
        assert not router.clients


def _describe(line: bytes) -> str:
    """A coarse class of a reply, for the statistics (what was covered)."""
    if line.startswith(b'{"return": {"n": '):
        return "agent's answer"
    for text, name in (
        (b"timed out", "timeout"),
        (b"not available", "unavailable"),
        (b"JSON", "parse error"),
        (b"QMP input", "rejected"),
        (b"has not been found", "not found"),
        (b"Expecting capabilities", "qmp not negotiated"),
    ):
        if text in line:
            return name
    return "other " + ("error" if b'"error"' in line else "return")


def _looks_like_reply(data: bytes) -> bool:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(value, dict) and ("return" in value or "error" in value)


TestRouter = RouterMachine.TestCase
