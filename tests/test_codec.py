"""The stream codecs: whole, byte by byte, 0xFF at every offset, limits."""

from __future__ import annotations

import pytest

from qgaproxy import codec, qjson
from qgaproxy.codec import FLUSH, Line, ParseError, ReplyDecoder, RequestDecoder, Sentinel, Value

MESSAGES = [
    b'{"execute": "guest-ping"}',
    b'{"execute":"guest-sync-delimited","arguments":{"id":1234567890123},"id":"__qmp#00001"}',
    b"{'execute': 'guest-file-write', 'arguments': {'handle': 1, 'buf-b64': 'aGVsbG8='}}",
    b'{"execute": "x", "arguments": {"a": [1, -2.5e3, 0, true, false, null, {"b": "\\u00e9\\ud83d\\ude00"}]}, "id": -0}',
    b'{"execute": "guest-ping", "id": "\xc3\xa9\xf0\x9f\x98\x80"}',
]


def events(decoder, data: bytes, step: int | None = None):
    out = []
    if step is None:
        out.extend(decoder.feed(data))
    else:
        for i in range(0, len(data), step):
            out.extend(decoder.feed(data[i : i + step]))
    return out


def values(evts):
    return [e.value if isinstance(e, Value) else e for e in evts]


@pytest.mark.parametrize("message", MESSAGES)
def test_whole_and_byte_by_byte_give_the_same_value(message):
    whole = values(events(RequestDecoder(), message))
    assert len(whole) == 1 and isinstance(whole[0], dict)
    assert values(events(RequestDecoder(), message, step=1)) == whole
    assert values(events(RequestDecoder(), message, step=7)) == whole


@pytest.mark.parametrize("separator", [b"", b"\n", b"\r\n", b" \t "])
def test_stream_of_messages_with_or_without_separators(separator):
    stream = separator.join(MESSAGES) + separator
    whole = values(events(RequestDecoder(), stream))
    assert len(whole) == len(MESSAGES)
    assert values(events(RequestDecoder(), stream, step=1)) == whole


@pytest.mark.parametrize("message", MESSAGES[:3])
def test_sentinel_at_every_offset_flushes_the_partial_message(message):
    expected = values(events(RequestDecoder(), message))
    for k in range(len(message) + 1):
        data = message[:k] + b"\xff" + message
        for step in (None, 1):
            got = values(events(RequestDecoder(), data, step))
            if k == len(message):
                assert got == expected + [FLUSH] + expected, k
            else:
                assert got == [FLUSH] + expected, (k, got)


def test_a_run_of_sentinels_is_one_flush():
    # A flood of 0xFF used to cost one event (and ~3 us) per byte: 1 MiB of
    # it held the proxy's event loop for seconds. A run is one reset.
    message = MESSAGES[0]
    expected = values(events(RequestDecoder(), message))
    flood = b"\xff" * (1 << 20)
    assert values(events(RequestDecoder(), flood + message)) == [FLUSH] + expected
    # (a run that cuts a token short: the first 0xFF ends the token, the rest is one run)
    got = values(events(RequestDecoder(), message[:7] + flood + message))
    assert got[-1:] == expected and set(got[:-1]) == {FLUSH} and len(got) <= 3, got
    assert values(events(RequestDecoder(), message + flood)) == expected + [FLUSH]
    # across reads too: one Flush however the run is split
    got = values(events(RequestDecoder(), flood + message, step=64 << 10))
    assert got == [FLUSH] + expected
    assert values(events(RequestDecoder(), b"\xff" * 100 + message, step=1)) == [FLUSH] + expected
    # runs separated by partial requests: one Flush each
    got = values(events(RequestDecoder(), (b"\xff" * 1000 + message[:9]) * 5 + b"\xff" + message))
    assert got[-1:] == expected and set(got[:-1]) == {FLUSH} and len(got) <= 12, got


def test_sentinel_for_the_agent_is_a_stray_error():
    # flush_on_sentinel=False is the agent's own behaviour (simulated agent)
    got = events(RequestDecoder(flush_on_sentinel=False), b'{"execute": "gue\xff')
    assert got == [ParseError("JSON parse error, stray '\"gue\ufffd'")]


@pytest.mark.parametrize(
    "data, desc",
    [
        (b"}", "JSON parse error, expecting value"),
        (b"abc ", "JSON parse error, invalid keyword 'abc'"),
        (b'{"execute"}', "JSON parse error, missing : in object pair"),
        (b'{"execute": }', "JSON parse error, expecting value"),
        (b'{"execute": "x",}', "JSON parse error, expecting value"),
        (b'{"a" "b"}', "JSON parse error, missing : in object pair"),
        (b'{"a": 1 "b": 2}', "JSON parse error, expected separator in dict"),
        (b"[1 2]", "JSON parse error, expected separator in list"),
        (b'{1: 2}', "JSON parse error, key is not a string in object"),
        (b'{"a": "\\x"}', "JSON parse error, invalid escape sequence in string"),
        (b'{"a": "\\uD800"}', "JSON parse error, \\uD800 is not a valid Unicode character"),
        (b'{"a": "\\uFFFF"}', "JSON parse error, \\uFFFF is not a valid Unicode character"),
        (b'{"a": "\xc3\x28"}', "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"a": "\xed\xa0\x80"}', "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"a": "\xc0\xaf"}', "JSON parse error, invalid UTF-8 sequence in string"),
        (b"\xc3\x28 ", "JSON parse error, stray '\ufffd'"),
        (b"%d ", "JSON parse error, stray '%'"),
    ],
)
def test_parse_errors_have_the_agents_text(data, desc):
    got = events(RequestDecoder(), data)
    assert got[0] == ParseError(desc)


def test_modified_utf8_nul_is_accepted():
    (event,) = events(RequestDecoder(), b'{"a": "x\xc0\x80y"}')
    assert event.value == {"a": "x\x00y"}


def test_numbers_follow_qemu():
    (event,) = events(RequestDecoder(), b"[9223372036854775807, 18446744073709551615, 18446744073709551616, -9223372036854775809, 1e2]")
    assert event.value == [9223372036854775807, 18446744073709551615, 1.8446744073709552e19, -9.223372036854776e18, 100.0]
    assert [type(v) for v in event.value] == [int, int, float, float, float]


def test_size_limit_at_and_over():
    limit = 1000
    body = b'{"execute": "x", "arguments": {"s": "'
    tail = b'"}}'
    # tokens: { "execute" : "x" , "arguments" : { "s" : STRING } } -> sizes add up
    fixed = len(b'{"execute":"x","arguments":{"s":') + len(b"}}") + 2  # the quotes of STRING
    at = b"a" * (limit - 1 - fixed)
    ok = events(RequestDecoder(limit), body + at + tail)
    assert isinstance(ok[0], Value)
    over = events(RequestDecoder(limit), body + at + b"a" + tail)
    assert over[0] == ParseError(codec.SIZE_LIMIT_DESC, oversize=True)


def test_one_token_over_the_limit_byte_by_byte():
    got = events(RequestDecoder(100), b'"' + b"a" * 200, step=1)
    assert got[0] == ParseError(codec.SIZE_LIMIT_DESC, oversize=True)


def test_the_agents_64_mib_limit():
    dec = RequestDecoder()
    chunk = b"A" * (1 << 20)
    got = dec.feed(b'{"execute": "guest-file-write", "arguments": {"handle": 1, "buf-b64": "')
    for _ in range(63):
        got += dec.feed(chunk)
    assert got == []
    assert dec.buffered() > 63 << 20
    got += dec.feed(chunk)
    assert got[0] == ParseError(codec.SIZE_LIMIT_DESC, oversize=True)


def test_nesting_limit():
    ok = events(RequestDecoder(), b"[" * 1024 + b"]" * 1024)
    assert isinstance(ok[0], Value)
    deep = events(RequestDecoder(), b"[" * 1025 + b"]" * 1025)
    assert deep[0] == ParseError(codec.NESTING_LIMIT_DESC)


def test_decoder_recovers_after_errors_like_the_agent():
    got = values(events(RequestDecoder(), b'}{"execute": "a"} xyz {"execute": "b"}'))
    assert got[0] == ParseError("JSON parse error, expecting value")
    assert got[1] == {"execute": "a"}
    assert got[-1] == {"execute": "b"}


# -- replies from the agent --------------------------------------------------

REPLIES = [
    b'{"return": {}, "id": 1}',
    b'{"id": "x", "error": {"class": "GenericError", "desc": "a\\nb"}}',
    b'{"return": {"version": "7.2.22", "supported_commands": []}}',
]


def test_reply_lines_whole_and_byte_by_byte():
    stream = b"".join(r + b"\n" for r in REPLIES)
    for step in (None, 1, 5):
        got = events(ReplyDecoder(), stream, step)
        assert got == [Line(r) for r in REPLIES]


def test_one_whole_reply_line_is_what_feed_would_frame():
    """one_line() takes a read that is exactly one reply line with nothing
    held; everything else (more lines, part of one, 0xFF, blank, something
    held from before, an overlong line being skipped) is left to feed()."""
    cases = [r + b"\n" for r in REPLIES] + [
        b"\n", b" \t\n", b"a\nb\n", b'{"return": 1}', b"\xff\n", b'{"return": 1}\n\n', b"\n" + REPLIES[0] + b"\n",
    ]
    for data in cases:
        for held in (b"", b'{"ret'):
            one = ReplyDecoder()
            one.feed(held)
            line = one.one_line(data)
            framed = ReplyDecoder()
            framed.feed(held)
            want = framed.feed(data)
            if line is not None:
                assert not held and want == [Line(line)], data
                assert one.feed(b"x\n") == framed.feed(b"x\n")  # one_line() held nothing back
            else:
                assert held or data.count(b"\n") != 1 or not data.endswith(b"\n") or not data.strip() or b"\xff" in data
    skipping = ReplyDecoder(max_line=8)
    skipping.feed(b"0123456789")  # over the limit: skipped up to its newline
    assert skipping.one_line(b"x\n") is None and skipping.feed(b"x\n") == [codec.Overflow(11)]


def test_garbage_before_the_sentinel_is_dropped():
    for garbage in (b"", b"junk", b'{"return": {"half', b"\n\n  \n", b'{"return": 1}'):
        stream = garbage + b'\xff{"return": 5}\n' + REPLIES[0] + b"\n"
        for step in (None, 1):
            got = events(ReplyDecoder(), stream, step)
            tail = got[got.index(codec.SENTINEL_EVENT) :]
            assert tail == [codec.SENTINEL_EVENT, Line(b'{"return": 5}'), Line(REPLIES[0])], garbage


def test_sentinel_at_every_offset_of_a_reply():
    reply = REPLIES[1]
    for k in range(len(reply) + 1):
        stream = reply[:k] + b"\xff" + reply + b"\n"
        got = events(ReplyDecoder(), stream, 1)
        assert got == [codec.SENTINEL_EVENT, Line(reply)], k


def test_overlong_reply_line_is_dropped_and_counted():
    dec = ReplyDecoder(max_line=100)
    got = dec.feed(b"x" * 150)
    got += dec.feed(b"y" * 10 + b"\n" + REPLIES[0] + b"\n")
    assert got == [codec.Overflow(160), Line(REPLIES[0])]
    assert dec.buffered() == 0


# -- the writer -------------------------------------------------------------------


def test_writer_matches_qemu():
    assert qjson.dumps({"return": {}, "id": 1}) == '{"return": {}, "id": 1}'
    assert qjson.dumps({"error": {"class": "C", "desc": "D"}, "id": 1}) == '{"id": 1, "error": {"class": "C", "desc": "D"}}'
    assert qjson.dumps("é😀\x7f\x01/\"\\\n") == '"\\u00E9\\uD83D\\uDE00\\u007F\\u0001/\\"\\\\\\n"'
    assert qjson.dumps([0.1, 1.5, 1e300, -0.0]) == "[0.10000000000000001, 1.5, 1.0000000000000001e+300, -0]"
    assert qjson.dumps({"supported_commands": [], "version": "v"}) == '{"version": "v", "supported_commands": []}'
    assert qjson.dumps({"name": "n", "success-response": True, "enabled": True}) == (
        '{"enabled": true, "name": "n", "success-response": true}'
    )


def test_parse_then_write_round_trips_for_the_agent():
    # what the proxy re-serializes for the agent parses back to the same value
    for message in MESSAGES:
        (event,) = events(RequestDecoder(), message)
        again = qjson.dumpb(event.value, qdict_order=False)
        (event2,) = events(RequestDecoder(), again)
        assert event2.value == event.value
        assert list(event2.value) == list(event.value)


def test_token_count_limit_at_and_over():
    # 2^21 tokens are accepted, one more is refused (json-streamer.c)
    def array(tokens):  # "[" + n zeros + commas + "]" = 2n + 1 tokens
        n = (tokens - 1) // 2
        return b"[" + b"0," * (n - 1) + b"0]"

    ok = events(RequestDecoder(), array(codec.MAX_TOKEN_COUNT - 1))
    assert isinstance(ok[0], Value) and len(ok[0].value) == (codec.MAX_TOKEN_COUNT - 2) // 2
    over = events(RequestDecoder(), array(codec.MAX_TOKEN_COUNT + 1))
    assert over[0] == ParseError(codec.COUNT_LIMIT_DESC, oversize=True)


# -- the plain fast path ---------------------------------------------------------
# RequestDecoder.feed() hands plain ASCII chunks to Python's C scanner; its
# events must be exactly the lexer's, for every chunk it could see.

def _random_plain_value(rng, depth=0):
    choice = rng.randrange(9 if depth < 4 else 5)
    if choice == 0:
        return rng.choice(["true", "false", "null"])
    if choice == 1:
        return str(rng.choice([0, -0, 1, -1, 42, 2**53 - 1, 2**53, -(2**53), 2**63, 2**64 + 1, 10**30]))
    if choice == 2:
        return rng.choice(["1.5", "-0.0", "1e3", "1E-2", "0.1", "01", "-", "1.", ".5", "NaN", "Infinity"])
    if choice in (3, 4):
        return '"%s"' % "".join(rng.choice("ab c{}[]:,0é") for _ in range(rng.randrange(6)))
    if choice in (5, 6):
        keys = [rng.choice(["execute", "arguments", "id", "a", "b", ""]) for _ in range(rng.randrange(4))]
        return "{" + ", ".join('"%s": %s' % (k, _random_plain_value(rng, depth + 1)) for k in keys) + "}"
    return "[" + ",".join(_random_plain_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"


def _chunk(rng):
    parts = []
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(10)
        if kind < 6:
            parts.append('{"execute": "guest-ping"%s}' % (', "id": %s' % _random_plain_value(rng) if rng.random() < 0.7 else ""))
        elif kind < 8:
            parts.append(_random_plain_value(rng))
        else:
            parts.append(rng.choice(["}", "]", ":", "{", '{"a":', "tru", "x", "'s'", '"\\u0041"', "\t", "\x01"]))
        parts.append(rng.choice(["", "\n", " ", "\r\n", "  \t"]))
    text = "".join(parts)
    if rng.random() < 0.2:
        text = text[: rng.randrange(len(text) + 1)]  # a chunk cut anywhere
    return text.encode("utf-8")


def test_plain_fast_path_gives_the_lexers_events():
    import random

    rng = random.Random(20261122)
    taken = 0
    for _ in range(4000):
        data = _chunk(rng)
        fast = RequestDecoder()
        slow = RequestDecoder()
        got = fast.feed(data)
        want = slow._feed(data, [])
        assert got == want, data
        if codec._PLAIN_CHUNK.fullmatch(data):
            taken += 1
        # and the state left behind is the same: the next chunk agrees too
        tail = b'{"execute": "guest-info"}\n'
        assert fast.feed(tail) == slow._feed(tail, []), data
        assert fast.buffered() == slow.buffered()
    assert taken > 1000  # the fast path was exercised, not just declined


def test_plain_fast_path_declines_what_it_cannot_prove():
    # Each of these goes to the lexer, which gives the agent's own result.
    for data in [
        b'{"execute": "x", "execute": "y"}\n',  # duplicate key
        b'{"execute": "x", "id": 18446744073709551616}\n',  # beyond uint64: a double
        b'{"execute": "x", "id": 1.5}\n',  # %.17g
        b'{"execute": "x", "id": NaN}\n',
        b'{"execute": "\\u0041"}\n',  # an escape
        b"{'execute': 'x'}\n",  # single quotes
        b"[" * 100 + b"]" * 100,  # deep
    ]:
        assert RequestDecoder().feed(data) == RequestDecoder()._feed(data, []), data


def test_a_repeated_request_is_decoded_once(monkeypatch):
    """A read that is one request with only "execute", sent again (a monitor's
    ping), gives the lexer's events from a value decoded once; with an id or
    arguments, or arriving in the middle of a message, it is decoded anew.
    What is kept is bounded."""
    monkeypatch.setattr(codec, "_REPEATS", {})
    ping = b'{"execute":"guest-ping"}\n'
    first = RequestDecoder().feed(ping)
    again = RequestDecoder().feed(ping)
    assert again == first == RequestDecoder()._feed(ping, [])
    assert again[0].value is first[0].value
    assert RequestDecoder().feed(bytearray(ping)) == first  # (not hashable: decoded anew)
    for data in (b'{"execute":"guest-ping","id":1}\n', b'{"execute":"guest-ping","arguments":{}}\n'):
        assert RequestDecoder().feed(data)[0].value is not RequestDecoder().feed(data)[0].value
    fast, slow = RequestDecoder(), RequestDecoder()
    for data in (b'{"execute": "x", "arguments": ', ping, b"}\n", ping):
        assert fast.feed(data) == slow._feed(data, []), data
    for i in range(codec._REPEATS_MAX + 10):
        RequestDecoder().feed(b'{"execute":"guest-%d"}\n' % i)
    assert len(codec._REPEATS) == codec._REPEATS_MAX
    assert RequestDecoder().feed(b'{"execute":"guest-300"}\n')[0].value == {"execute": "guest-300"}


@pytest.mark.parametrize("step", [None, 1])
def test_a_bare_zero_takes_no_exponent_however_the_bytes_arrive(step):
    # Measured against qemu-ga 7.2: its lexer has no exponent after a bare 0,
    # so "0E+2" is 0 then a stray 'E', and "0e5" is 0 then a keyword. Found
    # by fuzzing: a whole read once took both as the double 0.0.
    data = (
        b'{"execute": "guest-ping", "id": 0E+2}\n'
        b'{"execute": "guest-ping", "id": 0e5}\n'
        b'{"execute": "guest-ping", "id": 1}\n'
        b'{"execute": "guest-ping", "id": 0.5e1}\n'
    )
    assert values(events(RequestDecoder(), data, step)) == [
        ParseError("JSON parse error, stray 'E'"),
        ParseError("JSON parse error, expecting value"),
        ParseError("JSON parse error, expected separator in dict"),
        {"execute": "guest-ping", "id": 1},
        {"execute": "guest-ping", "id": 5.0},
    ]


def test_flush_events_do_not_depend_on_how_a_run_is_split():
    # Found by fuzz_requests: whole, a run of 0xFF after a partial object was
    # one Flush; in 1-byte pieces it was one per piece.
    import base64

    stream = base64.b64decode(
        "e6Ll////////////////////////////////////////////////////////////////////////////////////////"
        "////////////////////////eGVjdXRlInsiZXhlY3U6ICJndWVzdGUi"
    )
    whole = RequestDecoder().feed(stream)
    for step in (1, 2, 3, 7, 64):
        assert events(RequestDecoder(), stream, step) == whole, step
