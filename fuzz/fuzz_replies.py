"""Fuzz the path the agent's bytes take: ReplyDecoder framing, then the
router's judgement of each line and messages.rewrite_id.

What must hold for any input: nothing raises; framing does not depend on
how the bytes were split; no line holds a newline or 0xFF; a line that is
a reply and carries the id the proxy sent comes out as exactly one line
carrying the client's id instead, everything else unchanged.

    python fuzz/fuzz_replies.py [libFuzzer options] [corpus dirs]
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from qgaproxy import codec, messages, qjson

UP_ID = 1234567890123
CLIENT_IDS = [None, b"7", b'"__qmp#00001"', b"null", b'{"a": [1, 2.5]}', b"-1"]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    step = fdp.ConsumeIntInRange(1, 64)
    client_id = fdp.PickValueInList(CLIENT_IDS)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())

    whole = codec.ReplyDecoder().feed(stream)
    decoder = codec.ReplyDecoder()
    pieces = []
    for i in range(0, len(stream), step):
        pieces.extend(decoder.feed(stream[i : i + step]))
    assert pieces == whole, (stream, whole, pieces)

    for event in whole:
        if not isinstance(event, codec.Line):
            continue
        raw = event.raw
        assert b"\n" not in raw and b"\xff" not in raw
        # The router's test of a line (Router._on_line).
        try:
            value = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(value, dict) or not ("return" in value or "error" in value):
            continue
        kind = "error" if "error" in value else "return"
        if value.get("id") != UP_ID or type(value.get("id")) is not int:
            continue
        out = messages.rewrite_id(raw, str(UP_ID).encode(), client_id, kind)
        assert out.endswith(b"\n") and out.count(b"\n") == 1, out
        back = json.loads(out)
        if client_id is None:
            assert "id" not in back
        else:
            assert back["id"] == json.loads(client_id)
        value.pop("id")
        back.pop("id", None)
        assert qjson.dumpb(back) == qjson.dumpb(value) or back == value, (raw, out)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
