#!/usr/bin/env python3
"""Record exactly what the real qemu-ga answers, byte for byte.

    python tests/wire/capture.py [-o OUT.json] [--only SUBSTR] [--skip-slow]

Starts the real agent (tests/realagent.py: unix-listen, user nobody, dangerous
commands blocked) and, over ONE connection for the whole run (the agent's
parser state is global), does for each case:

  1. resync: write 0xFF + guest-sync-delimited {"id": N}, read and discard up
     to and including the reply b'\\xff{"return": N}\\n';
  2. write the case's input, collect what the agent writes: until the
     expected number of reply lines has arrived and then 50 ms of quiet, or
     until the agent has been quiet for `quiet` seconds (default 0.3 s);
  3. flush: write 0xFF + guest-sync-delimited {"id": M} and record, separately,
     everything that arrives before b'\\xff{"return": M}\\n' (what state the
     case left the parser in).

If the agent exits or stops answering, that is recorded in the case, the agent
is restarted and the run goes on.  A full run takes about 100 s (the 64 MiB and
2M-token cases included; --skip-slow leaves them out) and needs ~1 GB of RAM.  See the "format" member of the output file
for how bytes are stored.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import platform
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/

from realagent import QEMU_GA, RealAgent  # noqa: E402

OUT = HERE / "qga-7.2.json"

FORMAT = {
    "bytes": "Every byte string is stored as a JSON string holding its latin-1 "
    "decoding: one code point U+0000..U+00FF per byte (0xFF is \\u00ff). "
    "Recover the bytes with s.encode('latin-1').",
    "input": "Small inputs are in 'input' (or 'input_parts': written one after another "
    "with a 0.1 s pause so the agent reads them separately). Large inputs are in "
    "'input_gen': a list of segments, each {'text': S} or {'repeat': S, 'count': N}; "
    "the input is the concatenation (S repeated N times for 'repeat'); 'input_len' "
    "and 'input_sha256' check the expansion.",
    "replies": "'replies' = everything the agent wrote after the input and before the "
    "flush, split after each b'\\n' (''.join() gives the exact bytes). Large outputs "
    "are replaced by 'replies_summary': byte and line counts, sha256, the distinct "
    "lines with their counts in first-seen order (at most 50), the distinct line "
    "lengths, and the first/last lines. Summary lines longer than 400 bytes keep their "
    "first 200 and last 100 bytes around a '<<...N bytes omitted...>>' marker.",
    "flush": "'after_flush' = everything received after writing the flush (0xFF + "
    "guest-sync-delimited) and before its reply 'flush_reply', in the same form. The "
    "0xFF alone always produces one stray-0xFF error line; other content shows what "
    "the case left in the parser.",
    "agent": "'agent' is 'alive' after the flush, or describes an exit / hang "
    "(the agent was then restarted: 'restarted': true).",
    "timing": "seconds from the start of the write: 'write_done', 'first_byte', "
    "'replies_done' (end of collection, includes the quiet period), 'flush' "
    "(flush reply received, from the flush write).",
}

SUMMARY_THRESHOLD = 64 * 1024
MIB64 = 64 << 20


def b2s(b: bytes) -> str:
    return b.decode("latin-1")


def sync_cmd(n: int) -> bytes:
    return b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' % n


def sync_reply(n: int) -> bytes:
    return b'\xff{"return": %d}\n' % n


def split_lines(b: bytes) -> list[bytes]:
    """Split after each b"\n" only (bytes.splitlines() would also split on \r)."""
    parts = b.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def excerpt(line: bytes) -> str:
    """A line for a summary: lines over 400 bytes keep their first 200 and
    last 100 bytes around a marker '<<...N bytes omitted...>>'."""
    if len(line) <= 400:
        return b2s(line)
    return b2s(line[:200]) + "<<...%d bytes omitted...>>" % (len(line) - 300) + b2s(line[-100:])


def lines_field(b: bytes, key: str) -> dict:
    if len(b) <= SUMMARY_THRESHOLD:
        return {key: [b2s(x) for x in split_lines(b)]}
    lines = b.split(b"\n")
    partial = lines.pop()  # after the last \n ('' if the output ends with one)
    counts = collections.Counter(lines)
    distinct = []
    seen = set()
    for ln in lines:
        if ln not in seen:
            seen.add(ln)
            distinct.append({"line": excerpt(ln + b"\n"), "count": counts[ln]})
            if len(distinct) >= 50:
                break
    return {
        key + "_summary": {
            "bytes": len(b),
            "lines": len(lines),
            "sha256": hashlib.sha256(b).hexdigest(),
            "distinct_lines": distinct,
            "distinct_count": len(counts),
            "line_lengths": sorted({len(x) + 1 for x in lines})[:20],
            "first_lines": [excerpt(x + b"\n") for x in lines[:3]],
            "last_lines": [excerpt(x + b"\n") for x in lines[-3:]],
            "trailing_partial_line": b2s(partial[:200]),
        }
    }


# ---------------------------------------------------------------------------
# cases


class Case:
    def __init__(self, group, name, data=None, *, expect=None, quiet=0.3,
                 timeout=30.0, flush_timeout=30.0, parts=None, gen=None, note=None,
                 special=None):
        self.group, self.name = group, name
        self.data, self.parts, self.gen = data, parts, gen
        self.expect, self.quiet = expect, quiet
        self.timeout, self.flush_timeout = timeout, flush_timeout
        self.note, self.special = note, special

    def payload(self) -> bytes:
        if self.gen is not None:
            return b"".join(
                s["text"] if "text" in s else s["repeat"] * s["count"] for s in self.gen
            )
        if self.parts is not None:
            return b"".join(self.parts)
        return self.data

    def describe_input(self) -> dict:
        if self.gen is not None:
            p = self.payload()
            return {
                "input_gen": [
                    {"text": b2s(s["text"])} if "text" in s
                    else {"repeat": b2s(s["repeat"]), "count": s["count"]}
                    for s in self.gen
                ],
                "input_len": len(p),
                "input_sha256": hashlib.sha256(p).hexdigest(),
            }
        if self.parts is not None:
            return {"input_parts": [b2s(p) for p in self.parts]}
        return {"input": b2s(self.data)}


def ping(idpart: bytes = b"") -> bytes:
    return b'{"execute": "guest-ping"' + idpart + b"}"


def ping_id(v: bytes) -> bytes:
    return b'{"execute": "guest-ping", "id": ' + v + b"}"


def cases() -> list[Case]:
    C = []

    def add(*a, **k):
        C.append(Case(*a, **k))

    # -- good commands ------------------------------------------------------
    g = "good"
    add(g, "ping_no_id", ping() + b"\n", expect=1)
    for name, v in [
        ("int", b"1"), ("zero", b"0"), ("negative", b"-5"),
        ("string", b'"abc"'), ("string_empty", b'""'), ("null", b"null"),
        ("true", b"true"), ("false", b"false"),
        ("float", b"1.5"), ("float_0_1", b"0.1"), ("float_1_0", b"1.0"),
        ("float_exp_1e5", b"1e5"), ("float_exp_1E+2", b"1E+2"),
        ("float_2_5e-8", b"2.5e-8"), ("float_neg_zero", b"-0.0"), ("int_neg_zero", b"-0"),
        ("int64_max", b"9223372036854775807"), ("int64_min", b"-9223372036854775808"),
        ("2_63", b"9223372036854775808"), ("uint64_max", b"18446744073709551615"),
        ("2_64", b"18446744073709551616"), ("below_int64_min", b"-9223372036854775809"),
        ("huge_int", b"123456789012345678901234567890"),
        ("1e400", b"1e400"), ("neg_1e400", b"-1e400"),
        ("object", b'{"z": 1, "a": 2, "m": 3}'),
        ("object_nested", b'{"k": [1, {"y": null, "b": "c"}], "e": {}}'),
        ("list", b'[1, "two", null, true, 1.5, {}, []]'),
        ("string_escapes", b'"q\\"b\\\\s\\/n\\nt\\tr\\rb\\bf\\f\\u0001\\u001f"'),
        ("string_apostrophe_escape", b'"it\\\'s"'),
        ("string_unicode_raw", b'"\xc3\xa9\xe2\x82\xac\xe4\xb8\xad\xf0\x9f\x98\x80"'),
        ("string_unicode_escaped", b'"\\u00e9\\u20AC\\u4e2d\\ud83d\\ude00"'),
        ("string_del_raw", b'"\x7f"'),
        ("string_single_quoted", b"'sq\"x'"),
        ("string_modified_utf8_nul", b'"a\xc0\x80b"'),
    ]:
        add(g, "ping_id_" + name, ping_id(v) + b"\n", expect=1)
    add(g, "ping_id_first", b'{"id": 1, "execute": "guest-ping"}\n', expect=1)
    add(g, "ping_arguments_empty", b'{"execute": "guest-ping", "arguments": {}}\n', expect=1)
    add(g, "ping_arguments_empty_with_id",
        b'{"arguments": {}, "id": 9, "execute": "guest-ping"}\n', expect=1)
    add(g, "compact_no_newline", b'{"execute":"guest-ping","id":"__qmp#00000"}', expect=1,
        note="qemu.qmp style: compact, no trailing newline")
    add(g, "guest_info", b'{"execute": "guest-info"}\n', expect=1)
    add(g, "guest_info_id", b'{"execute": "guest-info", "id": 2}\n', expect=1)
    add(g, "guest_get_host_name", b'{"execute": "guest-get-host-name"}\n', expect=1,
        note="the host name is the capture machine's")
    add(g, "guest_sync_123", b'{"execute": "guest-sync", "arguments": {"id": 123}}\n', expect=1)
    add(g, "guest_sync_delimited_123",
        b'{"execute": "guest-sync-delimited", "arguments": {"id": 123}}\n', expect=1)
    add(g, "guest_sync_delimited_with_request_id",
        b'{"execute": "guest-sync-delimited", "arguments": {"id": 5}, "id": "x"}\n', expect=1)
    add(g, "libvirt_sync_then_command",
        b'{"execute":"guest-sync","arguments":{"id":1700000000000}}\n'
        b'{"execute":"guest-get-host-name"}\n', expect=2)
    add(g, "proxmox_style", b'{"execute":"guest-sync-delimited","arguments":{"id":4242}}\n'
        b'{"execute":"guest-ping"}\n', expect=2)
    add(g, "two_requests_no_separator", ping_id(b"1") + ping_id(b"2"), expect=2)
    for name, sep in [("newline", b"\n"), ("crlf", b"\r\n"), ("cr", b"\r"),
                      ("spaces", b"   "), ("tabs", b"\t\t"), ("mixed_ws", b" \r\n\t \n")]:
        add(g, "two_requests_sep_" + name, ping_id(b"1") + sep + ping_id(b"2") + sep, expect=2)
    add(g, "leading_whitespace", b"\n\r\n \t " + ping_id(b"1") + b"\n", expect=1)
    add(g, "inner_whitespace", b'{ \r\n"execute"\t:\n"guest-ping" ,\r\n"id"\n:\t7\r\n}', expect=1)
    add(g, "empty_lines_only", b"\n\r\n\n", note="whitespace alone: nothing")
    add(g, "pipelined_5", b"".join(ping_id(b"%d" % i) + b"\n" for i in range(1, 6)), expect=5)
    add(g, "split_3_parts", parts=[b'{"exe', b'cute": "guest-', b'ping", "id": 42}\n'], expect=1)
    add(g, "split_inside_escape", parts=[b'{"execute": "guest-ping", "id": "\\u00', b'e9"}'],
        expect=1)
    add(g, "split_inside_number", parts=[b'{"execute": "guest-ping", "id": 12', b'34}'],
        expect=1)
    add(g, "split_inside_utf8", parts=[b'{"execute": "guest-ping", "id": "\xc3', b'\xa9"}'],
        expect=1)
    add(g, "split_bytewise", parts=[bytes([c]) for c in ping_id(b"3")], expect=1)

    # -- blocked / unknown / argument errors ---------------------------------
    g = "dispatch"
    add(g, "blocked_exec_no_id",
        b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}}\n', expect=1)
    add(g, "blocked_exec_with_id",
        b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}, "id": 5}\n', expect=1)
    add(g, "blocked_shutdown_with_id", b'{"execute": "guest-shutdown", "id": 6}\n', expect=1)
    add(g, "disabled_unsupported_get_devices", b'{"execute": "guest-get-devices"}\n', expect=1,
        note="guest-get-devices is not in the block list: qemu-ga disables it itself on Linux")
    add(g, "unknown_no_id", b'{"execute": "guest-nope"}\n', expect=1)
    add(g, "unknown_with_id", b'{"execute": "guest-nope", "id": "u1"}\n', expect=1)
    add(g, "unknown_empty_name", b'{"execute": ""}\n', expect=1)
    add(g, "unknown_uppercase", b'{"execute": "GUEST-PING"}\n', expect=1)
    add(g, "unknown_qmp_capabilities", b'{"execute": "qmp_capabilities"}\n', expect=1)
    add(g, "ping_arguments_x", b'{"execute": "guest-ping", "arguments": {"x": 1}}\n', expect=1)
    add(g, "ping_arguments_x_id",
        b'{"execute": "guest-ping", "arguments": {"x": 1}, "id": 8}\n', expect=1)
    add(g, "ping_arguments_two_extra",
        b'{"execute": "guest-ping", "arguments": {"x": 1, "y": 2}}\n', expect=1)
    add(g, "ping_arguments_null", b'{"execute": "guest-ping", "arguments": null}\n', expect=1)
    add(g, "sync_missing_id", b'{"execute": "guest-sync", "arguments": {}}\n', expect=1)
    add(g, "sync_no_arguments", b'{"execute": "guest-sync"}\n', expect=1)
    add(g, "sync_no_arguments_with_id", b'{"execute": "guest-sync", "id": 3}\n', expect=1)
    for name, v in [("string", b'"abc"'), ("float_1_5", b"1.5"), ("float_2_0", b"2.0"),
                    ("int64_max", b"9223372036854775807"),
                    ("int64_min", b"-9223372036854775808"),
                    ("2_63", b"9223372036854775808"), ("2_64", b"18446744073709551616"),
                    ("minus_1", b"-1"), ("true", b"true"), ("null", b"null"),
                    ("object", b"{}")]:
        add(g, "sync_id_" + name,
            b'{"execute": "guest-sync", "arguments": {"id": ' + v + b"}}\n", expect=1)
    add(g, "sync_extra_param",
        b'{"execute": "guest-sync", "arguments": {"id": 1, "x": 2}}\n', expect=1)
    add(g, "sync_delimited_minus_1",
        b'{"execute": "guest-sync-delimited", "arguments": {"id": -1}}\n', expect=1)
    add(g, "sync_delimited_2_64",
        b'{"execute": "guest-sync-delimited", "arguments": {"id": 18446744073709551616}}\n',
        expect=1)
    add(g, "sync_delimited_string_id",
        b'{"execute": "guest-sync-delimited", "arguments": {"id": "x"}}\n', expect=1)
    add(g, "sync_delimited_missing_id",
        b'{"execute": "guest-sync-delimited", "arguments": {}}\n', expect=1)
    add(g, "file_open_nonascii_path",
        b'{"execute": "guest-file-open", "arguments": '
        b'{"path": "/nonexistent-qga/\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80"}}\n', expect=1)
    add(g, "file_open_control_chars_path",
        b'{"execute": "guest-file-open", "arguments": '
        b'{"path": "/nonexistent-qga/q\\"b\\\\t\\tn\\n\\u0001\\u007f/"}}\n', expect=1)
    add(g, "file_read_bad_handle",
        b'{"execute": "guest-file-read", "arguments": {"handle": 999999}, "id": 1}\n', expect=1)

    # -- objects that parse but are not valid requests -------------------------
    g = "bad_object"
    for name, v in [
        ("array_empty", b"[]"), ("string", b'"str"'), ("int", b"123"), ("null", b"null"),
        ("true", b"true"), ("object_empty", b"{}"), ("only_id", b'{"id": 1}'),
        ("execute_int", b'{"execute": 1}'), ("execute_int_id", b'{"execute": 1, "id": 2}'),
        ("execute_null", b'{"execute": null}'),
        ("arguments_int", b'{"execute": "guest-ping", "arguments": 1}'),
        ("arguments_list", b'{"execute": "guest-ping", "arguments": []}'),
        ("arguments_list_id", b'{"execute": "guest-ping", "arguments": [], "id": 4}'),
        ("arguments_only", b'{"arguments": {}}'),
        ("extra_member", b'{"execute": "guest-ping", "foo": 1}'),
        ("extra_member_id", b'{"execute": "guest-ping", "foo": 1, "id": 7}'),
        ("two_unknown_members", b'{"foo": 1, "bar": 2}'),
        ("two_unknown_members_reversed", b'{"bar": 2, "foo": 1}'),
        ("extra_and_missing_execute", b'{"foo": 1, "id": 1}'),
        ("exec_oob_and_execute", b'{"execute": "guest-ping", "exec-oob": "guest-ping"}'),
        ("exec_oob_only", b'{"exec-oob": "guest-ping"}'),
        ("exec_oob_only_id", b'{"exec-oob": "guest-ping", "id": 11}'),
        ("control_member", b'{"execute": "guest-ping", "control": {}}'),
        ("duplicate_execute", b'{"execute": "guest-ping", "execute": "guest-info"}'),
        ("duplicate_execute_same", b'{"execute": "guest-ping", "execute": "guest-ping"}'),
        ("duplicate_id", b'{"execute": "guest-ping", "id": 1, "id": 2}'),
        ("many_problems_id",
         b'{"execute": 5, "arguments": [], "foo": 1, "id": "p"}'),
    ]:
        add(g, name, v + b"\n", expect=1)

    # -- JSON syntax errors -----------------------------------------------------
    g = "bad_json"
    for name, v in [
        ("rcurly", b"}"), ("rsquare", b"]"), ("colon", b":"), ("comma", b","),
        ("key_without_value", b'{"execute"}'), ("missing_value", b'{"execute": }'),
        ("trailing_comma", b'{"execute": "guest-ping",}'), ("comma_only_object", b"{,}"),
        ("array_trailing_comma", b"[1,]"), ("missing_comma", b'{"execute": "guest-ping" "id": 1}'),
        ("missing_colon", b'{"execute" "guest-ping"}'), ("number_key", b'{1: 2}'),
        ("keyword_abc", b"abc"), ("keyword_tru", b"tru"), ("keyword_nul", b"nul"),
        ("keyword_True", b"True"), ("keyword_inf", b"inf"), ("keyword_NaN", b"NaN"),
        ("keyword_in_object", b'{"execute": "guest-ping", "id": tru}'),
        ("single_quotes", b"{'execute': 'guest-ping'}"),
        ("single_quotes_id", b"{'execute': 'guest-ping', 'id': 'it\\'s'}"),
        ("escape_u_in_command", b'{"execute": "guest-\\u0070ing"}'),
        ("escape_solidus", b'{"execute": "guest-ping", "id": "a\\/b"}'),
        ("escape_invalid_x", b'{"execute": "guest-ping", "id": "\\x"}'),
        ("escape_invalid_a", b'{"execute": "guest-ping", "id": "\\a"}'),
        ("escape_u_short", b'{"execute": "guest-ping", "id": "\\u12"}'),
        ("escape_u_nonhex", b'{"execute": "guest-ping", "id": "\\uZZZZ"}'),
        ("escape_u_0000", b'{"execute": "guest-ping", "id": "a\\u0000b"}'),
        ("escape_lone_high_surrogate", b'{"execute": "guest-ping", "id": "\\ud800"}'),
        ("escape_lone_low_surrogate", b'{"execute": "guest-ping", "id": "\\udc00"}'),
        ("escape_u_fffe", b'{"execute": "guest-ping", "id": "\\ufffe"}'),
        ("ctrl_0x01_in_string", b'{"execute": "guest-ping", "id": "a\x01b"}'),
        ("tab_in_string", b'{"execute": "guest-ping", "id": "a\tb"}'),
        ("newline_in_string", b'{"execute": "guest-ping", "id": "a\nb"}'),
        ("nul_in_string", b'{"execute": "guest-ping", "id": "ab\x00cd"}'),
        ("nul_alone", b"\x00"),
        ("nul_between_requests", ping_id(b"1") + b"\x00" + ping_id(b"2")),
        ("formfeed_between_requests", ping_id(b"1") + b"\x0c" + ping_id(b"2")),
        ("vtab_between_requests", ping_id(b"1") + b"\x0b" + ping_id(b"2")),
        ("num_01", ping_id(b"01")), ("num_1dot", ping_id(b"1.")),
        ("num_minus", ping_id(b"-")), ("num_dot5", ping_id(b".5")),
        ("num_plus1", ping_id(b"+1")), ("num_hex", ping_id(b"0x10")),
        ("num_1e", ping_id(b"1e")), ("num_1e5", ping_id(b"1e5")), ("num_1E+2", ping_id(b"1E+2")),
        ("num_minus_dot", ping_id(b"-.5")),
        ("num_top_level_01", b"01"),
        ("interp_d", b"%d"), ("interp_s", b"%s"), ("interp_percent", b"%"),
        ("interp_in_object", ping_id(b"%d")),
        ("interp_in_string", ping_id(b'"100%"')),
        ("uppercase_garbage_then_request", b"XYZ" + ping_id(b"1")),
        ("keyword_garbage_then_request", b"abc" + ping_id(b"1")),
        ("string_then_request", b'"s"' + ping_id(b"1")),
        ("extra_rcurly", ping_id(b"1") + b"}"),
        ("extra_rsquare", ping_id(b"1") + b"]"),
        ("comment_block", b"/* c */" + ping_id(b"1")),
        ("comment_line", b"// c\n" + ping_id(b"1")),
        ("utf8_bom", b"\xef\xbb\xbf" + ping_id(b"1")),
        ("partial_then_request", b'{"execute": "guest-ping", ' + ping_id(b"2")),
        ("stray_inside_object_then_close", ping_id(b"01") + b"\n" + ping_id(b"2")),
    ]:
        add(g, name, v + b"\n", note=None)
    add(g, "incomplete_request_newline", b'{"execute": "guest-ping"\n',
        note="incomplete: nothing comes back until the flush")
    add(g, "incomplete_string", b'{"execute": "guest-pi',
        note="cut inside a string: the flush's stray error shows the half-read token")
    add(g, "incomplete_number", b'{"execute": "guest-ping", "id": 12',
        note="cut inside a number: the 0xFF ends the number token first")
    add(g, "incomplete_keyword", b'{"execute": "guest-ping", "id": tr',
        note="cut inside a keyword")
    add(g, "incomplete_escape", b'{"execute": "guest-ping", "id": "\\',
        note="cut right after a backslash inside a string")

    # -- encoding ------------------------------------------------------------------
    g = "encoding"
    for name, v in [
        ("c3_28", b"\xc3\x28"), ("surrogate_ed_a0_80", b"\xed\xa0\x80"),
        ("overlong_c0_af", b"\xc0\xaf"), ("overlong_e0_80_af", b"\xe0\x80\xaf"),
        ("modified_utf8_nul_c0_80", b"\xc0\x80"),
        ("fe", b"\xfe"), ("lone_c3_at_end", b"\xc3"), ("lone_continuation_80", b"\x80"),
        ("above_10ffff_f4_90", b"\xf4\x90\x80\x80"), ("f5", b"\xf5\x80\x80\x80"),
        ("nonchar_ef_bf_bf", b"\xef\xbf\xbf"),
        ("latin1_e9", b"caf\xe9"),
    ]:
        add(g, "in_string_" + name, ping_id(b'"' + v + b'"') + b"\n")
    add(g, "outside_string_c3_a9_then_request", b"\xc3\xa9" + ping_id(b"1") + b"\n")
    add(g, "outside_string_after_value", b'{"execute": "guest-ping", "id": 1\xc3\xa9}\n')
    add(g, "outside_string_80", b"\x80" + ping_id(b"1") + b"\n")
    add(g, "non_ascii_key", b'{"execute": "guest-ping", "\xc3\xa9": 1}\n')
    add(g, "non_ascii_command", b'{"execute": "guest-p\xc3\xaeng"}\n')

    # -- 0xFF / 0xFE -------------------------------------------------------------
    g = "sentinel"
    add(g, "ff_alone", b"\xff")
    add(g, "ff_twice", b"\xff\xff")
    add(g, "ff_ff_newline", b"\xff\xff\n")
    add(g, "fe_alone", b"\xfe")
    add(g, "ff_before_request", b"\xff" + ping_id(b"1") + b"\n")
    add(g, "ff_in_string", b'{"execute": "guest-\xffping", "id": 1}\n')
    add(g, "ff_after_partial_string", b'{"execute": "gue\xff')
    add(g, "ff_after_partial_string_then_request",
        b'{"execute": "gue\xff' + ping_id(b"1") + b"\n")
    add(g, "ff_between_tokens", b'{"execute": \xff "guest-ping", "id": 1}\n')
    add(g, "ff_after_key", b'{"execute"\xff')
    add(g, "ff_in_number", b'{"execute": "guest-ping", "id": 12\xff34}\n')
    add(g, "ff_in_keyword", b'{"execute": "guest-ping", "id": tr\xffue}\n')
    add(g, "ff_after_complete_request", ping_id(b"1") + b"\xff")
    add(g, "ff_ff_in_string", b'{"execute": "gu\xff\xffest-ping"}\n')
    add(g, "ff_after_1MiB_string",
        gen=[{"text": b'{"execute": "guest-file-write", "arguments": {"handle": 1, "buf-b64": "'},
             {"repeat": b"QUFB", "count": 1 << 18}, {"text": b"\xff"}], quiet=1.0,
        note="0xFF cutting a 1 MiB string: the stray error echoes the whole token")

    # -- long tokens / error-text truncation ----------------------------------
    g = "long_tokens"
    add(g, "garbage_uppercase_100k_then_request",
        gen=[{"repeat": b"X", "count": 100_000}, {"text": ping_id(b"1") + b"\n"}], quiet=1.0,
        note="one stray error, then the recovery state skips up to the '{'")
    add(g, "keyword_5000_chars", gen=[{"repeat": b"a", "count": 5000}, {"text": b"\n"}],
        quiet=1.0, note="parse_error() formats into a 1024-byte buffer")
    add(g, "keyword_5000_chars_in_object",
        gen=[{"text": b'{"execute": "guest-ping", "id": '}, {"repeat": b"t", "count": 5000},
             {"text": b"}\n"}], quiet=1.0)
    add(g, "ping_id_5000_digits",
        gen=[{"text": b'{"execute": "guest-ping", "id": '}, {"repeat": b"9", "count": 5000},
             {"text": b"}\n"}], expect=1)
    add(g, "ping_id_string_100k",
        gen=[{"text": b'{"execute": "guest-ping", "id": "'}, {"repeat": b"i", "count": 100_000},
             {"text": b'"}\n'}], expect=1, note="a 100 kB id is echoed in full")
    add(g, "unknown_command_5000_chars",
        gen=[{"text": b'{"execute": "'}, {"repeat": b"c", "count": 5000}, {"text": b'"}\n'}],
        expect=1, note="error_setg() is not limited to 1024 bytes")

    # -- limits --------------------------------------------------------------
    g = "limits"
    P = b'{"execute":"guest-ping","arguments":{"a":'

    def nest_args(k):
        return [{"text": P}, {"repeat": b"[", "count": k}, {"repeat": b"]", "count": k},
                {"text": b"}}\n"}]

    add(g, "nesting_args_total_depth_1024", gen=nest_args(1022), quiet=1.0,
        note="2 braces + 1022 brackets = depth 1024 (the maximum)")
    add(g, "nesting_args_total_depth_1025", gen=nest_args(1023), quiet=1.0,
        note="2 braces + 1023 brackets = depth 1025")
    add(g, "nesting_args_1024_brackets", gen=nest_args(1024), quiet=1.0,
        note="1024 '[' inside arguments: total depth 1026")
    add(g, "nesting_args_1025_brackets", gen=nest_args(1025), quiet=1.0)
    add(g, "nesting_plain_1024",
        gen=[{"repeat": b"[", "count": 1024}, {"repeat": b"]", "count": 1024},
             {"text": b"\n"}], quiet=1.0)
    add(g, "nesting_plain_1025",
        gen=[{"repeat": b"[", "count": 1025}, {"repeat": b"]", "count": 1025},
             {"text": b"\n"}], quiet=1.0)
    add(g, "nesting_plain_1025_unclosed", gen=[{"repeat": b"[", "count": 1025}], quiet=1.0,
        note="only the opening brackets: what is left for the flush?")
    add(g, "nesting_curly_1025",
        gen=[{"repeat": b'{"a":', "count": 1025}, {"text": b"1"},
             {"repeat": b"}", "count": 1025}, {"text": b"\n"}], quiet=1.0)

    # Token size: the streamer fails when sum(token lengths) + 1 > 64 MiB.
    # Compact JSON has no whitespace, so its token bytes = its length.
    S = b'{"execute":"guest-ping","arguments":{"pad":"'
    E = b'"}}'

    def sized(total):
        return [{"text": S}, {"repeat": b"A", "count": total - len(S) - len(E)},
                {"text": E}]

    big = dict(quiet=3.0, timeout=600.0, flush_timeout=600.0)
    add(g, "size_64MiB_minus_1", gen=sized(MIB64 - 1), expect=1, **big,
        note="request of 2^26-1 bytes, no whitespace: the largest accepted")
    add(g, "size_64MiB", gen=sized(MIB64), expect=1, **big,
        note="request of exactly 2^26 bytes, no whitespace")
    add(g, "size_64MiB_plus_newline", gen=sized(MIB64 - 1) + [{"text": b"\n"}], expect=1,
        **big, note="2^26-1 token bytes + a newline: whitespace is not counted")
    add(g, "string_token_exactly_64MiB",
        gen=[{"text": b'{"execute":"guest-ping","arguments":{"pad":"'},
             {"repeat": b"A", "count": MIB64 - 2}, {"text": b'"}}\n'}], **big,
        note="one string token of 2^26 bytes including its quotes")
    add(g, "string_content_exactly_64MiB",
        gen=[{"text": b'{"execute":"guest-ping","arguments":{"pad":"'},
             {"repeat": b"A", "count": MIB64}, {"text": b'"}}\n'}], **big,
        note="string of 2^26 characters (token 2^26+2 bytes): the lexer cuts it")

    # Token count: the streamer fails at token number 2^21 + 1.
    TP = b'{"execute":"guest-ping","arguments":{"a":['
    # TP is 11 tokens; n zeros "0,0,...,0" are 2n-1 tokens; "]}}" is 3 tokens
    # (total 2n+13, always odd) and ']," b":[]}}' is 8 (total 2n+18).
    n_exact = (2**21 - 18) // 2  # 1048567 -> 2n+18 = 2^21
    add(g, "tokens_2M_minus_1",
        gen=[{"text": TP}, {"text": b"0"}, {"repeat": b",0", "count": 1048569 - 1},
             {"text": b"]}}\n"}], quiet=3.0, timeout=300.0, flush_timeout=300.0,
        note="2n+13 tokens with n=1048569 zeros: 2097151 = 2^21-1 tokens")
    add(g, "tokens_2M_exactly",
        gen=[{"text": TP}, {"text": b"0"}, {"repeat": b",0", "count": n_exact - 1},
             {"text": b'],"b":[]}}\n'}], quiet=3.0, timeout=300.0, flush_timeout=300.0,
        note="11 + (2n-1) + 8 tokens with n=1048567: 2097152 = 2^21 tokens")
    add(g, "tokens_2M_plus_1",
        gen=[{"text": TP}, {"text": b"0"}, {"repeat": b",0", "count": 1048570 - 1},
             {"text": b"]}}\n"}], quiet=3.0, timeout=300.0, flush_timeout=300.0,
        note="2n+13 tokens with n=1048570 zeros: 2097153 = 2^21+1 tokens")
    add(g, "tokens_array_2100000_zeros",
        gen=[{"text": b"[0"}, {"repeat": b",0", "count": 2_100_000 - 1}, {"text": b"]\n"}],
        quiet=5.0, timeout=600.0, flush_timeout=600.0,
        note="plain array of 2,100,000 zeros = 4,200,001 tokens")

    # -- connection lifecycle (special handling) --------------------------------
    add("lifecycle", "close_with_unread_reply", ping_id(b"1") + b"\n",
        special="close_unread",
        note="second connection: send a ping, close without reading the reply")
    add("lifecycle", "close_with_partial_request", b'{"execute": "guest-pi',
        special="close_partial",
        note="a client leaves half a request; the next client's first request")
    return C


# ---------------------------------------------------------------------------
# runner


class AgentGone(Exception):
    pass


class Runner:
    def __init__(self, verbose_agent=False):
        self.verbose_agent = verbose_agent
        self.agent = None
        self.sock = None
        self.rx = bytearray()
        self.sync_id = 1_000_000
        self.restarts = 0

    # -- agent / connection ------------------------------------------------
    def start(self):
        self.agent = RealAgent(verbose=self.verbose_agent)
        self.agent.start()
        self.connect()

    def connect(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.agent.path))
        self.sock.setblocking(False)
        self.rx = bytearray()
        self.resync(timeout=10)

    def restart(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.agent.stop()
        self.restarts += 1
        self.start()

    def log_size(self):
        try:
            return self.agent.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, pos):
        try:
            with open(self.agent.log_path, "rb") as f:
                f.seek(pos)
                return f.read(20000)
        except OSError:
            return b""

    # -- I/O ---------------------------------------------------------------
    def pump(self, data: bytes, *, expect=None, quiet=None, marker=None, timeout=30.0):
        """Write data while reading.  Stop (after all data is written) when
        `marker` is in rx, or `expect` lines arrived and 50 ms passed quietly,
        or nothing arrived for `quiet` s.  Returns timing dict."""
        view = memoryview(data)
        off = 0
        t0 = time.monotonic()
        last_rx = None
        first_rx = None
        write_done = t0 if not data else None
        nl = self.rx.count(b"\n")
        scan = 0
        while True:
            now = time.monotonic()
            if write_done is not None:
                if marker is not None:
                    i = self.rx.find(marker, max(0, scan - len(marker)))
                    if i >= 0:
                        break
                    scan = len(self.rx)
                ref = max(write_done, last_rx or write_done)
                if expect is not None and nl >= expect and now - ref >= 0.05:
                    break
                if quiet is not None and now - ref >= quiet:
                    break
            if now - t0 > timeout:
                raise TimeoutError
            waits = [t0 + timeout - now]
            if write_done is not None:
                ref = max(write_done, last_rx or write_done)
                if quiet is not None:
                    waits.append(ref + quiet - now)
                if expect is not None and nl >= expect:
                    waits.append(ref + 0.05 - now)
            wait = max(0.0, min(waits))
            wl = [self.sock] if off < len(data) else []
            try:
                r, w, _ = select.select([self.sock], wl, [], wait)
            except ValueError:
                raise AgentGone("socket closed")
            if r:
                try:
                    chunk = self.sock.recv(1 << 20)
                except (ConnectionResetError, BrokenPipeError) as e:
                    raise AgentGone(repr(e))
                if not chunk:
                    raise AgentGone("EOF")
                self.rx += chunk
                nl += chunk.count(b"\n")
                last_rx = time.monotonic()
                if first_rx is None:
                    first_rx = last_rx - t0
            if w:
                try:
                    off += self.sock.send(view[off:off + (1 << 20)])
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError) as e:
                    raise AgentGone(repr(e))
                if off == len(data):
                    write_done = time.monotonic()
        return {
            "write_done": None if write_done is None else round(write_done - t0, 4),
            "first_byte": None if first_rx is None else round(first_rx, 4),
            "replies_done": round(time.monotonic() - t0, 4),
        }

    def take(self, n=None) -> bytes:
        n = len(self.rx) if n is None else n
        out = bytes(self.rx[:n])
        del self.rx[:n]
        return out

    def sync(self, timeout=30.0):
        """0xFF + guest-sync-delimited; returns (bytes before the reply, reply, secs)."""
        self.sync_id += 1
        sid = self.sync_id
        mark = sync_reply(sid)
        t = self.pump(sync_cmd(sid), marker=mark, timeout=timeout)
        i = self.rx.find(mark)
        before = self.take(i)
        reply = self.take(len(mark))
        return before, reply, t["replies_done"]

    STRAY_FF = b'{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\uFFFD\'"}}\n'

    def resync(self, timeout=30.0):
        self.take()
        before, _, _ = self.sync(timeout)
        return before

    # -- one case ----------------------------------------------------------
    def run_case(self, case: Case) -> dict:
        rec = {"group": case.group, "name": case.name}
        if case.note:
            rec["note"] = case.note
        rec.update(case.describe_input())
        try:
            extra = self.resync()
            if extra != self.STRAY_FF:
                rec["resync_unexpected"] = b2s(extra)
        except (AgentGone, TimeoutError) as e:
            rec["resync_failed"] = repr(e)
            self.restart()
        if case.special:
            return getattr(self, "special_" + case.special)(case, rec)
        logpos = self.log_size()
        payload = case.payload()
        timing = {}
        try:
            if case.parts is not None:
                t0 = time.monotonic()
                for p in case.parts[:-1]:
                    self.pump(p, quiet=0.1, timeout=case.timeout)
                t = self.pump(case.parts[-1], expect=case.expect, quiet=case.quiet,
                              timeout=case.timeout)
                timing = {"replies_done": round(time.monotonic() - t0, 4)}
            else:
                expect = case.expect
                timing = self.pump(payload, expect=expect, quiet=case.quiet,
                                   timeout=case.timeout)
            rec.update(lines_field(self.take(), "replies"))
            before, reply, fsecs = self.sync(timeout=case.flush_timeout)
            timing["flush"] = round(fsecs, 4)
            rec.update(lines_field(before, "after_flush"))
            rec["flush_reply"] = b2s(reply)
            rec["agent"] = "alive" if self.agent.alive() else "exited?"
        except (AgentGone, TimeoutError) as e:
            rec.update(lines_field(self.take(), "received_before_failure"))
            rec["failure"] = "agent closed the connection" if isinstance(e, AgentGone) \
                else "timeout"
            rec["failure_detail"] = repr(e)
            try:
                rc = self.agent.proc.wait(5)
                rec["agent"] = {"exited": True, "returncode": rc}
            except subprocess.TimeoutExpired:
                rec["agent"] = {"exited": False, "hung_or_busy": True}
            rec["restarted"] = True
            self.restart()
        rec["timing"] = timing
        log = self.log_since(logpos)
        if log:
            rec["agent_log"] = b2s(log).splitlines()[:40]
        return rec

    # -- special cases -------------------------------------------------------
    def special_close_unread(self, case, rec):
        """Second connection (queued behind ours): we must leave first."""
        self.sock.close()
        self.sock = None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.agent.path))
        s.sendall(case.payload())
        time.sleep(0.3)  # let the agent answer into the socket buffer
        s.close()
        try:
            rc = self.agent.proc.wait(3)
            rec["agent"] = {"exited": True, "returncode": rc}
        except subprocess.TimeoutExpired:
            rec["agent"] = "alive"
        rec["log_tail"] = self.agent.read_log().splitlines()[-5:]
        if self.agent.alive():
            self.connect()
        else:
            rec["restarted"] = True
            self.restart()
        return rec

    def special_close_partial(self, case, rec):
        """Client 1 leaves half a request; client 2 sends a plain ping."""
        self.sock.close()
        self.sock = None
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.agent.path))
        s.sendall(case.payload())
        s.close()
        s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s2.connect(str(self.agent.path))
        s2.settimeout(2.0)
        nxt = ping_id(b"77") + b"\n"
        s2.sendall(nxt)
        got = b""
        try:
            while not got.endswith(b"\n"):
                chunk = s2.recv(65536)
                if not chunk:
                    break
                got += chunk
            # maybe more lines: short quiet period
            s2.settimeout(0.3)
            while True:
                chunk = s2.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (TimeoutError, socket.timeout):
            pass
        rec["next_client_input"] = b2s(nxt)
        rec["next_client_received"] = [b2s(x) for x in split_lines(got)]
        self.sock = s2
        self.sock.setblocking(False)
        self.rx = bytearray()
        before, reply, _ = self.sync()
        rec.update(lines_field(before, "after_flush"))
        rec["flush_reply"] = b2s(reply)
        rec["agent"] = "alive" if self.agent.alive() else "exited?"
        return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", default=str(OUT))
    ap.add_argument("--only", action="append", help="run cases whose name contains this")
    ap.add_argument("--skip-slow", action="store_true", help="skip the 64 MiB / 2M-token cases")
    ap.add_argument("--verbose-agent", action="store_true", help="run qemu-ga with -v")
    args = ap.parse_args()

    all_cases = cases()
    names = [c.name for c in all_cases]
    assert len(names) == len(set(names)), "duplicate case names"
    todo = all_cases
    if args.only:
        todo = [c for c in todo if any(s in c.name for s in args.only)]
    if args.skip_slow:
        todo = [c for c in todo if not c.name.startswith(("size_", "string_token", "string_content", "tokens_"))]

    t_start = time.monotonic()
    r = Runner(verbose_agent=args.verbose_agent)
    r.start()
    version = subprocess.run([QEMU_GA, "-V"], capture_output=True, text=True).stdout.strip()
    header = {
        "format": FORMAT,
        "agent_version": version,
        "agent_argv": [a.replace(str(r.agent.tmpdir), "$TMPDIR") for a in r.agent.argv],
        "blocked_commands": r.agent.blocked,
        "captured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "kernel": platform.release()},
        "method": "one connection; per case: resync (0xFF + guest-sync-delimited), "
        "input, collect (expected lines + 50 ms quiet, or quiet period), flush "
        "(0xFF + guest-sync-delimited) recorded separately",
        "stray_ff_line": b2s(Runner.STRAY_FF),
    }
    results = []
    for case in todo:
        t0 = time.monotonic()
        rec = r.run_case(case)
        rec["elapsed_s"] = round(time.monotonic() - t0, 3)
        results.append(rec)
        brief = rec.get("replies") or rec.get("replies_summary", {}).get("lines")
        print(f"{time.monotonic() - t_start:8.1f}s {case.name:45s} {rec['elapsed_s']:7.2f}s "
              f"{str(brief)[:110]}", flush=True)
    r.sock and r.sock.close()
    r.agent.stop()
    header["restarts"] = r.restarts
    header["duration_s"] = round(time.monotonic() - t_start, 1)
    out = dict(header, cases=results)
    if args.only or args.skip_slow:
        out["partial_run"] = {"only": args.only, "skip_slow": args.skip_slow}
    Path(args.output).write_text(json.dumps(out, indent=1, ensure_ascii=True) + "\n")
    print(f"wrote {args.output}: {len(results)} cases in {header['duration_s']} s, "
          f"{r.restarts} agent restarts")


if __name__ == "__main__":
    main()
