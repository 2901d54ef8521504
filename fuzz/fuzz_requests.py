"""Fuzz the path a client's bytes take: RequestDecoder, in pieces, then
messages.check_request and the error and id forms of the reply.

What must hold for any input: nothing raises; a piecewise feed gives what
a whole one gives; every decoded message is either a Request or a
Rejected whose reply is a well-formed agent error; every reply is one
line of ASCII that the agent's own parser reads back.

    python fuzz/fuzz_requests.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from qgaproxy import codec, messages, qjson


def _reply_ok(reply: bytes) -> None:
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
    reply.decode("ascii")
    events = codec.RequestDecoder().feed(reply)
    if b"inf" in reply or b"nan" in reply:
        # An id beyond double range (1e400): the agent itself echoes it as
        # inf, not JSON (tests/wire/FINDINGS.md); the proxy does the same.
        return
    assert len(events) == 1 and isinstance(events[0], codec.Value), (reply, events)
    value = events[0].value
    assert isinstance(value, dict) and ("return" in value or "error" in value), reply


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_size = fdp.PickValueInList([codec.MAX_TOKEN_SIZE, 64, 7])
    step = fdp.ConsumeIntInRange(1, 64)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())

    whole = codec.RequestDecoder(max_size).feed(stream)
    decoder = codec.RequestDecoder(max_size)
    pieces = []
    for i in range(0, len(stream), step):
        pieces.extend(decoder.feed(stream[i : i + step]))
    assert len(pieces) == len(whole), (stream, whole, pieces)
    for a, b in zip(whole, pieces):
        if isinstance(a, codec.Value):
            assert isinstance(b, codec.Value) and a.size == b.size
            assert qjson.dumpb(a.value) == qjson.dumpb(b.value)
        else:
            assert a == b, (a, b)

    for event in whole:
        if isinstance(event, codec.ParseError):
            _reply_ok(messages.error_reply(messages.GENERIC_ERROR, event.desc))
        elif isinstance(event, codec.Value):
            checked = messages.check_request(event.value, event.size)
            if isinstance(checked, messages.Rejected):
                _reply_ok(checked.reply())
                continue
            assert isinstance(checked, messages.Request)
            # What the router does with it: re-serialize for the agent, and
            # answer with the client's id.
            sent = messages.encode_request(checked.execute, checked.arguments, 12345)
            again = codec.RequestDecoder().feed(sent)
            assert len(again) == 1 and isinstance(again[0], codec.Value), sent
            assert messages.check_request(again[0].value).execute == checked.execute
            _reply_ok(messages.return_reply({}, checked.has_id, checked.id))
            _reply_ok(messages.error_reply(messages.GENERIC_ERROR, "x", checked.has_id, checked.id))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
