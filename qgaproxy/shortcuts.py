"""The convenience forms of `qgaproxy call` and `qgaproxy shell`, as
QEMU's qemu-ga-client offers them: ping, info, osinfo, ifconfig, fsinfo,
cat, freeze, thaw, fsfreeze-status, exec.

Each form takes an AgentClient, its words and an Output, prints what a
person wants to read (or, with Output.raw, the agent's replies as JSON)
and returns an exit status. Errors propagate as client.ClientError.
"""

from __future__ import annotations

import base64
import json
import select
import sys
import textwrap
import time
from typing import Any, Callable

import attrs

from .client import AgentClient, ClientTimeout

#: Bytes asked for per guest-file-read: the reply (base64) stays near
#: 1.4 MiB, well under the reply bound, and progress moves often.
CAT_CHUNK = 1 << 20

#: guest-exec-status polling: first delay and the largest.
EXEC_POLL_FIRST = 0.01
EXEC_POLL_MAX = 0.5


class UsageError(Exception):
    """The form's words are wrong."""


@attrs.define
class Output:
    """Where a form writes, and how."""

    stdout: Any = attrs.Factory(lambda: sys.stdout)
    stderr: Any = attrs.Factory(lambda: sys.stderr)
    #: Print the agent's replies as JSON instead of a readable form.
    raw: bool = False
    #: JSON indented (stdout is a terminal), or one compact line.
    pretty: bool = False
    #: A progress line on stderr for long transfers.
    progress: bool = False
    #: The last bytes written to stdout did not end a line (cat, exec).
    mid_line: bool = False

    def json(self, value: Any) -> None:
        self.line(format_json(value, self.pretty))
        self.stdout.flush()

    def line(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.mid_line = False

    def binary(self, data: bytes, err: bool = False) -> None:
        stream = self.stderr if err else self.stdout
        stream.flush()
        target = getattr(stream, "buffer", stream)
        # Unbuffered (python -u, PYTHONUNBUFFERED) it is the raw file, which
        # may take part of the data: a signal, or a reader that went away
        # (the next write raises BrokenPipeError instead of losing the rest).
        view = memoryview(data)
        while view:
            written = target.write(view)
            if written is None:  # a non-blocking stdout, full for now
                select.select([], [target], [])
                continue
            view = view[written:]
        target.flush()
        if data and not err:
            self.mid_line = not data.endswith(b"\n")


def format_json(value: Any, pretty: bool) -> str:
    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def human_size(n: int | float | None) -> str:
    """1024-based sizes: 512 B, 1.5 KiB, 7.8 GiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return "%d %s" % (value, unit) if unit == "B" else "%.1f %s" % (value, unit)
        value /= 1024
    raise AssertionError("unreachable")


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart (the last one not padded)."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _no_words(name: str, words: list[str]) -> None:
    if words:
        raise UsageError("%s takes no arguments" % name)


# -- the forms -----------------------------------------------------------------


def _shows(name: str, command: str):
    """A form that takes no words and shows one command's result: as JSON
    with Output.raw, else as the decorated function writes it."""

    def wrap(render: Callable[[Any, Output], None]) -> Callable[..., int]:
        def form(client: AgentClient, words: list[str], out: Output) -> int:
            _no_words(name, words)
            value = client.execute(command)
            if out.raw:
                out.json(value)
            else:
                render(value, out)
            return 0

        form.__name__, form.__doc__ = render.__name__, render.__doc__
        return form

    return wrap


@_shows("ping", "guest-ping")
def ping(value, out: Output) -> None:
    out.line("ok")


@_shows("info", "guest-info")
def info(value, out: Output) -> None:
    commands = value.get("supported_commands", [])
    enabled = sorted(c["name"] for c in commands if c.get("enabled"))
    disabled = sorted(c["name"] for c in commands if not c.get("enabled"))
    silent = sorted(c["name"] for c in commands if c.get("enabled") and not c.get("success-response", True))
    out.line("version: %s" % value.get("version", "?"))
    for label, names in (("enabled", enabled), ("disabled", disabled), ("no reply on success", silent)):
        out.line("%s (%d):" % (label, len(names)))
        if names:
            out.line(textwrap.fill(" ".join(names), width=78, initial_indent="  ", subsequent_indent="  ",
                                   break_on_hyphens=False))


_OSINFO_ORDER = ("pretty-name", "name", "id", "version", "version-id", "variant", "variant-id",
                 "kernel-release", "kernel-version", "machine")


@_shows("osinfo", "guest-get-osinfo")
def osinfo(value, out: Output) -> None:
    keys = [k for k in _OSINFO_ORDER if k in value] + [k for k in value if k not in _OSINFO_ORDER]
    width = max((len(k) for k in keys), default=0)
    for key in keys:
        out.line("%s  %s" % ((key + ":").ljust(width + 1), value[key]))


@_shows("ifconfig", "guest-network-get-interfaces")
def ifconfig(value, out: Output) -> None:
    rows = []
    for nif in value:
        addresses = ["%s/%s" % (a.get("ip-address", "?"), a.get("prefix", "?")) for a in nif.get("ip-addresses", [])]
        stats = nif.get("statistics") or {}
        first = [
            nif.get("name", "?"),
            nif.get("hardware-address", "-"),
            human_size(stats.get("rx-bytes")) if stats else "-",
            human_size(stats.get("tx-bytes")) if stats else "-",
        ]
        rows.append(first + [addresses[0] if addresses else "-"])
        for address in addresses[1:]:
            rows.append(["", "", "", "", address])
    out.line(table(["INTERFACE", "HARDWARE ADDRESS", "RX", "TX", "ADDRESS"], rows))


@_shows("fsinfo", "guest-get-fsinfo")
def fsinfo(value, out: Output) -> None:
    rows = []
    for fs in sorted(value, key=lambda f: f.get("mountpoint", "")):
        used, total = fs.get("used-bytes"), fs.get("total-bytes")
        percent = "%d%%" % round(100 * used / total) if used is not None and total else "-"
        rows.append([fs.get("mountpoint", "?"), fs.get("type", "?"), fs.get("name", "?"),
                     human_size(used), human_size(total), percent])
    out.line(table(["MOUNTPOINT", "TYPE", "DEVICE", "USED", "TOTAL", "USE%"], rows))


def cat(client: AgentClient, words: list[str], out: Output) -> int:
    """Stream a guest file to stdout, chunk by chunk; the handle is closed
    whatever happens (an error, a timeout, Ctrl-C)."""
    if len(words) != 1:
        raise UsageError("cat takes one guest path")
    handle = client.execute("guest-file-open", {"path": words[0], "mode": "r"})
    total = 0
    started = time.monotonic()
    try:
        while True:
            reply = client.execute("guest-file-read", {"handle": handle, "count": CAT_CHUNK})
            data = base64.b64decode(reply.get("buf-b64", ""))
            if data:
                out.binary(data)
                total += len(data)
                if out.progress:
                    rate = total / max(time.monotonic() - started, 1e-6)
                    out.stderr.write("\r%s read, %s/s\x1b[K" % (human_size(total), human_size(rate)))
                    out.stderr.flush()
            # An empty read ends it too, as read(2) returning 0 would.
            if reply.get("eof") or not data:
                break
    finally:
        if out.progress and total:
            out.stderr.write("\r\x1b[K")
            out.stderr.flush()
        _close_quietly(client, handle, out)
    return 0


def _close_quietly(client: AgentClient, handle: int, out: Output) -> None:
    try:
        client.execute("guest-file-close", {"handle": handle})
    except Exception as exc:  # reported, never hiding the first error
        out.stderr.write("qgaproxy: could not close guest file handle %s: %s\n" % (handle, exc))
        out.stderr.flush()


def freeze(client: AgentClient, words: list[str], out: Output) -> int:
    """Freeze every filesystem, or only the mount points named."""
    if words:
        value = client.execute("guest-fsfreeze-freeze-list", {"mountpoints": list(words)})
    else:
        value = client.execute("guest-fsfreeze-freeze")
    if out.raw:
        out.json(value)
    else:
        out.line(_filesystems(value, "frozen"))
    return 0


@_shows("thaw", "guest-fsfreeze-thaw")
def thaw(count, out: Output) -> None:
    out.line(_filesystems(count, "thawed"))


def _filesystems(count, done: str) -> str:
    """The agent's count of filesystems frozen or thawed, for a person."""
    return "%s filesystem%s %s" % (count, "" if count == 1 else "s", done)


@_shows("fsfreeze-status", "guest-fsfreeze-status")
def fsfreeze_status(value, out: Output) -> None:
    out.line(str(value))


def exec_(client: AgentClient, words: list[str], out: Output, *, timeout: float | None = None) -> int:
    """Run a program in the guest, wait for it (bounded by `timeout`, the
    whole run), copy its output, and return its exit status (128 + the
    signal's number if a signal ended it, as a shell reports it)."""
    if not words:
        raise UsageError("exec needs a program: exec -- PROGRAM [ARG...]")
    budget = client.timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    started = client.execute(
        "guest-exec", {"path": words[0], "arg": list(words[1:]), "capture-output": True}, deadline=deadline
    )
    pid = started["pid"]
    delay = EXEC_POLL_FIRST
    while True:
        status = client.execute("guest-exec-status", {"pid": pid}, deadline=deadline)
        if status.get("exited"):
            break
        if time.monotonic() + delay >= deadline:
            raise ClientTimeout("%s (pid %s in the guest) still running after %g s" % (words[0], pid, budget))
        time.sleep(delay)  # the agent has no way to wait for a process
        delay = min(delay * 2, EXEC_POLL_MAX)
    if out.raw:
        out.json(status)
    else:
        for key, err in (("out", False), ("err", True)):
            data = status.get(key + "-data")
            if data:
                out.binary(base64.b64decode(data), err=err)
            if status.get(key + "-truncated"):
                out.stderr.write("qgaproxy: the guest agent truncated the program's std%s\n" % key)
                out.stderr.flush()
    if "signal" in status:
        return 128 + int(status["signal"])
    return int(status.get("exitcode", 0))


#: name -> form. Every other name is an agent command.
FORMS: dict[str, Callable[..., int]] = {
    "ping": ping,
    "info": info,
    "osinfo": osinfo,
    "ifconfig": ifconfig,
    "fsinfo": fsinfo,
    "cat": cat,
    "freeze": freeze,
    "thaw": thaw,
    "fsfreeze-status": fsfreeze_status,
    "exec": exec_,
}

#: One line each, for --help and the shell's help.
SUMMARY = {
    "ping": "is the agent there (guest-ping)",
    "info": "agent version and its commands, enabled and disabled",
    "osinfo": "the guest's operating system",
    "ifconfig": "interfaces, hardware and IP addresses, traffic",
    "fsinfo": "mount points with used and total sizes",
    "cat": "cat GUEST-PATH: stream a guest file to stdout",
    "freeze": "freeze [MOUNTPOINT...]: freeze guest filesystems",
    "thaw": "thaw guest filesystems",
    "fsfreeze-status": "frozen or thawed",
    "exec": "exec -- PROGRAM [ARG...]: run it, copy its output, exit with its status",
}
