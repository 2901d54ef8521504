"""Stream codecs for the guest-agent wire, with no I/O.

Two decoders, because the two directions are different animals:

``RequestDecoder`` reads what a *client* writes, exactly as qemu-ga's own
JSON streamer would (qobject/json-lexer.c and json-streamer.c): a stream
of JSON values with or without whitespace between them, QEMU's
extensions (single quotes), its error recovery (after a lexical error,
skip to the next structural character, control character or 0xFE/0xFF),
and its limits (64 MiB of tokens per message, 2M tokens, nesting 1024).
Each call to ``feed`` returns events in stream order: ``Value``,
``ParseError`` (the agent's exact text), or ``Flush`` (the client sent
0xFF: its partial input is gone and, unlike the agent, we answer nothing).

``ReplyDecoder`` reads what the *agent* writes: replies that always end
in ``\\n`` (the writer never emits a raw newline), possibly preceded by
the 0xFF sentinel of guest-sync-delimited, possibly with garbage or half
a reply left over from before a restart. It only frames; the router
decides what a line means. Framing by newline lets the proxy pass a
48 MiB reply on without re-serializing it.

Neither decoder may block, buffer without bound, or import trio.
"""

from __future__ import annotations

import json
import re

import attrs

from . import qjson
from .qjson import COLON, COMMA, ERROR, FLOAT, INTEGER, KEYWORD, LCURLY, LSQUARE, RCURLY, RSQUARE, STRING

# The agent's parser limits (qobject/json-streamer.c). A message is
# limited by the total size of its tokens, not its bytes on the wire.
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024

SENTINEL = 0xFF

SIZE_LIMIT_DESC = "JSON token size limit exceeded"
COUNT_LIMIT_DESC = "JSON token count limit exceeded"
NESTING_LIMIT_DESC = "JSON nesting depth limit exceeded"


@attrs.define  # one per message: not frozen, which costs 3x to build
class Value:
    """One complete JSON value (not necessarily an object)."""

    value: object
    size: int  # bytes of its tokens


@attrs.frozen
class ParseError:
    """What the agent would answer for bad input (GenericError, no id)."""

    desc: str
    oversize: bool = False  # a size or token-count limit: the stream is beyond repair


@attrs.frozen
class Flush:
    """The client sent 0xFF: everything partial before it is dropped."""


FLUSH = Flush()

# Lexer states (json-lexer.c). Token types are the strings from qjson.
_START = 0
_RECOVERY = 1
_DQ = 2
_DQ_ESC = 3
_SQ = 4
_SQ_ESC = 5
_ZERO = 6
_EXP_DIGITS = 7
_EXP_SIGN = 8
_EXP_E = 9
_MANTISSA = 10
_MANTISSA_DIGITS = 11
_DIGITS = 12
_SIGN = 13
_KEYWORD = 14

_DIGIT = frozenset(b"0123456789")
_LOWER = frozenset(b"abcdefghijklmnopqrstuvwxyz")
_WS = frozenset(b" \t\r\n")
_STRUCT = {ord("{"): LCURLY, ord("}"): RCURLY, ord("["): LSQUARE, ord("]"): RSQUARE, ord(","): COMMA, ord(":"): COLON}
_RECOVERY_STOP = frozenset(
    [b for b in range(0x20) if b != 0x09] + [0xFE, 0xFF] + [ord(c) for c in "[]{}:,"]
)
# Terminal-with-lookahead states: any byte not listed ends the token.
_TERMINAL = {_ZERO: INTEGER, _DIGITS: INTEGER, _MANTISSA_DIGITS: FLOAT, _EXP_DIGITS: FLOAT, _KEYWORD: KEYWORD}

# Runs of ordinary string bytes, skipped in one C-level step.
_DQ_RUN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]+")
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+")
_RECOVERY_RUN = re.compile(rb"[\x09\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]+")
_WS_RUN = re.compile(rb"[ \t\r\n]+")
_SENTINEL_RUN = re.compile(rb"\xff+")
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")
# A whole token in one step, when it is plainly complete: a string, or a
# number/keyword followed by a byte that can only end it. As in the lexer,
# a bare 0 takes no exponent ("0e5" is 0, then a stray or a keyword).
_FAST_TOKEN = re.compile(
    rb'"(?:[\x20\x21\x23-\x5b\x5d-\xfd]|\\[\x20-\xfd])*"'
    rb"|(-?(?:0(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?)?|[1-9][0-9]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?))(?=[ \t\r\n,:\]}])"
    rb"|([a-z]+)(?=[ \t\r\n,:\]}])"
)


# The fast path (see RequestDecoder._feed_plain): chunks of plain ASCII
# JSON objects, the bytes nearly every client sends, go through Python's C
# scanner when its result is provably what the agent's parser would make.
# No backslash, quote or byte outside printable ASCII (and tab, CR, LF):
# no escapes, no single-quoted strings, no 0xFF, no control characters.
_PLAIN_CHUNK = re.compile(rb"[\t\n\r\x20-\x26\x28-\x5b\x5d-\x7e]*")
_PLAIN_CHUNK_MAX = 64 * 1024
# Deep nesting is the lexer's (its limit, and the C scanner recurses).
_PLAIN_CONTAINERS_MAX = 64
# Integers both parsers read the same way (QEMU turns larger ones into
# uint64 or double).
_EXACT_INT = 1 << 53


class _NotPlain(Exception):
    """The fast path declines; the byte-exact lexer takes over."""


def _plain_pairs(pairs):
    value = dict(pairs)
    if len(value) != len(pairs):
        raise _NotPlain  # duplicate key: the lexer reports it
    return value


def _plain_int(text):
    value = int(text)
    if -_EXACT_INT < value < _EXACT_INT:
        return value
    raise _NotPlain


def _not_plain(text):
    raise _NotPlain  # floats (%.17g round trips), NaN, Infinity


_plain_decode = json.JSONDecoder(
    object_pairs_hook=_plain_pairs, parse_int=_plain_int, parse_float=_not_plain, parse_constant=_not_plain
).raw_decode
# Requests that come again byte for byte (a monitor's {"execute":"guest-ping"},
# sent every few seconds by every tool that watches a guest): decoded once.
# Only a read that is one such request with nothing but "execute" is kept,
# so the value shared between them holds nothing that can change; ids make
# requests differ anyway. Bounded in entries and in their size (clients
# choose the bytes); once full it stops growing.
_REPEATS: dict[bytes, tuple[dict, int]] = {}
_REPEATS_MAX = 256
_REPEAT_SIZE_MAX = 256
_WS_SKIP = re.compile(rb"[ \t\r\n]*")
_WS_ANY = re.compile(rb"[ \t\r\n]")
_PLAIN_STRING = re.compile(rb'"[^"]*"')  # a plain chunk has no escapes


def _token_bytes(data: bytes, start: int, end: int) -> int:
    """The size the lexer counts for a plain object: its bytes less the
    whitespace between tokens."""
    if _WS_ANY.search(data, start, end) is None:
        return end - start
    outside = _PLAIN_STRING.sub(b"", data[start:end])
    return end - start - (len(outside) - len(outside.translate(None, b" \t\r\n")))


class RequestDecoder:
    """qemu-ga's JSON message parser, byte-compatible, incremental."""

    def __init__(self, max_size: int = MAX_TOKEN_SIZE, flush_on_sentinel: bool = True):
        # flush_on_sentinel=False makes 0xFF a stray error like any other
        # byte, as the agent itself treats it (the simulated agent uses that).
        self.max_size = max_size
        self.flush_on_sentinel = flush_on_sentinel
        self._state = _START
        self._token = bytearray()
        # streamer state
        self._tokens: list[tuple[str, bytes]] = []
        self._token_size = 0
        self._brace = 0
        self._bracket = 0
        self._events: list = []
        self._flushed = False  # a Flush and no token since (see _process)

    # -- introspection -------------------------------------------------
    def buffered(self) -> int:
        """Bytes held for a message not yet complete."""
        return self._token_size + len(self._token)

    def idle(self) -> bool:
        return self._state == _START and not self._tokens and not self._token

    # -- lexer -----------------------------------------------------------
    def feed(self, data: bytes) -> list:
        if (
            len(data) <= _PLAIN_CHUNK_MAX
            and len(data) < self.max_size
            and self._state == _START
            and not self._tokens
            and not self._token
        ):
            repeat = _REPEATS.get(data) if type(data) is bytes else None  # (a bytearray is not hashable)
            if repeat is not None:
                self._flushed = False
                return [Value(*repeat)]
            if _PLAIN_CHUNK.fullmatch(data) is not None:
                return self._feed_plain(data)
        return self._feed(data, [])

    def _feed_plain(self, data: bytes) -> list:
        """Whole objects at the start of an idle stream, decoded by the C
        scanner; the first thing it declines, and all after it, goes
        through the lexer. Equivalent because every object it accepts is
        one the lexer parses to the same value (plain ASCII strings with no
        escapes, exact integers, no duplicate keys, at most 64 containers in
        the chunk, far below the nesting limit), and the lexer is idle after it."""
        events: list = []
        if data.count(b"{") + data.count(b"[") > _PLAIN_CONTAINERS_MAX:
            return self._feed(data, events)
        text = data.decode("ascii")
        i = 0
        n = len(text)
        while True:
            i = _WS_SKIP.match(data, i).end()
            if i == n:
                if (
                    len(events) == 1
                    and n <= _REPEAT_SIZE_MAX
                    and type(data) is bytes
                    and len(_REPEATS) < _REPEATS_MAX
                    and events[0].value.keys() == {"execute"}
                    and type(events[0].value["execute"]) is str
                ):
                    _REPEATS[data] = (events[0].value, events[0].size)
                return events
            if text[i] != "{":
                break
            try:
                value, end = _plain_decode(text, i)
            except (ValueError, _NotPlain, RecursionError):
                break
            events.append(Value(value, _token_bytes(data, i, end)))
            self._flushed = False
            i = end
        return self._feed(data[i:], events)

    def _feed(self, data: bytes, events: list) -> list:
        self._events = events
        n = len(data)
        i = 0
        token = self._token
        fast = _FAST_TOKEN.match
        ws = _WS_RUN.match
        while i < n:
            state = self._state
            if data[i] == SENTINEL and self.flush_on_sentinel and state in (_START, _RECOVERY):
                # A run of 0xFF is one reset, however long: one Flush for
                # the run instead of one per byte (a flood of them must
                # cost next to nothing).
                i = _SENTINEL_RUN.match(data, i).end()
                self._process(ERROR, b"\xff")
                token.clear()
                self._state = _RECOVERY
                continue
            if state == _START:
                ch = data[i]
                if ch in _WS:
                    m = ws(data, i)
                    i = m.end()
                    continue
                kind = _STRUCT.get(ch)
                if kind is not None:
                    i += 1
                    self._process(kind, data[i - 1 : i])
                    continue
                if not token:
                    m = fast(data, i)
                    if m is not None:
                        end = m.end()
                        if m.lastindex == 1:
                            kind = INTEGER if _INTEGER.fullmatch(m.group(1)) else FLOAT
                        elif m.lastindex == 2:
                            kind = KEYWORD
                        else:
                            kind = STRING
                        if end - i <= self.max_size:
                            self._process(kind, data[i:end])
                            i = end
                            continue
                # slow path: one byte through the state machine
                i = self._step(data, i)
                continue
            if state in (_DQ, _SQ):
                m = (_DQ_RUN if state == _DQ else _SQ_RUN).match(data, i)
                if m is not None:
                    end = m.end()
                    room = self.max_size + 1 - len(token)
                    if end - i > room:
                        end = i + max(room, 0)
                    if end > i:
                        token += data[i:end]
                        i = end
                        if len(token) > self.max_size:
                            self._token_too_big()
                        continue
            elif state == _RECOVERY:
                m = _RECOVERY_RUN.match(data, i)
                if m is not None:
                    i = m.end()
                    continue
            i = self._step(data, i)
        return events

    def _step(self, data: bytes, i: int) -> int:
        """Feed data[i] through the DFA (json_lexer_feed_char)."""
        ch = data[i]
        token = self._token
        while True:
            state = self._state
            nxt, consumed = self._transition(state, ch)
            if consumed:
                token.append(ch)
            if nxt == "start":
                token.clear()
                self._state = _START
            elif nxt == ERROR:
                self._process(ERROR, bytes(token))
                token.clear()
                self._state = _RECOVERY
            elif isinstance(nxt, str):
                self._process(nxt, bytes(token))
                token.clear()
                self._state = _START
            else:
                if nxt == _RECOVERY:
                    token.clear()
                self._state = nxt
            if consumed:
                break
        if len(token) > self.max_size:
            self._token_too_big()
        return i + 1

    @staticmethod
    def _transition(state: int, ch: int):
        """Return (next state or token type or "start", consumed)."""
        if state == _START:
            if ch == 0x22:
                return _DQ, True
            if ch == 0x27:
                return _SQ, True
            if ch == 0x30:
                return _ZERO, True
            if 0x31 <= ch <= 0x39:
                return _DIGITS, True
            if ch == 0x2D:
                return _SIGN, True
            kind = _STRUCT.get(ch)
            if kind is not None:
                return kind, True
            if ch in _LOWER:
                return _KEYWORD, True
            if ch in _WS:
                return "start", True
            return ERROR, True
        if state == _RECOVERY:
            if ch in _RECOVERY_STOP:
                return "start", False
            return _RECOVERY, True
        if state == _DQ or state == _SQ:
            if 0x20 <= ch <= 0xFD:
                if ch == 0x5C:
                    return (_DQ_ESC if state == _DQ else _SQ_ESC), True
                if ch == (0x22 if state == _DQ else 0x27):
                    return STRING, True
                return state, True
            return ERROR, True
        if state == _DQ_ESC or state == _SQ_ESC:
            if 0x20 <= ch <= 0xFD:
                return (_DQ if state == _DQ_ESC else _SQ), True
            return ERROR, True
        if state == _ZERO:
            if ch in _DIGIT:
                return ERROR, True
            if ch == 0x2E:
                return _MANTISSA, True
            return INTEGER, False
        if state == _DIGITS:
            if ch in _DIGIT:
                return _DIGITS, True
            if ch in (0x65, 0x45):
                return _EXP_E, True
            if ch == 0x2E:
                return _MANTISSA, True
            return INTEGER, False
        if state == _MANTISSA:
            if ch in _DIGIT:
                return _MANTISSA_DIGITS, True
            return ERROR, True
        if state == _MANTISSA_DIGITS:
            if ch in _DIGIT:
                return _MANTISSA_DIGITS, True
            if ch in (0x65, 0x45):
                return _EXP_E, True
            return FLOAT, False
        if state == _EXP_E:
            if ch in (0x2D, 0x2B):
                return _EXP_SIGN, True
            if ch in _DIGIT:
                return _EXP_DIGITS, True
            return ERROR, True
        if state == _EXP_SIGN:
            if ch in _DIGIT:
                return _EXP_DIGITS, True
            return ERROR, True
        if state == _EXP_DIGITS:
            if ch in _DIGIT:
                return _EXP_DIGITS, True
            return FLOAT, False
        if state == _SIGN:
            if ch == 0x30:
                return _ZERO, True
            if 0x31 <= ch <= 0x39:
                return _DIGITS, True
            return ERROR, True
        if state == _KEYWORD:
            if ch in _LOWER:
                return _KEYWORD, True
            return KEYWORD, False
        raise AssertionError(state)

    def _token_too_big(self) -> None:
        # json_lexer_feed_char: a token over the limit is handed to the
        # streamer as is (which then fails the size check) and lexing
        # starts over right after it.
        self._process("partial", bytes(self._token))
        self._token.clear()
        self._state = _START

    # -- streamer (json_message_process_token) -----------------------------
    def _process(self, kind: str, text: bytes) -> None:
        if kind != ERROR:
            self._flushed = False
        if kind == LCURLY:
            self._brace += 1
        elif kind == RCURLY:
            self._brace -= 1
        elif kind == LSQUARE:
            self._bracket += 1
        elif kind == RSQUARE:
            self._bracket -= 1
        elif kind == ERROR:
            if self.flush_on_sentinel and text and text[-1] == SENTINEL:
                # One Flush for any number of 0xFF with no token between
                # them, however the bytes arrive.
                if not self._flushed:
                    self._reset()
                    self._events.append(FLUSH)
                    self._flushed = True
                return
            self._flushed = False
            self._emit(ParseError("JSON parse error, stray '%s'" % qjson.sanitize(text)))
            return

        if self._token_size + len(text) + 1 > self.max_size:
            self._emit(ParseError(SIZE_LIMIT_DESC, oversize=True))
            return
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._emit(ParseError(COUNT_LIMIT_DESC, oversize=True))
            return
        if self._bracket + self._brace > MAX_NESTING:
            self._emit(ParseError(NESTING_LIMIT_DESC))
            return

        self._tokens.append((kind, text))
        self._token_size += len(text)

        # json-streamer.c tests bracket_count twice here (a long-standing
        # typo); the agent behaves accordingly, so do we.
        if (self._brace > 0 or self._bracket > 0) and self._bracket >= 0:
            return

        tokens = self._tokens
        size = self._token_size
        try:
            value = qjson.parse_tokens(tokens)
        except qjson.JSONParseError as exc:
            self._emit(ParseError(str(exc)))
        except RecursionError:  # pragma: no cover - parse_tokens is iterative
            self._emit(ParseError(NESTING_LIMIT_DESC))
        else:
            self._emit(Value(value, size))

    def _reset(self) -> None:
        self._brace = 0
        self._bracket = 0
        self._tokens = []
        self._token_size = 0

    def _emit(self, event) -> None:
        self._reset()
        self._events.append(event)


@attrs.define  # one per reply line: not frozen, which costs 3x to build
class Line:
    """One reply line from the agent, without its newline."""

    raw: bytes


@attrs.frozen
class Sentinel:
    """The agent wrote 0xFF: what came before it is stale."""


@attrs.frozen
class Overflow:
    """A line longer than the limit was thrown away."""

    dropped: int


SENTINEL_EVENT = Sentinel()

# The longest reply the agent writes: guest-file-read's 48 MiB become 64 MiB
# of base64 (sized to fit its own 64 MiB parser limit), plus the object
# around it. Anything longer is not a reply.
MAX_REPLY_LINE = (64 << 20) + (1 << 20)


class ReplyDecoder:
    """Frames the agent's output into lines and 0xFF sentinels."""

    def __init__(self, max_line: int = MAX_REPLY_LINE):
        self.max_line = max_line
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf known to hold neither b"\n" nor 0xFF
        self._discarding = 0  # >0 while skipping an overlong line

    def buffered(self) -> int:
        return len(self._buf)

    def one_line(self, data: bytes) -> bytes | None:
        """The line (without its newline) when `data` is exactly one whole
        reply line and nothing is held from before: the usual read, which
        then needs no framing at all. None otherwise (feed() frames it)."""
        if (
            data.find(b"\n") == len(data) - 1
            and not self._buf
            and not self._discarding
            and b"\xff" not in data
            and len(data) <= self.max_line
        ):
            line = data[:-1]
            if line and not line.isspace():
                return line
        return None

    def feed(self, data: bytes) -> list:
        buf = self._buf
        if (
            not buf
            and not self._discarding
            and data[-1:] == b"\n"
            and b"\xff" not in data
            and len(data) <= self.max_line
        ):
            # Whole lines and nothing held from before (the usual read: one
            # reply, or many): no copy through the buffer.
            lines = data.split(b"\n")
            lines.pop()  # (empty: after the last newline)
            return [Line(line) for line in lines if line and not line.isspace()]
        events: list = []
        buf += data
        start = 0
        pos = self._scan
        n = len(buf)
        while pos < n:
            nl = buf.find(b"\n", pos)
            ff = buf.find(b"\xff", pos, nl if nl >= 0 else n)
            if ff >= 0:
                if self._discarding:
                    events.append(Overflow(self._discarding + ff - start))
                    self._discarding = 0
                events.append(SENTINEL_EVENT)
                start = pos = ff + 1
                continue
            if nl < 0:
                break
            if self._discarding:
                events.append(Overflow(self._discarding + nl - start))
                self._discarding = 0
            else:
                with memoryview(buf) as view:  # one copy, even of a 64 MiB line
                    line = view[start:nl].tobytes()
                if line.strip():
                    events.append(Line(line))
            start = pos = nl + 1
        del buf[:start]
        self._scan = len(buf)
        if len(buf) > self.max_line:
            self._discarding += len(buf)
            buf.clear()
            self._scan = 0
        return events

    def reset(self) -> None:
        """Forget any partial line (a new connection)."""
        self._buf.clear()
        self._scan = 0
        self._discarding = 0
