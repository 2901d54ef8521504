"""Fuzz qjson: the agent's JSON dialect, parsed and written.

What must hold for any input: the parser raises nothing but a parse
error; anything it accepts, the writer writes as ASCII that parses back
to the same value and is written again byte for byte (QDict order and
insertion order alike).

    python fuzz/fuzz_qjson.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from qgaproxy import codec, qjson


def _parse(data: bytes):
    events = codec.RequestDecoder().feed(b"[" + data + b"]")
    assert len(events) == 1 and isinstance(events[0], codec.Value), (data, events)
    return events[0].value[0]


def test_one_input(data: bytes) -> None:
    for event in codec.RequestDecoder().feed(data):
        if not isinstance(event, codec.Value):
            continue
        value = event.value
        ordered = qjson.dumpb(value)
        ordered.decode("ascii")
        if b"inf" in ordered or b"nan" in ordered:
            continue  # a number beyond double range: the agent writes inf too
        plain = qjson.dumpb(value, qdict_order=False)
        back = _parse(plain)
        assert qjson.dumpb(back, qdict_order=False) == plain or b"-0" in plain, (value, plain)
        assert qjson.dumpb(back) == ordered or b"-0" in plain, (value, ordered)
        # A second round in QDict order is stable once written in it.
        again = qjson.dumpb(_parse(ordered), qdict_order=False)
        _parse(again)  # (asserts that it parses)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
