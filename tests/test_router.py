"""The router and upstream state machine, driven byte by byte (no I/O).

A scripted peer plays the agent: it decodes what the router writes with
the agent's own parser rules and answers as qemu-ga 7.2 would, with
knobs for what a test needs (no id echo, holding replies back)."""

from __future__ import annotations

import json
import random

import pytest

from qgaproxy import codec, messages, qjson
from qgaproxy.router import Router
from qgaproxy.upstream import State, Timings, Upstream


class ScriptedAgent:
    """Answers what the router wrote, like qemu-ga (see module docstring)."""

    def __init__(self, echo: bool = True, commands=None):
        self.echo = echo
        self.decoder = codec.RequestDecoder(flush_on_sentinel=False)
        self.received: list = []
        self.commands = commands or {
            "guest-ping": True,
            "guest-info": True,
            "guest-sync": True,
            "guest-sync-delimited": True,
            "guest-get-host-name": True,
            "guest-shutdown": False,
            "guest-fsfreeze-freeze": True,
        }

    def guest_info(self):
        return {
            "version": "7.2.22",
            "supported_commands": [
                {"enabled": True, "name": name, "success-response": ok} for name, ok in self.commands.items()
            ],
        }

    def answer(self, data: bytes) -> list[bytes]:
        """Replies (one bytes per reply) to what the router wrote."""
        out = []
        for event in self.decoder.feed(data):
            if isinstance(event, codec.ParseError):
                out.append(messages.error_reply(messages.GENERIC_ERROR, event.desc))
                continue
            request = event.value
            self.received.append(request)
            has_id = "id" in request and self.echo
            ident = request.get("id")
            name = request["execute"]
            if name in ("guest-sync", "guest-sync-delimited"):
                reply = messages.return_reply(request["arguments"]["id"], has_id, ident)
                out.append((b"\xff" if name == "guest-sync-delimited" else b"") + reply)
            elif name == "guest-info":
                out.append(messages.return_reply(self.guest_info(), has_id, ident))
            elif name == "guest-get-host-name":
                out.append(messages.return_reply({"host-name": "vm"}, has_id, ident))
            elif name == "guest-shutdown":
                pass
            elif name in self.commands:
                out.append(messages.return_reply({}, has_id, ident))
            else:
                out.append(messages.not_found_reply(name, has_id, ident))
        return out


class Harness:
    def __init__(self, echo=True, window=8, timeout=5.0):
        self.now = 0.0
        self.upstream = Upstream(Timings(sync_timeout=1.0), rng=random.Random(1))
        self.router = Router(self.upstream, window=window, request_timeout=timeout, rng=random.Random(2))
        self.agent = ScriptedAgent(echo=echo)
        self.held: list[bytes] = []  # replies the agent has not delivered yet

    def connect(self):
        self.router.upstream_connected(self.now)
        self.pump()
        assert self.upstream.state is State.READY

    def write_upstream(self) -> bytes:
        data = b""
        while self.router.wants_write():
            chunk = self.router.take_upstream_write(self.now)
            if chunk:
                self.router.upstream_write_done(self.now)
            data += chunk
        return data

    def pump(self, hold: bool = False):
        """Carry writes to the agent and its replies back until quiet."""
        while True:
            data = self.write_upstream()
            if not data:
                return
            replies = self.agent.answer(data)
            if hold:
                self.held.extend(replies)
            else:
                for reply in replies:
                    self.router.upstream_data(reply, self.now)

    def release(self):
        held, self.held = self.held, []
        for reply in held:
            self.router.upstream_data(reply, self.now)
        self.pump()

    def advance(self, seconds):
        self.now += seconds
        self.router.tick(self.now)

    def output(self, client) -> list[bytes]:
        data = self.router.take_output(client)
        return [line + b"\n" for line in data.split(b"\n")[:-1]] if data else []


def send(h: Harness, client, payload: str | bytes):
    data = payload.encode() if isinstance(payload, str) else payload
    h.router.client_data(client, data, h.now)


def test_reply_reaches_its_client_with_its_own_id():
    h = Harness()
    h.connect()
    a = h.router.add_client()
    b = h.router.add_client()
    send(h, a, '{"execute": "guest-ping", "id": 7}')
    send(h, b, '{"execute": "guest-ping", "id": 7}')
    send(h, b, '{"execute": "guest-get-host-name"}')
    h.pump()
    assert h.output(a) == [b'{"return": {}, "id": 7}\n']
    assert h.output(b) == [b'{"return": {}, "id": 7}\n', b'{"return": {"host-name": "vm"}}\n']
    # the agent saw only the proxy's own ids, never the clients'
    ids = [r.get("id") for r in h.agent.received if r["execute"] == "guest-ping"]
    assert len(set(ids)) == 2 and 7 not in ids


@pytest.mark.parametrize("ident", ['"s"', "null", "1.5", "[1, {\"a\": true}]", "{\"b\": 1, \"a\": 2}", "-0", "18446744073709551615"])
def test_any_id_is_restored_as_the_agent_would_echo_it(ident):
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping", "id": %s}' % ident)
    h.pump()
    value = codec.RequestDecoder().feed(ident.encode() + b" ")[0].value
    assert h.output(c) == [b'{"return": {}, "id": ' + qjson.dumpb(value) + b"}\n"]


def test_an_empty_return_is_passed_on_without_being_parsed(monkeypatch):
    """guest-ping's reply, and every setter's: {"return": {}, "id": N} is valid
    as it stands, so it reaches its client, with the client's own id or none,
    without a JSON parse; one byte more or less and it is parsed."""
    from qgaproxy import router as router_module

    h = Harness()
    h.connect()
    c = h.router.add_client()
    parsed = []
    decode = router_module._decode_json
    monkeypatch.setattr(router_module, "_decode_json", lambda text: parsed.append(text) or decode(text))
    send(h, c, '{"execute": "guest-ping", "id": "a"}{"execute": "guest-ping"}{"execute": "guest-get-host-name"}')
    h.pump()
    assert h.output(c) == [b'{"return": {}, "id": "a"}\n', b'{"return": {}}\n', b'{"return": {"host-name": "vm"}}\n']
    assert parsed == ['{"return": {"host-name": "vm"}, "id": %d}' % (h.router._next_up_id - 1)]


def test_error_replies_keep_the_agents_member_order():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "no-such", "id": "x"}{"execute": "no-such"}')
    h.pump()
    assert h.output(c) == [
        b'{"id": "x", "error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}}\n',
        b'{"error": {"class": "CommandNotFound", "desc": "The command no-such has not been found"}}\n',
    ]


def test_local_sync_does_not_overtake_an_earlier_reply():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-get-host-name"}')
    h.pump(hold=True)  # in flight, not answered yet
    send(h, c, '{"execute": "guest-sync", "arguments": {"id": 42}}')
    assert h.output(c) == []  # the sync is answered, but waits its turn
    h.release()
    assert h.output(c) == [b'{"return": {"host-name": "vm"}}\n', b'{"return": 42}\n']
    # and no sync ever reached the agent for it
    assert not [r for r in h.agent.received if r.get("arguments") == {"id": 42}]


def test_sync_delimited_is_answered_locally_with_the_sentinel():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-sync-delimited", "arguments": {"id": 9}, "id": 3}')
    assert h.output(c) == [b'\xff{"return": 9, "id": 3}\n']


def test_malformed_sync_goes_to_the_agent_for_its_own_error():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-sync", "arguments": {"id": "a"}}')
    assert h.write_upstream() != b""


def test_timeout_errors_with_client_id_resyncs_and_drops_the_late_reply():
    h = Harness(timeout=5.0)
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-fsfreeze-freeze", "id": "f"}')
    h.pump(hold=True)  # the agent takes its time
    h.advance(5.0)
    assert h.output(c) == [
        b'{"id": "f", "error": {"class": "GenericError", "desc": '
        b"\"Guest agent command 'guest-fsfreeze-freeze' timed out after 5 seconds\"}}\n"
    ]
    assert h.upstream.state is State.RESYNCING
    resync = h.write_upstream()
    assert resync.startswith(b"\xff") and b"guest-sync-delimited" in resync
    # the late reply arrives, then the agent answers the 0xFF and the sync
    h.release()
    for reply in h.agent.answer(resync):
        h.router.upstream_data(reply, h.now)
    h.pump()
    assert h.upstream.state is State.READY
    assert h.router.stale_replies == 1
    assert h.output(c) == []
    send(h, c, '{"execute": "guest-ping", "id": 2}')
    h.pump()
    assert h.output(c) == [b'{"return": {}, "id": 2}\n']


def test_a_lost_guest_info_is_asked_again_after_a_fresh_sync():
    """The agent answered the sync, then went (stopped, killed) before its
    guest-info reply: the channel stays open (virtio-serial), so only a
    timer can notice. The sync starts over; a late guest-info is stale."""
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping", "id": 1}')
    h.pump(hold=True)
    h.advance(5.0)  # the ping times out: resync
    h.output(c)
    sync = h.write_upstream()
    for reply in h.agent.answer(sync):
        h.router.upstream_data(reply, h.now)
    info = h.write_upstream()
    assert b"guest-info" in info  # ... and its reply never comes
    h.held.clear()
    h.advance(2.0)
    assert h.upstream.state is State.UNAVAILABLE
    again = h.write_upstream()
    assert again.startswith(b"\xff") and b"guest-sync-delimited" in again
    for reply in h.agent.answer(again):
        h.router.upstream_data(reply, h.now)
    h.pump()
    assert h.upstream.state is State.READY
    for reply in h.agent.answer(info):  # the first guest-info's reply, late
        h.router.upstream_data(reply, h.now)
    assert h.router.stale_replies == 1
    send(h, c, '{"execute": "guest-ping", "id": 2}')
    h.pump()
    assert h.output(c) == [b'{"return": {}, "id": 2}\n']


def test_agent_without_id_echo_is_served_one_at_a_time_by_order():
    h = Harness(echo=False)
    h.connect()
    assert not h.upstream.info.echoes_id
    a = h.router.add_client()
    b = h.router.add_client()
    send(h, a, '{"execute": "guest-ping", "id": "a1"}{"execute": "guest-get-host-name", "id": "a2"}')
    send(h, b, '{"execute": "guest-ping", "id": "b1"}')
    first = h.write_upstream()
    assert first.count(b"execute") == 1 and b'"id"' not in first
    assert h.write_upstream() == b""  # nothing more until the reply
    for reply in h.agent.answer(first):
        h.router.upstream_data(reply, h.now)
    h.pump()
    assert h.output(a) == [b'{"return": {}, "id": "a1"}\n', b'{"return": {"host-name": "vm"}, "id": "a2"}\n']
    assert h.output(b) == [b'{"return": {}, "id": "b1"}\n']


def test_round_robin_across_clients():
    h = Harness(window=1)
    h.connect()
    a = h.router.add_client()
    b = h.router.add_client()
    send(h, a, '{"execute": "guest-ping", "id": 1}' * 5)
    send(h, b, '{"execute": "guest-ping", "id": 2}')
    order = []
    for _ in range(6):
        data = h.write_upstream()
        sent = json.loads(data)
        call = h.router._pending[sent["id"]]
        order.append("a" if call.client is a else "b")
        for reply in h.agent.answer(data):
            h.router.upstream_data(reply, h.now)
    assert order[:2] == ["a", "b"]


def test_window_bounds_what_is_in_flight():
    h = Harness(window=4)
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping"}' * 10)
    data = h.write_upstream()
    assert data.count(b"guest-ping") == 4
    assert h.router.in_flight() == 4


def test_no_reply_command_is_followed_by_a_sync_and_routes_its_error():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    other = h.router.add_client()
    send(h, c, '{"execute": "guest-shutdown", "id": 1}')
    data = h.write_upstream()
    assert b"guest-shutdown" in data and b"guest-sync-delimited" in data
    assert b"\xff" not in data  # the channel is clean: no parser reset needed
    assert h.upstream.state is State.RESYNCING
    send(h, other, '{"execute": "guest-ping"}')  # waits for the sync
    # the agent fails the shutdown: the error goes to its sender
    h.router.upstream_data(
        messages.error_reply(messages.GENERIC_ERROR, "failed", True, json.loads(data.split(b"\n")[0])["id"]), h.now
    )
    for reply in h.agent.answer(data):
        h.router.upstream_data(reply, h.now)
    h.pump()
    assert h.output(c) == [b'{"id": 1, "error": {"class": "GenericError", "desc": "failed"}}\n']
    assert h.output(other) == [b'{"return": {}}\n']


def test_shutdown_then_channel_closes_closes_the_sender():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-shutdown"}')
    h.pump()  # no reply; the sync is answered: success
    assert h.upstream.state is State.READY
    assert h.output(c) == []
    h.router.upstream_lost(h.now)
    assert c.wants_close()


def test_requests_fail_fast_while_unavailable_and_recover():
    h = Harness()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping", "id": 1}')
    assert b"Guest agent is not available" in h.router.take_output(c)
    h.router.upstream_connected(h.now)
    h.write_upstream()  # the sync goes nowhere: no agent yet
    send(h, c, '{"execute": "guest-ping", "id": 2}')  # waits while syncing
    h.advance(1.0)
    assert h.upstream.state is State.UNAVAILABLE
    assert b"Guest agent is not available" in h.router.take_output(c)
    # the agent comes up and answers the sync it finds
    h.advance(1.0)
    data = h.write_upstream()
    for reply in h.agent.answer(data):
        h.router.upstream_data(reply, h.now)
    h.pump()
    assert h.upstream.state is State.READY


def test_upstream_lost_fails_in_flight_requests():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping", "id": 1}')
    h.write_upstream()
    h.router.upstream_lost(h.now)
    assert h.output(c) == [
        b'{"id": 1, "error": {"class": "GenericError", "desc": "Guest agent is not available: connection to its channel lost"}}\n'
    ]


def test_stray_before_sync_is_swallowed_and_garbage_dropped():
    h = Harness()
    h.router.upstream_connected(h.now)
    data = h.write_upstream()
    h.router.upstream_data(b'{"return": {"half', h.now)  # half a reply left over
    for reply in h.agent.answer(data):
        h.router.upstream_data(reply, h.now)
    h.pump()
    assert h.upstream.state is State.READY
    assert h.router.stale_replies == 0


def test_oversize_message_errors_then_closes():
    h = Harness()
    h.router.max_message_size = 1000
    h.connect()
    c = h.router.add_client()
    c.decoder = codec.RequestDecoder(1000)
    send(h, c, '{"execute": "guest-ping", "arguments": {"x": "' + "a" * 2000 + '"}}')
    out = h.output(c)
    assert out == [b'{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}\n']
    assert c.wants_close()
    assert not [r for r in h.agent.received if r["execute"] == "guest-ping"]


def test_client_backlog_pauses_reading():
    h = Harness()
    h.router.client_backlog = 3
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping"}' * 3)
    assert not h.router.can_read(c)
    h.pump()
    h.router.take_output(c)
    assert h.router.can_read(c)


def test_queued_request_failed_by_a_lost_channel_gives_its_bytes_back():
    h = Harness()
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping"}')  # queued, not yet written
    h.router.upstream_lost(h.now)
    assert b"Guest agent is not available" in h.router.take_output(c)
    assert c.queued_bytes == 0
    assert h.router.budget.used == 0


def test_queued_request_that_times_out_gives_its_bytes_back():
    h = Harness(window=1)
    h.connect()
    c = h.router.add_client()
    send(h, c, '{"execute": "guest-ping"}{"execute": "guest-ping"}')
    h.pump(hold=True)  # the first in flight, unanswered; the second queued
    h.advance(5.0)
    assert len(h.output(c)) == 2
    assert c.queued_bytes == 0
    assert h.router.budget.used == 0


@pytest.mark.parametrize(
    "line",
    [
        b'{"return": {}} {"return": {"forged": true}, "id": %d}',  # two objects: one would answer the next request
        b'{"return": oops, "id": %d}',  # not JSON
        b'{"return": "\xff\xfe", "id": %d}',  # not ASCII: the agent escapes everything else
        b'{"return": {}, "id": 1}{"return": {}, "id": %d}',  # an empty return's head, then a second object
        b'{"return": {}{"forged": 1}, "id": %d}',
    ],
)
def test_malformed_reply_with_a_pending_id_reaches_no_client(line):
    """The guest is not trusted: a line that ends with a pending request's id
    but is not one well-formed reply is dropped, however it arrives, and the
    request times out as for any lost reply."""
    for split in (False, True):
        h = Harness(timeout=5.0)
        h.connect()
        c = h.router.add_client()
        send(h, c, '{"execute": "guest-ping", "id": 1}')
        sent = h.write_upstream()
        ident = int(sent[sent.rindex(b'"id": ') + 6 : sent.rindex(b"}")])
        raw = (line % ident) + b"\n"
        if split:  # byte by byte: through the decoder
            for i in range(len(raw)):
                h.router.upstream_data(raw[i : i + 1], h.now)
        else:
            h.router.upstream_data(raw, h.now)
        assert h.output(c) == [], (split, raw)
        h.advance(5.0)
        assert [json.loads(x)["error"]["desc"] for x in h.output(c)] == [
            "Guest agent command 'guest-ping' timed out after 5 seconds"
        ]
