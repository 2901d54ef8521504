"""Properties of the codecs, the JSON dialect and id rewriting (hypothesis).

- RequestDecoder and ReplyDecoder: what comes out does not depend on how
  the bytes were split, limits included.
- qjson: what the writer writes, the parser reads back as the same value;
  and every reply the real agent wrote in the captured wire corpus
  (tests/wire/qga-7.2.json) is written back byte for byte.
- messages.rewrite_id changes the id and nothing else.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from hypothesis import given, settings, strategies as st

from qgaproxy import codec, messages, qjson

# A quarter of the profile's examples (tests/conftest.py): these are cheap
# to search and the stateful router test needs the time more.
few = settings(max_examples=max(50, settings.default.max_examples // 4))

WIRE = os.path.join(os.path.dirname(__file__), "wire", "qga-7.2.json")


def _wire_cases() -> list[dict]:
    with open(WIRE) as f:
        return json.load(f)["cases"]


def _wire_inputs() -> list[bytes]:
    out = []
    for case in _wire_cases():
        if "input" in case:
            out.append(case["input"].encode("latin-1"))
        for part in case.get("input_parts") or ():
            out.append(part.encode("latin-1"))
    return [data for data in out if len(data) < 4096]


def _wire_reply_lines() -> list[bytes]:
    lines = []
    for case in _wire_cases():
        for key in ("replies", "after_flush", "next_client_received"):
            value = case.get(key)
            if isinstance(value, list):
                lines.extend(value)
        if isinstance(case.get("flush_reply"), str):
            lines.append(case["flush_reply"])
    out = []
    for text in lines:
        data = text.encode("latin-1")
        for line in data.split(b"\n"):
            line = line.lstrip(b"\xff")
            if line.strip():
                out.append(line)
    return sorted(set(out))


WIRE_INPUTS = _wire_inputs()
WIRE_REPLIES = _wire_reply_lines()


def parse(data: bytes):
    """One value, as the agent's parser reads it."""
    events = codec.RequestDecoder().feed(b"[" + data + b"]")
    assert len(events) == 1 and isinstance(events[0], codec.Value), (data, events)
    return events[0].value[0]


def strict(value):
    """A form where 1, 1.0 and True differ and key order does not matter."""
    if isinstance(value, dict):
        return ("dict", sorted((k, strict(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", [strict(v) for v in value])
    return (type(value).__name__, repr(value))


def canonical_events(events):
    out = []
    for event in events:
        if isinstance(event, codec.Value):
            out.append(("value", strict(event.value), event.size))
        else:
            out.append(event)
    return out


def split_feed(decoder, data: bytes, cuts: list[int]) -> list:
    out = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out


# -- strategies ------------------------------------------------------------------

def _agent_accepts(value) -> bool:
    try:
        text = qjson.dumpb(value, qdict_order=False)
    except UnicodeEncodeError:
        return False
    events = codec.RequestDecoder().feed(b"[" + text + b"]")
    return len(events) == 1 and isinstance(events[0], codec.Value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
).filter(_agent_accepts)

stream_pieces = st.one_of(
    st.sampled_from(WIRE_INPUTS),
    st.binary(max_size=24),
    st.sampled_from([b"\xff", b"\xfe", b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b"\n", b" ", b"\x00", b"1", b"0", b"e", b"E", b"+", b".", b"-"]),
    json_values.map(lambda v: qjson.dumpb(v, qdict_order=False)),
)
streams = st.lists(stream_pieces, max_size=12).map(b"".join)


# -- the decoders: splitting does not matter ------------------------------------------------

@few
@given(data=streams, cuts=st.lists(st.integers(0, 4096), max_size=8), max_size=st.sampled_from([codec.MAX_TOKEN_SIZE, 64, 16, 3]),
       flush=st.booleans())
def test_request_decoder_does_not_depend_on_the_split(data, cuts, max_size, flush):
    cuts = [c for c in cuts if c <= len(data)]
    whole = codec.RequestDecoder(max_size, flush_on_sentinel=flush)
    pieces = codec.RequestDecoder(max_size, flush_on_sentinel=flush)
    assert canonical_events(split_feed(pieces, data, cuts)) == canonical_events(whole.feed(data))
    assert pieces.buffered() == whole.buffered()
    assert pieces.idle() == whole.idle()


@few
@given(data=streams)
def test_request_decoder_byte_by_byte(data):
    whole = codec.RequestDecoder().feed(data)
    decoder = codec.RequestDecoder()
    single = [event for i in range(len(data)) for event in decoder.feed(data[i : i + 1])]
    assert canonical_events(single) == canonical_events(whole)


reply_pieces = st.one_of(
    st.sampled_from(WIRE_REPLIES).map(lambda line: line + b"\n"),
    st.binary(max_size=30),
    st.sampled_from([b"\xff", b"\n", b"\xff\n", b" \n"]),
)


@few
@given(
    data=st.lists(reply_pieces, max_size=12).map(b"".join),
    cuts=st.lists(st.integers(0, 4096), max_size=8),
    max_line=st.sampled_from([codec.MAX_REPLY_LINE, 40, 8]),
)
def test_reply_decoder_does_not_depend_on_the_split(data, cuts, max_line):
    cuts = [c for c in cuts if c <= len(data)]
    whole = codec.ReplyDecoder(max_line)
    expected = whole.feed(data)
    pieces = codec.ReplyDecoder(max_line)
    got = split_feed(pieces, data, cuts)
    if max_line == codec.MAX_REPLY_LINE:
        assert got == expected
        assert pieces.buffered() == whole.buffered()
    else:
        # The limit bounds what is buffered: a line no longer than it is
        # never lost, however it is split, and the buffer never passes it.
        def short(events):
            return [e for e in events if isinstance(e, codec.Line) and len(e.raw) <= max_line]

        assert short(got) == short(expected)
        decoder = codec.ReplyDecoder(max_line)
        for piece in (data[a:b] for a, b in zip([0] + sorted(set(cuts)), sorted(set(cuts)) + [len(data)])):
            decoder.feed(piece)
            assert decoder.buffered() <= max_line
    for event in got:
        if isinstance(event, codec.Line):
            assert b"\n" not in event.raw and b"\xff" not in event.raw


# -- qjson: round trip and the agent's own bytes ------------------------------------------------

@few
@given(value=json_values)
def test_writer_and_parser_round_trip(value):
    text = qjson.dumpb(value, qdict_order=False)
    back = parse(text)
    # int64/uint64 stay integers; a float prints as %.17g, which reads back
    # as the same double (an integral one becomes an integer, as in QEMU).
    def same(a, b):
        if isinstance(a, float) and not isinstance(b, float):
            return type(b) is int and a == b and math.isfinite(a)
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return strict(a) == strict(b)

    assert same(value, back)
    if b"-0" not in text.replace(b"-0.", b""):
        # (the double -0.0 prints as "-0", which reads back as the integer 0)
        assert qjson.dumpb(back, qdict_order=False) == text
    # In QDict order too: the same members, whatever order they come in.
    assert strict(parse(qjson.dumpb(value))) == strict(back)


@pytest.mark.parametrize("line", WIRE_REPLIES, ids=range(len(WIRE_REPLIES)))
def test_writer_is_byte_exact_against_the_agent(line):
    """Every reply line the real qemu-ga wrote, re-parsed and re-written."""
    events = codec.RequestDecoder().feed(line + b"\n")
    if not (len(events) == 1 and isinstance(events[0], codec.Value)):
        # The agent's own invalid output (an id of 1e400 comes back as inf).
        assert b"inf" in line or b"nan" in line, (line, events)
        return
    value = events[0].value
    # Parsing builds dicts in the order written: that order is QDict order,
    # and re-inserting keys in it gives it again except within a bucket.
    written = qjson.dumpb(value, qdict_order=False)
    if written != line and b"-0" in line:
        # The double -0.0 prints as "-0", which reads back as the integer 0.
        written = written.replace(b": 0", b": -0").replace(b"[0", b"[-0")
    assert written == line


def test_the_wire_corpus_is_there():
    assert len(WIRE_REPLIES) > 100 and len(WIRE_INPUTS) > 100


# -- rewrite_id: only the id changes ---------------------------------------------------------

client_ids = st.one_of(st.just(None), json_values.map(lambda v: (v,)))
reply_bodies = st.one_of(
    json_values.map(lambda v: ("return", v)),
    st.tuples(st.sampled_from(["GenericError", "CommandNotFound"]), st.text(max_size=20)).map(
        lambda t: ("error", {"class": t[0], "desc": t[1]})
    ),
)


@few
@given(body=reply_bodies, up_id=st.one_of(st.none(), st.integers(1 << 40, 1 << 52)), client=client_ids)
def test_rewrite_id_keeps_everything_but_the_id(body, up_id, client):
    kind, payload = body
    agent = {kind: payload}
    if up_id is not None:
        agent["id"] = up_id
    raw = qjson.dumpb(agent)  # what the agent writes, byte for byte
    has_id = client is not None
    ident = client[0] if has_id else None
    client_id = qjson.dumpb(ident) if has_id else None  # as the router makes it (Request.id_json)
    out = messages.rewrite_id(raw, None if up_id is None else str(up_id).encode(), client_id, kind)
    if kind == "return":
        expected = messages.return_reply(payload, has_id, ident)
    else:
        expected = messages.error_reply(payload["class"], payload["desc"], has_id, ident)
    # Byte-exact: what the agent would have written had it been sent the
    # client's id itself.
    assert out == expected


@few
@given(body=reply_bodies, up_id=st.integers(1 << 40, 1 << 52), client=client_ids)
def test_rewrite_id_of_a_reply_in_another_layout(body, up_id, client):
    """A reply not laid out as the writer does (compact separators) takes
    the slow path: still only the id changes."""
    kind, payload = body
    raw = json.dumps({kind: payload, "id": up_id}, separators=(",", ":")).encode()
    client_id = qjson.dumpb(client[0]) if client is not None else None
    out = messages.rewrite_id(raw, str(up_id).encode(), client_id, kind)
    value = parse(out[:-1])
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    # Numbers as the agent's writer prints them (0.0 is "0" there too).
    assert strict(value[kind]) == strict(parse(qjson.dumpb(payload)))
    if client_id is None:
        assert "id" not in value
    else:
        assert strict(value["id"]) == strict(parse(client_id))
