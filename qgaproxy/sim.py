"""An embedded, simulated qemu-ga 7.2, byte-compatible on the wire.

Used by ``qgaproxy serve --upstream sim`` (a quick start without a VM) and by
the proxy's fault-injection tests. ``python -m qgaproxy.sim --listen PATH``
runs it standalone.

What the simulator owns:

- the agent's process state, which outlives host connections exactly as the
  real agent's does: its JSON parser (half a request left by one client
  corrupts the next client's first request), file handles (integers from 1000
  up, global), guest-exec processes, the frozen state and the per-command
  enabled/disabled table;
- the agent's answers: every reply is ``qjson.dumpb(reply) + b"\\n"`` (QDict
  member order), ``guest-sync-delimited`` prefixes its reply with 0xFF, bad
  input gets the agent's own id-less parse errors (0xFF included: it is just
  a stray byte to the agent), and the dispatcher and the QAPI input visitor
  are reproduced with the texts measured against the real 7.2 agent;
- fault knobs (``SimConfig``) that make it misbehave the ways a real channel
  does, and counters (``received``, ``replies_sent``, ``dropped``, ...) that
  tests assert on.

What it must never do: touch the host (no real files, processes or threads:
the guest file system and processes are in memory; all waiting is in trio
time so tests can run it under a MockClock, and the wall clock is read once,
for guest-get-time, unless SimConfig.epoch_ns is set), answer anything out of
order or concurrently (the real agent is one thread: a slow or hung command
blocks every request behind it), or invent wire behaviour. Every error text
was measured against qemu-ga 7.2.22 (tests/test_sim.py compares the two byte
for byte), except the few that only a root agent could show, taken from
QEMU's source and marked so; the answers that describe the machine (host
name, interfaces, file systems...) are made up but shaped like the real ones.
"""

from __future__ import annotations

import argparse
import base64
import os
import posixpath
import re
import signal
import stat
import sys
import time
from typing import Any, Callable

import attrs
import trio

from . import messages, qjson
from .codec import ParseError, RequestDecoder, Value

VERSION = "7.2.22"

# ---------------------------------------------------------------------------
# The command table, as qemu-ga 7.2.22 (Debian) lists it in guest-info: the
# order (newest registration first), the success-response flags, and each
# command's arguments from qga/qapi-schema.json. A leading "*" marks an
# optional member. Types: "int", "uint64", "str", "bool", "whence" (the
# GuestFileWhence alternate), [T] (a list), or a tuple of members (a struct).

_VCPU = (("logical-id", "int"), ("online", "bool"), ("*can-offline", "bool"))
_MEMBLK = (("phys-index", "uint64"), ("online", "bool"), ("*can-offline", "bool"))

COMMANDS: tuple[tuple[str, bool, tuple], ...] = (
    ("guest-get-cpustats", True, ()),
    ("guest-get-diskstats", True, ()),
    ("guest-ssh-remove-authorized-keys", True, (("username", "str"), ("keys", ["str"]))),
    ("guest-ssh-add-authorized-keys", True, (("username", "str"), ("keys", ["str"]), ("*reset", "bool"))),
    ("guest-ssh-get-authorized-keys", True, (("username", "str"),)),
    ("guest-get-devices", True, ()),
    ("guest-get-osinfo", True, ()),
    ("guest-get-timezone", True, ()),
    ("guest-get-users", True, ()),
    ("guest-get-host-name", True, ()),
    ("guest-exec", True, (("path", "str"), ("*arg", ["str"]), ("*env", ["str"]),
                          ("*input-data", "str"), ("*capture-output", "bool"))),
    ("guest-exec-status", True, (("pid", "int"),)),
    ("guest-get-memory-block-info", True, ()),
    ("guest-set-memory-blocks", True, (("mem-blks", [_MEMBLK]),)),
    ("guest-get-memory-blocks", True, ()),
    ("guest-set-user-password", True, (("username", "str"), ("password", "str"), ("crypted", "bool"))),
    ("guest-get-fsinfo", True, ()),
    ("guest-get-disks", True, ()),
    ("guest-set-vcpus", True, (("vcpus", [_VCPU]),)),
    ("guest-get-vcpus", True, ()),
    ("guest-network-get-interfaces", True, ()),
    ("guest-suspend-hybrid", False, ()),
    ("guest-suspend-ram", False, ()),
    ("guest-suspend-disk", False, ()),
    ("guest-fstrim", True, (("*minimum", "int"),)),
    ("guest-fsfreeze-thaw", True, ()),
    ("guest-fsfreeze-freeze-list", True, (("*mountpoints", ["str"]),)),
    ("guest-fsfreeze-freeze", True, ()),
    ("guest-fsfreeze-status", True, ()),
    ("guest-file-flush", True, (("handle", "int"),)),
    ("guest-file-seek", True, (("handle", "int"), ("offset", "int"), ("whence", "whence"))),
    ("guest-file-write", True, (("handle", "int"), ("buf-b64", "str"), ("*count", "int"))),
    ("guest-file-read", True, (("handle", "int"), ("*count", "int"))),
    ("guest-file-close", True, (("handle", "int"),)),
    ("guest-file-open", True, (("path", "str"), ("*mode", "str"))),
    ("guest-shutdown", False, (("*mode", "str"),)),
    ("guest-info", True, ()),
    ("guest-set-time", True, (("*time", "int"),)),
    ("guest-get-time", True, ()),
    ("guest-ping", True, ()),
    ("guest-sync", True, (("id", "int"),)),
    ("guest-sync-delimited", True, (("id", "int"),)),
)
_ARGS = {name: args for name, _, args in COMMANDS}

# qemu-ga 7.2 on Linux always disables the commands it cannot support there
# (ga_command_init_blockedrpcs): guest-info lists them enabled false.
ALWAYS_BLOCKED = frozenset({"guest-get-devices"})

# qga/main.c ga_freeze_allowlist: all that still runs while frozen (from the
# source: freezing needs root; what a freeze does to the others is measured).
FREEZE_ALLOWED = frozenset(
    {"guest-ping", "guest-info", "guest-sync", "guest-sync-delimited",
     "guest-fsfreeze-status", "guest-fsfreeze-thaw"}
)
FROZEN_REASON = "the agent is in frozen state"

QGA_READ_COUNT_DEFAULT = 4096
GUEST_FILE_READ_COUNT_MAX = 48 << 20
GUEST_EXEC_MAX_OUTPUT = 16 << 20
FIRST_HANDLE = 1000  # QGA_PSTATE_DEFAULT_FD_COUNTER

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1

# Half a reply, for SimConfig.on_connect: what a client sees when the agent
# (or the previous client's leftovers) is cut off mid-write.
HALF_REPLY = b'{"return": {"count": 5, "buf-b64": "aGVs'

# Where a message can end (see SimAgent._feed), and how much of one the
# received-bytes record keeps.
_CUT = re.compile(rb"[}\]\xff]")
_PENDING_MAX = (64 << 20) + 4096
_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}\[\]]', re.S)


def _container_start(text: bytes) -> int:
    """Where the last top-level object or array in text begins."""
    depth = start = 0
    for m in _BRACKETS.finditer(text):
        c = text[m.start()]
        if c in b"{[":
            if depth == 0:
                start = m.start()
            depth += 1
        elif c in b"}]":
            depth = max(depth - 1, 0)
    return start


class _CmdError(Exception):
    """A command failed: the agent replies {"error": {"class", "desc"}}."""

    def __init__(self, desc: str, error_class: str = messages.GENERIC_ERROR):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class _Close(Exception):
    """A fault (or goodbye) ends the current connection."""


# ---------------------------------------------------------------------------
# The QAPI input visitor (qapi/qobject-input-visitor.c) and its error texts.
#
# Which unexpected member is reported depends on where it sits in a GLib
# GHashTable (g_str_hash keys, GLib 2.74 probing and in-place resize): the
# visitor puts every member in one, removes each one it visits, and names the
# first left over. Measured against the real agent on random key sets of 1 to
# 64 members: the model below picked the same member every time.

_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191,
              16381, 32749, 65521, 131071, 262139, 524287, 1048573, 2097143)


def _c_key(key: str) -> bytes:
    # QEMU strings are modified UTF-8: U+0000 is stored as C0 80.
    return key.encode("utf-8", "surrogatepass").replace(b"\x00", b"\xc0\x80")


def _g_str_hash(key: bytes) -> int:
    h = 5381
    for b in key:
        h = (h * 33 + (b - 256 if b >= 0x80 else b)) & 0xFFFFFFFF  # signed char
    return h


class _GHashSet:
    """The slots of a GHashTable of string keys: enough to know which key
    g_hash_table_iter_next() returns first."""

    def __init__(self):
        self._set_shift(3)
        self.hashes = [0] * self.size  # 0 unused, 1 tombstone, else the hash
        self.keys: list = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, h: int) -> int:
        return ((h * 11) & 0xFFFFFFFF) % self.mod

    def _lookup(self, key: bytes) -> tuple[int, int]:
        h = max(_g_str_hash(key), 2)
        i = self._index(h)
        step = 0
        tomb = None
        while self.hashes[i] != 0:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h
            if self.hashes[i] == 1 and tomb is None:
                tomb = i
            step += 1
            i = (i + step) & self.mask
        return (i if tomb is None else tomb), h

    def insert(self, key: bytes) -> None:
        i, h = self._lookup(key)
        if self.hashes[i] >= 2:
            return
        was_unused = self.hashes[i] == 0
        self.hashes[i] = h
        self.keys[i] = key
        self.nnodes += 1
        if was_unused:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: bytes) -> None:
        i, _ = self._lookup(key)
        if self.hashes[i] < 2:
            return
        self.hashes[i] = 1
        self.keys[i] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 8) or self.size <= self.noccupied + self.noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        old = self.size
        n = int(self.nnodes * 1.333)
        shift = 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, 3))
        if self.size > old:
            self.hashes += [0] * (self.size - old)
            self.keys += [None] * (self.size - old)
        moved = [False] * max(old, self.size)
        for i in range(old):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = 0
                continue
            if moved[i]:
                continue
            self.hashes[i] = 0
            key, self.keys[i] = self.keys[i], None
            while True:  # resize_map(): place, evicting what sits there
                j = self._index(node_hash)
                step = 0
                while moved[j]:
                    step += 1
                    j = (j + step) & self.mask
                moved[j] = True
                replaced = self.hashes[j]
                self.hashes[j] = node_hash
                if replaced < 2:
                    self.keys[j] = key
                    break
                node_hash = replaced
                key, self.keys[j] = self.keys[j], key
        del self.hashes[self.size:]
        del self.keys[self.size:]
        self.noccupied = self.nnodes

    def first(self) -> bytes | None:
        for i in range(self.size):
            if self.hashes[i] >= 2:
                return self.keys[i]
        return None


def _visit_struct(members: tuple, value: Any, name: str | None) -> dict:
    """Visit a QDict against struct members; name is the full name of the
    struct (None at the top level)."""
    if not isinstance(value, dict):
        raise _CmdError("Invalid parameter type for '%s', expected: object" % (name or "null"))
    left = _GHashSet()
    for key in qjson.qdict_order(value):
        left.insert(_c_key(key))
    out = {}
    for member, typ in members:
        optional = member.startswith("*")
        member = member.lstrip("*")
        full = member if name is None else "%s.%s" % (name, member)
        if member not in value:
            if optional:
                continue
            raise _CmdError("Parameter '%s' is missing" % full)
        left.remove(_c_key(member))
        out[member] = _visit(typ, value[member], full)
    extra = left.first()
    if extra is not None:
        key = extra.replace(b"\xc0\x80", b"\x00").decode("utf-8", "surrogatepass")
        raise _CmdError("Parameter '%s' is unexpected" % (key if name is None else "%s.%s" % (name, key)))
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _visit(typ: Any, value: Any, full: str) -> Any:
    if typ == "int":
        if not _is_int(value) or not _INT64_MIN <= value <= _INT64_MAX:
            raise _CmdError("Invalid parameter type for '%s', expected: integer" % full)
        return value
    if typ == "uint64":
        if _is_int(value) and _INT64_MIN <= value <= _UINT64_MAX:
            return value & _UINT64_MAX  # negative values wrap, "for backward compatibility"
        raise _CmdError("Parameter '%s' expects uint64" % full)
    if typ == "str":
        if not isinstance(value, str):
            raise _CmdError("Invalid parameter type for '%s', expected: string" % full)
        return value
    if typ == "bool":
        if not isinstance(value, bool):
            raise _CmdError("Invalid parameter type for '%s', expected: boolean" % full)
        return value
    if typ == "whence":
        # The GuestFileWhence alternate: an integer, or a QGASeek name.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _CmdError("Invalid parameter type for '%s', expected: GuestFileWhence" % full)
        if isinstance(value, str):
            codes = {"set": 0, "cur": 1, "end": 2}
            if value not in codes:
                raise _CmdError("Parameter '%s' does not accept value '%s'" % (full, value))
            return codes[value]
        return _visit("int", value, full)
    if isinstance(typ, list):
        if not isinstance(value, list):
            raise _CmdError("Invalid parameter type for '%s', expected: array" % full)
        return [_visit(typ[0], item, "%s[%d]" % (full, i)) for i, item in enumerate(value)]
    if isinstance(typ, tuple):
        return _visit_struct(typ, value, full)
    raise AssertionError(typ)


def visit_arguments(command: str, arguments: dict | None) -> dict:
    """The command's arguments as its marshaller sees them, or _CmdError."""
    return _visit_struct(_ARGS[command], {} if arguments is None else arguments, None)


# ---------------------------------------------------------------------------
# Base64 as QEMU decodes it (util/base64.c: a character check, then GLib's
# lenient g_base64_decode, which skips nothing but stops at nothing either).

_B64_VALID = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")
_B64_RANK = {c: i for i, c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}
_B64_RANK[ord("=")] = 0


def qbase64_decode(text: str) -> bytes:
    data = _c_key(text)
    if not _B64_VALID.issuperset(data):
        raise _CmdError("Base64 data contains invalid characters")
    out = bytearray()
    v = i = 0
    last = [0, 0]
    for c in data:
        rank = _B64_RANK.get(c)
        if rank is None:
            continue
        last[1], last[0] = last[0], c
        v = ((v << 6) | rank) & 0xFFFFFFFF
        i += 1
        if i == 4:
            out.append((v >> 16) & 0xFF)
            if last[1] != ord("="):
                out.append((v >> 8) & 0xFF)
            if last[0] != ord("="):
                out.append(v & 0xFF)
            i = 0
    return bytes(out)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------
# Guest state: an in-memory file system, fake processes.

_ERRNO_TEXT = {
    "ENOENT": "No such file or directory",
    "EISDIR": "Is a directory",
    "ENOTDIR": "Not a directory",
    "EBADF": "Bad file descriptor",
    "EINVAL": "Invalid argument",
}

# guest_file_open_modes in qga/commands-posix.c:
# mode -> (readable, writable, create, truncate, append)
_OPEN_MODES = {}
for _forms, _flags in (
    (("r", "rb"), (True, False, False, False, False)),
    (("w", "wb"), (False, True, True, True, False)),
    (("a", "ab"), (False, True, True, False, True)),
    (("r+", "rb+", "r+b"), (True, True, False, False, False)),
    (("w+", "wb+", "w+b"), (True, True, True, True, False)),
    (("a+", "ab+", "a+b"), (True, True, True, False, True)),
):
    for _form in _forms:
        _OPEN_MODES[_form] = _flags


@attrs.define
class _Handle:
    path: str
    data: bytearray | None  # None: a directory
    readable: bool
    writable: bool
    append: bool
    pos: int = 0


@attrs.frozen
class FakeRun:
    """What a fake program does: runs for `duration` seconds of trio time,
    then exits with `exitcode` (or dies of `signal`)."""

    duration: float = 0.0
    exitcode: int | None = 0
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""


def _echo(args: list[str], stdin: bytes) -> FakeRun:
    newline = True
    if args[:1] == ["-n"]:
        args, newline = args[1:], False
    return FakeRun(stdout=(" ".join(args) + ("\n" if newline else "")).encode())


_SLEEP_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _sleep(args: list[str], stdin: bytes) -> FakeRun:
    usage = b"Try 'sleep --help' for more information.\n"
    if not args:
        return FakeRun(exitcode=1, stderr=b"sleep: missing operand\n" + usage)
    seconds = 0.0
    for arg in args:  # GNU sleep adds up its operands
        m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([smhd]?)", arg)
        if m is None:
            return FakeRun(exitcode=1, stderr=b"sleep: invalid time interval '%s'\n" % arg.encode() + usage)
        seconds += float(m.group(1)) * _SLEEP_UNITS[m.group(2)]
    return FakeRun(duration=seconds)


#: Programs the fake guest has: path -> fn(argv[1:], stdin bytes) -> FakeRun.
PROGRAMS: dict[str, Callable[[list[str], bytes], FakeRun]] = {
    "/bin/echo": _echo,
    "/bin/true": lambda args, stdin: FakeRun(),
    "/bin/false": lambda args, stdin: FakeRun(exitcode=1),
    "/bin/sleep": _sleep,
    "/bin/cat": lambda args, stdin: FakeRun(stdout=stdin),
}
# Debian is usr-merged: /usr/bin/X is /bin/X.
PROGRAMS.update({"/usr" + path: fn for path, fn in list(PROGRAMS.items())})


@attrs.define
class _Process:
    end: float
    run: FakeRun
    capture: bool


# Canned answers of the information commands, shaped as the real agent's
# (same members, same types; values made up).
_OSINFO = {
    "name": "Debian GNU/Linux", "kernel-release": "6.1.0-sim-amd64", "version": "12 (bookworm)",
    "pretty-name": "Debian GNU/Linux 12 (bookworm)", "version-id": "12",
    "kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0", "machine": "x86_64", "id": "debian",
}
_ZERO_STATS = dict.fromkeys(
    ("rx-bytes", "rx-packets", "rx-errs", "rx-dropped", "tx-bytes", "tx-packets", "tx-errs", "tx-dropped"), 0
)
_INTERFACES = [
    {"name": "lo", "hardware-address": "00:00:00:00:00:00",
     "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8},
                      {"ip-address-type": "ipv6", "ip-address": "::1", "prefix": 128}],
     "statistics": _ZERO_STATS},
    {"name": "eth0", "hardware-address": "52:54:00:12:34:56",
     "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24},
                      {"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe12:3456", "prefix": 64}],
     "statistics": _ZERO_STATS},
]
_DISK_ADDRESS = {"pci-controller": {"domain": 0, "bus": 0, "slot": 4, "function": 0},
                 "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0, "dev": "/dev/vda"}
_HOMES = {"root": "/root", "nobody": "/nonexistent"}
_MEMORY_BLOCKS = 8


# ---------------------------------------------------------------------------
# Configuration and the agent.

def _frozenset(value) -> frozenset:
    return frozenset([value] if isinstance(value, str) else value)


@attrs.define
class SimConfig:
    """Who the simulated agent is, and how it misbehaves. Everything off by
    default; tests may change fields while the agent runs."""

    # -- the guest ---------------------------------------------------------
    version: str = VERSION
    hostname: str = "qgasim"
    #: Commands disabled like `qemu-ga -b` (guest-info shows enabled false).
    blocked: frozenset = attrs.field(default=frozenset(), converter=_frozenset)
    #: Initial guest files: path -> content (parent directories are implied).
    files: dict = attrs.Factory(dict)
    #: Mount points guest-fsfreeze-freeze(-list) freeze.
    mountpoints: tuple = ("/", "/boot")
    vcpus: int = 2
    #: guest-get-time = epoch_ns + trio time; None: the wall clock, read once.
    epoch_ns: int | None = None
    #: Extra or replacement fake programs for guest-exec (see PROGRAMS).
    programs: dict = attrs.Factory(dict)
    #: What a successful shutdown/suspend (no reply) does to the connection:
    #: "close" (QEMU exits: close after goodbye_delay, and the agent restarts
    #: with fresh state for the next connection), "stop" (the guest is gone
    #: but QEMU keeps the socket: stop reading until resume()), or "none".
    goodbye: str = attrs.field(default="close", validator=attrs.validators.in_(("close", "stop", "none")))
    goodbye_delay: float = 0.1

    # -- faults --------------------------------------------------------------
    #: Seconds before each message is handled (the agent is blocked meanwhile).
    latency: float = 0.0
    #: Extra seconds before running a given command.
    command_latency: dict = attrs.Factory(dict)
    #: Commands that never finish: no reply, and nothing after them is read
    #: or answered until SimAgent.release() (the agent is single-threaded).
    hang: frozenset = attrs.field(default=frozenset(), converter=_frozenset)
    #: command -> seconds: the command runs at once, its reply is written
    #: that much later (everything behind it waits).
    late: dict = attrs.Factory(dict)
    #: Commands that run but whose reply is never written.
    drop: frozenset = attrs.field(default=frozenset(), converter=_frozenset)
    #: Drop every Nth reply the agent writes (0: never).
    drop_every: int = 0
    #: What happens to a request's "id": "echo" (4.0 and later), "ignore"
    #: (older agents: dropped silently, never echoed), "reject" (2.x: the
    #: dispatcher refuses it, "QMP input object member 'id' is unexpected").
    id_mode: str = attrs.field(default="echo", validator=attrs.validators.in_(("echo", "ignore", "reject")))
    #: Bytes written as soon as a connection starts, before reading anything
    #: (garbage, or HALF_REPLY).
    on_connect: bytes = b""
    #: Close the connection after this many replies on it (0: never).
    close_after: int = 0
    #: Close the connection, unanswered, when one of these commands arrives.
    close_on: frozenset = attrs.field(default=frozenset(), converter=_frozenset)
    #: Start with the agent gone silent (see SimAgent.stop_reading()).
    stop_reading: bool = False
    #: Keep at most this many entries in SimAgent.received (oldest dropped).
    received_limit: int = 1_000_000


@attrs.frozen
class Received:
    """A message the agent parsed: its value and the bytes it came in."""

    value: Any
    raw: bytes


class SimAgent:
    """One simulated agent process. Its state lives across connections."""

    def __init__(self, config: SimConfig | None = None):
        self.config = config if config is not None else SimConfig()
        # Counters and records for tests.
        self.received: list[Received] = []
        self.parse_errors: list[str] = []
        self.connections = 0
        self.replies_sent = 0
        self.dropped = 0
        self.goodbyes = 0
        self._replies_made = 0  # for drop_every
        self._serving = trio.Lock()  # one client at a time, like the channel
        self._running = trio.Event()
        if not self.config.stop_reading:
            self._running.set()
        self._release = trio.Event()
        # Faults triggered from outside while a connection is served.
        self._connection: trio.CancelScope | None = None
        self._inject = b""
        self._cut_next = False
        self.disconnects = 0
        self.cuts = 0
        self._next_handle = FIRST_HANDLE  # persisted by the real agent: survives restart()
        self._next_pid = 4000
        self._time_offset_ns: int | None = None
        # The guest's file system: path -> content, and the directories.
        self.fs: dict[str, bytearray] = {}
        self.dirs: set[str] = {"/", "/tmp", "/root", "/etc", "/var", "/home", "/boot"}
        for path, content in self.config.files.items():
            self.put_file(path, content)
        self.restart()

    # -- process lifecycle ---------------------------------------------------
    def restart(self) -> None:
        """A fresh agent process (after a guest reboot): a new parser, no
        handles, no processes, thawed; the guest's files stay."""
        self._decoder = RequestDecoder(flush_on_sentinel=False)
        self._pending = bytearray()  # raw bytes of the message being parsed
        self.handles: dict[int, _Handle] = {}
        self.processes: dict[int, _Process] = {}
        self.frozen = False
        self._frozen_count = 0
        blocked = ALWAYS_BLOCKED | self.config.blocked
        # command -> disable reason (None: plain "has been disabled")
        self.disabled: dict[str, str | None] = {name: None for name, _, _ in COMMANDS if name in blocked}

    def put_file(self, path: str, content: bytes) -> None:
        """Create (or replace) a guest file, and its parent directories."""
        path = posixpath.normpath(path)
        self.fs[path] = bytearray(content)
        parent = posixpath.dirname(path)
        while parent not in self.dirs:
            self.dirs.add(parent)
            parent = posixpath.dirname(parent)

    def file(self, path: str) -> bytes:
        return bytes(self.fs[posixpath.normpath(path)])

    # -- fault controls --------------------------------------------------------
    def stop_reading(self) -> None:
        """The agent vanishes (QEMU still holds the socket): nothing more is
        read or written until resume()."""
        if self._running.is_set():
            self._running = trio.Event()

    def resume(self) -> None:
        self._running.set()

    def release(self) -> None:
        """Let hung commands finish (and answer)."""
        self._release.set()
        self._release = trio.Event()

    def disconnect(self, *, restart: bool = False) -> bool:
        """The host connection drops now (QEMU restarted, the channel
        reset), whatever the agent is doing; with restart, the agent
        process starts afresh too. False if no connection was open."""
        if self._connection is None:
            return False
        self.disconnects += 1
        self._connection.cancel()
        if restart:
            self.restart()
        return True

    def cut_next_reply(self) -> None:
        """The agent dies in the middle of its next reply: half of it is
        written, the connection drops and the next one meets a new agent
        process."""
        self._cut_next = True

    def inject(self, data: bytes) -> None:
        """Bytes written on the channel just before the next reply
        (garbage in the middle of the stream)."""
        self._inject += data

    async def _gate(self) -> None:
        while not self._running.is_set():
            await self._running.wait()

    # -- serving ---------------------------------------------------------------
    async def serve(self, stream: trio.abc.Stream) -> None:
        """Serve one host connection until EOF or a fault closes it. A second
        concurrent call waits for the first to end (one client at a time)."""
        async with self._serving:
            self.connections += 1
            conn = _Conn(stream)
            try:
                with trio.CancelScope() as self._connection:
                    await self._gate()
                    if self.config.on_connect:
                        await stream.send_all(self.config.on_connect)
                    while True:
                        await self._gate()
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        # Bytes that arrived just before the agent went away are
                        # read when it comes back, not before.
                        await self._gate()
                        for event, raw in self._feed(data):
                            await self._handle(conn, event, raw)
            except (_Close, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._connection = None
                await trio.aclose_forcefully(stream)

    def _feed(self, data: bytes):
        """Feed the parser; yield (event, raw bytes of its message). A request
        can only end on '}' (or ']', or an error byte such as 0xFF), so
        feeding in pieces cut after those tells which bytes made which
        message, without slowing down big payloads."""
        start = 0
        for m in _CUT.finditer(data):
            yield from self._feed_piece(data[start : m.end()])
            start = m.end()
        if start < len(data):
            yield from self._feed_piece(data[start:])

    def _feed_piece(self, piece: bytes):
        self._pending += piece
        events = self._decoder.feed(piece)
        if events:
            text = bytes(self._pending).lstrip(b" \t\r\n")
            self._pending.clear()
            if len(events) == 1:
                yield events[0], text
                return
            # Several messages ended in this piece: garbage, then a request
            # (b"junk{...}": the keyword ends at the brace). The last one, if
            # an object or array, began at its outermost opening bracket.
            last = events[-1]
            cut = len(text)
            if isinstance(last, Value) and isinstance(last.value, (dict, list)):
                cut = _container_start(text)
            before = text[:cut].rstrip()
            for event in events[:-1]:
                yield event, before
            yield last, text[cut:]
        elif self._decoder.idle():
            self._pending.clear()  # whitespace between messages
        elif len(self._pending) > _PENDING_MAX:
            del self._pending[: len(self._pending) - _PENDING_MAX]

    async def _handle(self, conn: "_Conn", event, raw: bytes) -> None:
        cfg = self.config
        if cfg.latency:
            await trio.sleep(cfg.latency)
        if isinstance(event, ParseError):
            self.parse_errors.append(event.desc)
            await self._reply(conn, messages.error_reply(messages.GENERIC_ERROR, event.desc), None)
            return
        assert isinstance(event, Value)
        value = event.value
        self.received.append(Received(value, raw))
        if len(self.received) > cfg.received_limit:
            del self.received[: len(self.received) - cfg.received_limit]
        execute = value.get("execute") if isinstance(value, dict) else None
        if isinstance(execute, str) and execute in cfg.close_on:
            raise _Close()

        if isinstance(value, dict) and "id" in value and cfg.id_mode != "echo":
            if cfg.id_mode == "reject":
                rejected = _old_check(value)
                if rejected is not None:
                    await self._reply(conn, rejected, execute)
                    return
            value = {k: v for k, v in value.items() if k != "id"}
        checked = messages.check_request(value, event.size)
        if isinstance(checked, messages.Rejected):
            await self._reply(conn, checked.reply(), execute)
            return
        req = checked
        name = req.execute
        if name not in _ARGS:
            await self._reply(conn, messages.not_found_reply(name, req.has_id, req.id), name)
            return
        if name in self.disabled:
            reply = messages.disabled_reply(name, req.has_id, req.id, self.disabled[name])
            await self._reply(conn, reply, name)
            return

        if name in cfg.hang:
            await self._release.wait()
        if name in cfg.command_latency:
            await trio.sleep(cfg.command_latency[name])
        delimited = False
        try:
            args = visit_arguments(name, req.arguments)
            result = getattr(self, "_cmd_" + name.replace("-", "_"))(**{k.replace("-", "_"): v for k, v in args.items()})
            if name == "guest-sync-delimited":
                delimited = True
        except _CmdError as exc:
            reply = messages.error_reply(exc.error_class, exc.desc, req.has_id, req.id)
        else:
            if name in messages.NO_REPLY_COMMANDS:
                await self._goodbye(conn)
                return
            reply = messages.return_reply({} if result is None else result, req.has_id, req.id)
            if delimited:
                reply = b"\xff" + reply
        if name in cfg.late:
            await trio.sleep(cfg.late[name])
        await self._reply(conn, reply, name)

    async def _reply(self, conn: "_Conn", reply: bytes, command: str | None) -> None:
        cfg = self.config
        self._replies_made += 1
        if (command is not None and command in cfg.drop) or (
            cfg.drop_every and self._replies_made % cfg.drop_every == 0
        ):
            self.dropped += 1
            return
        await self._gate()
        if self._inject:
            data, self._inject = self._inject, b""
            await conn.stream.send_all(data)
        if self._cut_next:
            self._cut_next = False
            self.cuts += 1
            await conn.stream.send_all(reply[: max(1, len(reply) // 2)])
            self.restart()
            raise _Close()
        await conn.stream.send_all(reply)
        self.replies_sent += 1
        conn.replies += 1
        if cfg.close_after and conn.replies >= cfg.close_after:
            raise _Close()

    async def _goodbye(self, conn: "_Conn") -> None:
        """A shutdown or suspend succeeded: no reply, and the guest goes away."""
        self.goodbyes += 1
        if self.config.goodbye == "close":
            await trio.sleep(self.config.goodbye_delay)
            self.restart()  # whoever connects next meets a new agent process
            raise _Close()
        if self.config.goodbye == "stop":
            self.stop_reading()

    # -- the commands ----------------------------------------------------------
    # Each _cmd_X takes the visited arguments (dashes as underscores) and
    # returns the "return" value (None for {}), or raises _CmdError with the
    # real agent's text.

    def _cmd_guest_sync(self, id):
        return id

    _cmd_guest_sync_delimited = _cmd_guest_sync

    def _cmd_guest_ping(self):
        return None

    def _cmd_guest_info(self):
        return {
            "version": self.config.version,
            "supported_commands": [
                {"name": name, "enabled": name not in self.disabled, "success-response": success}
                for name, success, _ in COMMANDS
            ],
        }

    def _now_ns(self) -> int:
        now = int(trio.current_time() * 1e9)
        if self.config.epoch_ns is not None:
            return self.config.epoch_ns + now
        if self._time_offset_ns is None:
            self._time_offset_ns = time.time_ns() - now
        return self._time_offset_ns + now

    def _cmd_guest_get_time(self):
        return self._now_ns()

    def _cmd_guest_set_time(self, time=None):
        if time is not None:
            self.config.epoch_ns = time - int(trio.current_time() * 1e9)
        return None

    def _cmd_guest_get_host_name(self):
        return {"host-name": self.config.hostname}

    def _cmd_guest_get_timezone(self):
        return {"zone": "UTC", "offset": 0}

    def _cmd_guest_get_osinfo(self):
        return dict(_OSINFO)

    def _cmd_guest_get_users(self):
        return []

    def _cmd_guest_get_vcpus(self):
        return [{"logical-id": i, "online": True, "can-offline": i != 0} for i in range(self.config.vcpus)]

    def _cmd_guest_set_vcpus(self, vcpus):
        # Each vCPU in turn; the first failure stops the loop, and is only
        # reported if nothing was processed (measured for [] and a missing CPU).
        processed = 0
        for vcpu in vcpus:
            if not 0 <= vcpu["logical-id"] < self.config.vcpus:
                if processed:
                    break
                raise _CmdError('open("/sys/devices/system/cpu/cpu%d/"): No such file or directory' % vcpu["logical-id"])
            processed += 1
        return processed

    def _cmd_guest_network_get_interfaces(self):
        return [dict(i) for i in _INTERFACES]

    def _cmd_guest_get_fsinfo(self):
        return [
            {"name": "vda%d" % (i + 1), "mountpoint": mp, "type": "ext4",
             "used-bytes": 1 << 30, "total-bytes": 8 << 30, "disk": [dict(_DISK_ADDRESS)]}
            for i, mp in enumerate(self.config.mountpoints)
        ]

    def _cmd_guest_get_disks(self):
        return [{"name": "/dev/vda", "partition": False, "dependencies": [], "address": dict(_DISK_ADDRESS)}]

    def _cmd_guest_get_diskstats(self):
        return []

    def _cmd_guest_get_cpustats(self):
        return [
            {"type": "linux", "cpu": i, "user": 0, "nice": 0, "system": 0, "idle": 0, "iowait": 0,
             "irq": 0, "softirq": 0, "steal": 0, "guest": 0, "guestnice": 0}
            for i in range(self.config.vcpus)
        ]

    def _cmd_guest_get_memory_blocks(self):
        return [{"phys-index": i, "online": True, "can-offline": True} for i in range(_MEMORY_BLOCKS)]

    def _cmd_guest_set_memory_blocks(self, mem_blks):
        return [
            {"phys-index": b["phys-index"], "response": "success"} if b["phys-index"] < _MEMORY_BLOCKS
            else {"phys-index": b["phys-index"], "response": "not-found", "error-code": 2}  # ENOENT
            for b in mem_blks
        ]

    def _cmd_guest_get_memory_block_info(self):
        return {"size": 134217728}

    def _cmd_guest_get_devices(self):  # pragma: no cover - always disabled on Linux
        return []

    def _cmd_guest_fstrim(self, minimum=None):
        return {"paths": [{"path": mp, "trimmed": 0, "minimum": minimum or 0} for mp in self.config.mountpoints]}

    def _cmd_guest_set_user_password(self, username, password, crypted):
        raw = qbase64_decode(password)
        # Measured texts; the real agent then runs chpasswd: the sim remembers nothing.
        if b"\n" in raw.split(b"\x00", 1)[0]:
            raise _CmdError("forbidden characters in raw password")
        if "\n" in username or ":" in username:
            raise _CmdError("forbidden characters in username")
        return None

    # ssh keys live in the guest file system (qga/commands-posix-ssh.c).
    def _authkeys_path(self, username: str) -> str:
        if username not in _HOMES:
            raise _CmdError("failed to lookup user '%s': Success" % username)  # measured
        return _HOMES[username] + "/.ssh/authorized_keys"

    def _read_authkeys(self, path: str) -> list[str]:
        if path not in self.fs:
            raise _CmdError(  # measured
                "failed to read '%s': Failed to open file \u201c%s\u201d: No such file or directory" % (path, path)
            )
        return self.fs[path].decode("utf-8", "replace").split("\n")

    @staticmethod
    def _check_keys(keys: list[str]) -> None:
        # From the source (check_openssh_pub_key): writing keys needs root.
        for key in keys:
            if key.startswith("#") or "\n" in key:
                raise _CmdError("invalid OpenSSH public key: '%s'" % key)

    def _cmd_guest_ssh_get_authorized_keys(self, username):
        lines = [line.strip() for line in self._read_authkeys(self._authkeys_path(username))]
        keys = [line for line in lines if line and not line.startswith("#")]
        return {"keys": keys[::-1]}  # QAPI_LIST_PREPEND: last line first

    def _cmd_guest_ssh_add_authorized_keys(self, username, keys, reset=False):
        self._check_keys(keys)
        path = self._authkeys_path(username)
        lines = [] if reset or path not in self.fs else self._read_authkeys(path)
        for key in keys:
            if key not in lines:
                lines.append(key)
        self.put_file(path, "\n".join(lines).encode())  # g_strjoinv: no final newline
        return None

    def _cmd_guest_ssh_remove_authorized_keys(self, username, keys):
        self._check_keys(keys)
        path = self._authkeys_path(username)
        if path in self.fs:
            lines = [line for line in self._read_authkeys(path) if line not in keys]
            self.put_file(path, "\n".join(lines).encode())
        return None

    # -- guest-file-* ------------------------------------------------------
    def _find(self, handle: int) -> _Handle:
        h = self.handles.get(handle)
        if h is None:
            raise _CmdError("handle '%d' has not been found" % handle)
        return h

    def _resolve(self, path: str) -> str:
        # The agent's working directory is /.
        return posixpath.normpath(posixpath.join("/", path))

    def _cmd_guest_file_open(self, path, mode=None):
        mode_str = "r" if mode is None else mode
        flags = _OPEN_MODES.get(mode_str)
        if flags is None:
            raise _CmdError("invalid file open mode '%s'" % mode_str)
        readable, writable, create, truncate, append = flags

        def fail(err: str):
            raise _CmdError("failed to open file '%s' (mode: '%s'): %s" % (path, mode_str, _ERRNO_TEXT[err]))

        full = self._resolve(path)
        parent = posixpath.dirname(full)
        if not path:
            fail("ENOENT")
        if parent not in self.dirs:
            # A path through a regular file is ENOTDIR, else ENOENT.
            probe = parent
            while probe not in self.dirs and probe not in self.fs:
                probe = posixpath.dirname(probe)
            fail("ENOTDIR" if probe in self.fs else "ENOENT")
        if path.endswith("/") and full not in self.dirs:
            # open(2) of "name/" that is no directory (measured): with O_CREAT
            # EISDIR; else ENOTDIR for a file, ENOENT for nothing
            fail("EISDIR" if create else "ENOTDIR" if full in self.fs else "ENOENT")
        if full in self.dirs:
            if writable:
                fail("EISDIR")
            data = None
        elif full in self.fs:
            data = self.fs[full]
            if truncate:
                del data[:]
        elif create:
            data = self.fs[full] = bytearray()
        else:
            fail("ENOENT")
        handle = self._next_handle
        self._next_handle += 1
        self.handles[handle] = _Handle(full, data, readable, writable, append)
        return handle

    def _cmd_guest_file_close(self, handle):
        self._find(handle)
        del self.handles[handle]
        return None

    def _cmd_guest_file_flush(self, handle):
        self._find(handle)
        return None

    def _cmd_guest_file_read(self, handle, count=None):
        h = self._find(handle)
        if count is None:
            count = QGA_READ_COUNT_DEFAULT
        elif count < 0 or count > GUEST_FILE_READ_COUNT_MAX:
            raise _CmdError("value '%d' is invalid for argument count" % count)
        if count == 0:
            # fread() of nothing fails nothing, whatever the stream.
            return {"count": 0, "buf-b64": "", "eof": False}
        if not h.readable:
            raise _CmdError("failed to read file: " + _ERRNO_TEXT["EBADF"])
        if h.data is None:
            raise _CmdError("failed to read file: " + _ERRNO_TEXT["EISDIR"])
        chunk = bytes(h.data[h.pos : h.pos + count])
        h.pos += len(chunk)
        # stdio's EOF flag: set when fread() came up short (and cleared by
        # the agent after each call, so it never sticks).
        return {"count": len(chunk), "buf-b64": _b64(chunk), "eof": len(chunk) < count}

    def _cmd_guest_file_write(self, handle, buf_b64, count=None):
        h = self._find(handle)
        buf = qbase64_decode(buf_b64)
        if count is None:
            count = len(buf)
        elif count < 0 or count > len(buf):
            raise _CmdError("value '%d' is invalid for argument count" % count)
        if count == 0:
            return {"count": 0, "eof": False}
        if not h.writable or h.data is None:
            raise _CmdError("failed to write to file: " + _ERRNO_TEXT["EBADF"])
        data = h.data
        if h.append:
            h.pos = len(data)
        if h.pos > len(data):
            data.extend(bytes(h.pos - len(data)))
        data[h.pos : h.pos + count] = buf[:count]
        h.pos += count
        return {"count": count, "eof": False}

    def _cmd_guest_file_seek(self, handle, offset, whence):
        h = self._find(handle)
        if whence not in (0, 1, 2):
            raise _CmdError("invalid whence code %d" % whence)
        size = len(h.data) if h.data is not None else 4096
        base = (0, h.pos, size)[whence]
        pos = base + offset
        if pos < 0 or pos > _INT64_MAX:
            raise _CmdError("failed to seek file: " + _ERRNO_TEXT["EINVAL"])
        h.pos = pos
        return {"position": pos, "eof": False}

    # -- guest-exec ----------------------------------------------------------
    def _cmd_guest_exec(self, path, arg=None, env=None, input_data=None, capture_output=False):
        stdin = qbase64_decode(input_data) if input_data is not None else b""
        programs = {**PROGRAMS, **self.config.programs}
        candidates = [path] if "/" in path else ["/usr/bin/" + path, "/bin/" + path]
        program = next((programs[c] for c in candidates if c in programs), None)
        if program is None:
            raise _CmdError(
                "Guest agent command failed, error was "
                "'Failed to execute child process \u201c%s\u201d (No such file or directory)'" % path
            )
        run = program(list(arg or []), stdin)
        pid = self._next_pid
        self._next_pid += 1
        self.processes[pid] = _Process(trio.current_time() + run.duration, run, bool(capture_output))
        return {"pid": pid}

    def _cmd_guest_exec_status(self, pid):
        proc = self.processes.get(pid)
        if proc is None:
            raise _CmdError("Invalid parameter 'pid'")
        if trio.current_time() < proc.end:
            return {"exited": False}
        # The agent forgets a process the first time it reports it exited.
        del self.processes[pid]
        run = proc.run
        status: dict[str, Any] = {"exited": True}
        if run.signal is not None:
            status["signal"] = run.signal
        else:
            status["exitcode"] = run.exitcode
        if proc.capture:
            for name, data in (("out", run.stdout), ("err", run.stderr)):
                if data:
                    status[name + "-data"] = _b64(data[:GUEST_EXEC_MAX_OUTPUT])
                    status[name + "-truncated"] = len(data) > GUEST_EXEC_MAX_OUTPUT
        return status

    # -- fsfreeze ------------------------------------------------------------
    def _set_frozen(self) -> None:
        if self.frozen:
            return
        # qmp_disable_command() overwrites the reason of commands already
        # disabled by -b too; thawing re-enables only the unblocked ones, so
        # blocked commands keep saying "frozen" after a thaw (measured).
        for name, _, _ in COMMANDS:
            if name not in FREEZE_ALLOWED:
                self.disabled[name] = FROZEN_REASON
        self.frozen = True

    def _unset_frozen(self) -> None:
        if not self.frozen:
            return
        blocked = ALWAYS_BLOCKED | self.config.blocked
        for name in [n for n in self.disabled if n not in blocked]:
            del self.disabled[name]
        self.frozen = False

    def _cmd_guest_fsfreeze_status(self):
        return "frozen" if self.frozen else "thawed"

    def _cmd_guest_fsfreeze_freeze(self):
        return self._cmd_guest_fsfreeze_freeze_list()

    def _cmd_guest_fsfreeze_freeze_list(self, mountpoints=None):
        self._set_frozen()
        if mountpoints is None:
            count = len(self.config.mountpoints)
        else:
            count = sum(1 for mp in self.config.mountpoints if mp in mountpoints)
        if count == 0:
            # Nothing frozen: the agent unsets the state it just set.
            self._unset_frozen()
        self._frozen_count = count
        return count

    def _cmd_guest_fsfreeze_thaw(self):
        count = self._frozen_count if self.frozen else 0
        self._unset_frozen()
        return count

    # -- no reply on success ---------------------------------------------------
    def _cmd_guest_shutdown(self, mode=None):
        if mode not in (None, "powerdown", "halt", "reboot"):
            # Measured, unbalanced parenthesis included.
            raise _CmdError("mode is invalid (valid values are: halt|powerdown|reboot")
        return None

    def _cmd_guest_suspend_disk(self):
        return None

    _cmd_guest_suspend_ram = _cmd_guest_suspend_disk
    _cmd_guest_suspend_hybrid = _cmd_guest_suspend_disk


@attrs.define
class _Conn:
    stream: Any
    replies: int = 0


def _old_check(value: dict) -> bytes | None:
    """The dispatcher of a 2.x agent, for a request with an "id": it walks
    the members in QDict order and refuses the first it does not know. Only
    an unexpected member is answered in 2.x wording; other faults fall
    through to today's checks (minus the id, which 2.x never echoed)."""
    for key in qjson.qdict_order(value):
        member = value[key]
        if key == "execute":
            if not isinstance(member, str):
                return None
        elif key == "arguments":
            if not isinstance(member, dict):
                return None
        else:
            return messages.error_reply(messages.GENERIC_ERROR, "QMP input object member '%s' is unexpected" % key)
    return None  # pragma: no cover - "id" is always unexpected here


# ---------------------------------------------------------------------------
# Serving a unix socket, and the command line.

async def serve_unix(agent: SimAgent, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on a unix socket and serve one client at a time: a second
    client's connect succeeds but it waits until the first leaves, as with
    `qemu-ga -m unix-listen` and QEMU's chardev."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(16)
        listener = trio.SocketListener(sock)
    except BaseException:
        sock.close()
        raise
    try:
        task_status.started()
        while True:
            stream = await listener.accept()
            await agent.serve(stream)
    finally:
        try:
            os.unlink(path)  # first: closing may be cut short by a cancellation
        except OSError:
            pass
        await trio.aclose_forcefully(listener)


def _seconds_map(items: list[str], flag: str) -> dict:
    out = {}
    for item in items:
        name, sep, seconds = item.rpartition("=")
        if not sep:
            raise SystemExit("%s expects COMMAND=SECONDS, got %r" % (flag, item))
        out[name] = float(seconds)
    return out


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's knobs as command-line options (shared with
    `qgaproxy serve --upstream sim`)."""
    g = parser.add_argument_group("simulated agent")
    g.add_argument("--hostname", default="qgasim")
    g.add_argument("--block", action="append", default=[], metavar="CMD", help="disable a command (like qemu-ga -b)")
    g.add_argument("--file", action="append", default=[], metavar="PATH=TEXT",
                   help="a guest file; PATH=@HOSTFILE takes the content of a host file")
    g.add_argument("--latency", type=float, default=0.0, metavar="S", help="seconds before each message")
    g.add_argument("--command-latency", action="append", default=[], metavar="CMD=S")
    g.add_argument("--hang", action="append", default=[], metavar="CMD", help="never answer CMD (blocks what follows)")
    g.add_argument("--late", action="append", default=[], metavar="CMD=S", help="write CMD's reply S seconds late")
    g.add_argument("--drop", action="append", default=[], metavar="CMD", help="never write CMD's reply")
    g.add_argument("--drop-every", type=int, default=0, metavar="N", help="drop every Nth reply")
    g.add_argument("--no-echo", choices=("ignore", "reject"), help="act like an agent older than 4.0 about 'id'")
    g.add_argument("--on-connect", default="", metavar="TEXT", help="write TEXT when a connection starts")
    g.add_argument("--close-after", type=int, default=0, metavar="N", help="close a connection after N replies")
    g.add_argument("--close-on", action="append", default=[], metavar="CMD", help="close the connection on CMD")
    g.add_argument("--goodbye", choices=("close", "stop", "none"), default="close",
                   help="what a successful shutdown/suspend does")


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    files = {}
    for item in ns.file:
        path, sep, text = item.partition("=")
        if not sep:
            raise SystemExit("--file expects PATH=TEXT, got %r" % item)
        if text.startswith("@"):
            with open(text[1:], "rb") as f:
                files[path] = f.read()
        else:
            files[path] = text.encode()
    return SimConfig(
        hostname=ns.hostname,
        blocked=frozenset(ns.block),
        files=files,
        latency=ns.latency,
        command_latency=_seconds_map(ns.command_latency, "--command-latency"),
        hang=frozenset(ns.hang),
        late=_seconds_map(ns.late, "--late"),
        drop=frozenset(ns.drop),
        drop_every=ns.drop_every,
        id_mode=ns.no_echo or "echo",
        on_connect=ns.on_connect.encode("utf-8", "surrogateescape"),
        close_after=ns.close_after,
        close_on=frozenset(ns.close_on),
        goodbye=ns.goodbye,
        received_limit=10_000,  # a long-running process keeps only the recent ones
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qgaproxy.sim", description="A simulated qemu-ga 7.2.")
    parser.add_argument("--listen", required=True, metavar="PATH", help="unix socket to listen on")
    add_sim_arguments(parser)
    ns = parser.parse_args(argv)
    agent = SimAgent(config_from_args(ns))
    unknown = (agent.config.blocked | agent.config.hang | agent.config.drop) - set(_ARGS)
    if unknown:
        print("warning: no such command: %s" % ", ".join(sorted(unknown)), file=sys.stderr)
    trio.run(_run_until_signalled, agent, ns.listen)
    return 0


async def _run_until_signalled(agent: SimAgent, path: str) -> None:
    # SIGTERM or SIGINT: stop serving and remove the socket.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_unix, agent, path)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    sys.exit(main())
