"""QEMU's JSON dialect: values, the token parser, and the writer.

This module owns the value-level rules that QEMU's own code applies
(qobject/json-parser.c, qobject/json-writer.c, qobject/qdict.c,
util/unicode.c), so that what the proxy accepts, rejects and writes is
byte-for-byte what qemu-ga accepts, rejects and writes:

- single-quoted strings and the extra ``\\'`` escape are accepted;
- strings are modified UTF-8: noncharacters, surrogates and overlong
  sequences are rejected, except ``\\xC0\\x80`` (U+0000);
- integers become int64, else uint64, else a double (as ``strtod``);
- the writer escapes every non-ASCII and control character as
  ``\\uXXXX`` (upper-case hex), prints doubles with ``%.17g``, and
  iterates objects in QDict order (hash bucket, then newest first).

It must never do I/O; the stream framing lives in codec.py.
Values are plain Python: dict (insertion order kept), list, str, int,
float, bool, None.
"""

from __future__ import annotations

import re
from typing import Any

# Token types, as json-lexer.h names them.
LCURLY = "{"
RCURLY = "}"
LSQUARE = "["
RSQUARE = "]"
COLON = ":"
COMMA = ","
INTEGER = "int"
FLOAT = "float"
KEYWORD = "keyword"
STRING = "string"
ERROR = "error"

_INT64_MIN = -(1 << 63)
_UINT64_MAX = (1 << 64) - 1

_QDICT_BUCKET_MAX = 512


class JSONParseError(Exception):
    """A syntax error; str() is the agent's full description."""


# ---------------------------------------------------------------------------
# QDict order

def _tdb_hash(key: str) -> int:
    # QEMU's parser stores U+0000 as the modified UTF-8 pair C0 80, so that
    # is what the QDict hashes (measured: key "p\u0000a" sorts after "q").
    data = key.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, byte in enumerate(data):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % _QDICT_BUCKET_MAX


_bucket_cache: dict[str, int] = {}


def qdict_bucket(key: str) -> int:
    bucket = _bucket_cache.get(key)
    if bucket is None:
        bucket = _tdb_hash(key)
        if len(_bucket_cache) < 4096:
            _bucket_cache[key] = bucket
    return bucket


def qdict_order(keys) -> list[str]:
    """Keys in the order QEMU iterates a QDict built by inserting them in
    the given order: by hash bucket, and newest first within a bucket
    (QLIST_INSERT_HEAD)."""
    keys = tuple(keys)
    order = _order_cache.get(keys)
    if order is None:
        indexed = list(enumerate(keys))
        indexed.sort(key=lambda item: (qdict_bucket(item[1]), -item[0]))
        order = [key for _, key in indexed]
        # The few small key sets seen over and over (bounded in count and
        # size: keys come from clients).
        if len(_order_cache) < 1024 and sum(len(key) for key in keys) <= 256:
            _order_cache[keys] = order
    return list(order)


_order_cache: dict[tuple, list[str]] = {}


# ---------------------------------------------------------------------------
# Modified UTF-8 (util/unicode.c)

def _valid_codepoint(cp: int) -> bool:
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    if 0xD800 <= cp <= 0xDFFF:
        return False
    return True


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def mod_utf8_codepoint(data: bytes, pos: int, n: int = 6) -> tuple[int, int]:
    """Decode one sequence at data[pos:]; return (codepoint or -1, end).

    Bytes past the end of data read as NUL, like the C string would."""
    end_limit = len(data)
    if n == 0 or pos >= end_limit or data[pos] == 0:
        return -1, pos
    byte = data[pos]
    p = pos + 1
    if byte < 0x80:
        return byte, p
    if byte >= 0xFE or (byte & 0x40) == 0:
        return -1, p
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    for i in range(1, length):
        nxt = data[p] if (i < n and p < end_limit) else 0
        if (nxt & 0xC0) != 0x80:
            return -1, p
        p += 1
        cp = (cp << 6) | (nxt & 0x3F)
    if not _valid_codepoint(cp):
        return -1, p
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, p
    return cp, p


_NONCHARACTER = re.compile(
    "[\ufdd0-\ufdef\ufffe\uffff"
    + "".join(
        chr(plane << 16 | 0xFFFE) + chr(plane << 16 | 0xFFFF) for plane in range(1, 17)
    )
    + "]"
)


def sanitize(data: bytes) -> str:
    """Bytes to text the way QEMU's writer sees them: each invalid
    sequence becomes U+FFFD, consuming what mod_utf8_codepoint consumes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        if "\x00" not in text and not _NONCHARACTER.search(text):
            return text
    out = []
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break  # a C string ends here
        cp, pos = mod_utf8_codepoint(data, pos)
        out.append("\ufffd" if cp < 0 else chr(cp))
    return "".join(out)


# ---------------------------------------------------------------------------
# The parser (json-parser.c)

_HEX = frozenset(b"0123456789abcdefABCDEF")


def _cvt4hex(raw: bytes, pos: int) -> int:
    cp = 0
    for i in range(4):
        ch = raw[pos + i] if pos + i < len(raw) else 0
        if ch not in _HEX:
            return -1
        cp = (cp << 4) | int(chr(ch), 16)
    return cp


_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}


def parse_string(raw: bytes) -> str:
    """Decode a string token (with its quotes) or raise JSONParseError."""
    body = raw[1:-1]
    if b"\\" not in body:
        # The common case: no escapes. Strict UTF-8 already rejects
        # surrogates and overlongs; only the noncharacters and QEMU's
        # NUL synonym need a second look.
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            if body.isascii() or not _NONCHARACTER.search(text):
                return text
    return _parse_string_slow(raw)


def _parse_string_slow(raw: bytes) -> str:
    quote = raw[0]
    out: list[str] = []
    ptr = 1
    length = len(raw)
    while ptr < length and raw[ptr] != quote:
        ch = raw[ptr]
        if ch == 0x5C:  # backslash
            beg = ptr
            ptr += 1
            esc = raw[ptr] if ptr < length else 0
            ptr += 1
            simple = _SIMPLE_ESCAPES.get(esc)
            if simple is not None:
                out.append(simple)
                continue
            if esc != ord("u"):
                raise JSONParseError("JSON parse error, invalid escape sequence in string")
            cp = _cvt4hex(raw, ptr)
            ptr += 4
            if (
                0xD800 <= cp <= 0xDBFF
                and raw[ptr : ptr + 1] == b"\\"
                and raw[ptr + 1 : ptr + 2] == b"u"
            ):
                cp = 0x10000 + ((cp & 0x3FF) << 10)
                trailing = _cvt4hex(raw, ptr + 2)
                if 0xDC00 <= trailing <= 0xDFFF:
                    cp |= trailing & 0x3FF
                    ptr += 6
                else:
                    cp = -1
            if not _valid_codepoint(cp):
                # "%.*s" of the C string: stops at its terminating NUL
                shown = raw[beg:ptr]
                raise JSONParseError(
                    "JSON parse error, %s is not a valid Unicode character" % sanitize(shown)
                )
            out.append(chr(cp))
            continue
        cp, end = mod_utf8_codepoint(raw, ptr)
        if cp < 0:
            raise JSONParseError("JSON parse error, invalid UTF-8 sequence in string")
        out.append(chr(cp))
        ptr = end
    return "".join(out)


def parse_number(kind: str, raw: bytes) -> int | float:
    # More than 21 characters cannot be an int64 or uint64 (and Python's
    # int() refuses over 4300 digits): strtod() then, as QEMU does.
    if kind == INTEGER and len(raw) <= 21:
        value = int(raw)
        if _INT64_MIN <= value <= _UINT64_MAX:
            return value
    return float(raw)


class _Tokens:
    __slots__ = ("items", "pos")

    def __init__(self, items):
        self.items = items
        self.pos = 0

    def peek(self):
        if self.pos < len(self.items):
            return self.items[self.pos]
        return None

    def pop(self):
        if self.pos < len(self.items):
            tok = self.items[self.pos]
            self.pos += 1
            return tok
        return None


def parse_tokens(tokens: list[tuple[str, bytes]]) -> Any:
    """Parse one value from a complete token list (json_parser_parse).

    Raises JSONParseError with the agent's wording. Iterative, so the
    1024-deep nesting the streamer admits needs no deep Python stack."""
    toks = _Tokens(tokens)
    return _parse_value(toks)


def _premature() -> JSONParseError:
    return JSONParseError("JSON parse error, premature EOI")


def _parse_scalar(tok) -> Any:
    kind, raw = tok
    if kind == STRING:
        return parse_string(raw)
    if kind in (INTEGER, FLOAT):
        return parse_number(kind, raw)
    if kind == KEYWORD:
        if raw == b"true":
            return True
        if raw == b"false":
            return False
        if raw == b"null":
            return None
        # parse_error() formats into a 1024-byte buffer: a long keyword is
        # cut to 1023 bytes of message (measured; keywords are ASCII).
        message = "invalid keyword '%s'" % sanitize(raw)
        raise JSONParseError("JSON parse error, " + message[:1023])
    raise JSONParseError("JSON parse error, expecting value")


def _parse_value(toks: _Tokens) -> Any:
    # Frames: [container, kind, state, pending_key]; kind "obj" or "arr".
    # States mirror the points in parse_object/parse_array where the C
    # code checks the next token.
    stack: list[list] = []
    value: Any = None
    have_value = False

    def start(tok):
        """Begin a value at tok; return (value, True) for a scalar or
        push a frame and return (None, False)."""
        kind = tok[0]
        if kind == LCURLY:
            toks.pop()
            stack.append([{}, "obj", "first", None])
            return None, False
        if kind == LSQUARE:
            toks.pop()
            stack.append([[], "arr", "first", None])
            return None, False
        if kind in (STRING, INTEGER, FLOAT, KEYWORD):
            toks.pop()
            return _parse_scalar(tok), True
        raise JSONParseError("JSON parse error, expecting value")

    tok = toks.peek()
    if tok is None:
        raise _premature()
    value, have_value = start(tok)

    while stack:
        frame = stack[-1]
        container, kind, state, key = frame
        if have_value:
            have_value = False
            if kind == "obj":
                if state == "key":
                    if not isinstance(value, str):
                        raise JSONParseError("JSON parse error, key is not a string in object")
                    colon = toks.pop()
                    if colon is None:
                        raise _premature()
                    if colon[0] != COLON:
                        raise JSONParseError("JSON parse error, missing : in object pair")
                    frame[2] = "value"
                    frame[3] = value
                    nxt = toks.peek()
                    if nxt is None:
                        raise _premature()
                    if nxt[0] not in (LCURLY, LSQUARE, STRING, INTEGER, FLOAT, KEYWORD):
                        # parse_value fails with "expecting value"; parse_pair's
                        # own "Missing value in dict" is suppressed since an
                        # error is already set.
                        raise JSONParseError("JSON parse error, expecting value")
                    value, have_value = start(nxt)
                    continue
                # state == "value": a pair is complete. parse_pair() refuses
                # a key seen before, once its value has parsed (measured:
                # {"execute": "guest-ping", "execute": "guest-info"}).
                if key in container:
                    raise JSONParseError("JSON parse error, duplicate key")
                container[key] = value
                frame[3] = None
                sep = toks.pop()
                if sep is None:
                    raise _premature()
                if sep[0] == RCURLY:
                    stack.pop()
                    value, have_value = container, True
                    continue
                if sep[0] != COMMA:
                    raise JSONParseError("JSON parse error, expected separator in dict")
                frame[2] = "key"
                nxt = toks.peek()
                if nxt is None:
                    raise _premature()
                value, have_value = start(nxt)
                continue
            # array
            container.append(value)
            sep = toks.pop()
            if sep is None:
                raise _premature()
            if sep[0] == RSQUARE:
                stack.pop()
                value, have_value = container, True
                continue
            if sep[0] != COMMA:
                raise JSONParseError("JSON parse error, expected separator in list")
            nxt = toks.peek()
            if nxt is None:
                raise _premature()
            value, have_value = start(nxt)
            continue

        # A container was just opened: look at its first token.
        nxt = toks.peek()
        if nxt is None:
            raise _premature()
        if kind == "obj":
            if nxt[0] == RCURLY:
                toks.pop()
                stack.pop()
                value, have_value = container, True
                continue
            frame[2] = "key"
        else:
            if nxt[0] == RSQUARE:
                toks.pop()
                stack.pop()
                value, have_value = container, True
                continue
            frame[2] = "item"
        value, have_value = start(nxt)

    return value


# ---------------------------------------------------------------------------
# The writer (json-writer.c, compact form as the agent uses it)

_PLAIN = re.compile(r'[^\x20-\x21\x23-\x5b\x5d-\x7e]')
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _escape_char(match: re.Match) -> str:
    ch = match.group()
    simple = _ESCAPES.get(ch)
    if simple is not None:
        return simple
    cp = ord(ch)
    if 0xD800 <= cp <= 0xDFFF:
        cp = 0xFFFD  # cannot come from the parser; QEMU would sanitize it
    if cp > 0xFFFF:
        return "\\u%04X\\u%04X" % (0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF))
    return "\\u%04X" % cp


def quote(text: str) -> str:
    if _PLAIN.search(text) is None:
        return '"' + text + '"'
    return '"' + _PLAIN.sub(_escape_char, text) + '"'


def dumps(value: Any, qdict_order: bool = True) -> str:
    """Serialize like qobject_to_json().

    qdict_order=True orders object members as QEMU iterates them (what the
    agent writes). qdict_order=False keeps insertion order and writes
    infinities as numbers (1e999): use it for text the agent will parse,
    so that it rebuilds the very same QDict with the same values."""
    out: list[str] = []
    _dump(value, out, qdict_order)
    return "".join(out)


class _Text(str):
    """Output text queued on _dump()'s stack (as opposed to a value)."""

    __slots__ = ()


_SEPARATOR = _Text(", ")
_END_OBJECT = _Text("}")
_END_ARRAY = _Text("]")


def _dump(value: Any, out: list[str], ordered: bool) -> None:
    # Iterative: the parser admits 1024 levels of nesting, deeper than
    # Python's default recursion limit.
    stack = [value]
    push = stack.append
    emit = out.append
    while stack:
        value = stack.pop()
        if type(value) is _Text:
            emit(value)
        elif value is None:
            emit("null")
        elif value is True:
            emit("true")
        elif value is False:
            emit("false")
        elif isinstance(value, str):
            emit(quote(value))
        elif isinstance(value, int):
            emit(str(value))
        elif isinstance(value, float):
            if ordered or value - value == 0.0 or value != value:  # (finite, or NaN, which no literal makes)
                emit("%.17g" % value)  # the agent's own "inf" in what it writes
            else:
                # For the agent to parse: a number past the range of a
                # double, which its strtod reads as the same infinity
                # ("inf" would be a lexical error there).
                emit("1e999" if value > 0 else "-1e999")
        elif isinstance(value, dict):
            if not value:
                emit("{}")
                continue
            keys = qdict_order(value) if ordered else list(value)
            emit("{")
            push(_END_OBJECT)
            for i in range(len(keys) - 1, -1, -1):
                push(value[keys[i]])
                push(_Text(quote(keys[i]) + ": "))
                if i:
                    push(_SEPARATOR)
        elif isinstance(value, (list, tuple)):
            if not value:
                emit("[]")
                continue
            emit("[")
            push(_END_ARRAY)
            for i in range(len(value) - 1, -1, -1):
                push(value[i])
                if i:
                    push(_SEPARATOR)
        else:
            raise TypeError("cannot serialize %r" % type(value).__name__)


def dumpb(value: Any, qdict_order: bool = True) -> bytes:
    """dumps() as bytes (always ASCII: the writer escapes the rest)."""
    return dumps(value, qdict_order).encode("ascii")
