"""The audit trail: one JSON line for every command that reached the guest.

Who (agent, listener, the peer's uid, gid, pid and executable from
SO_PEERCRED and /proc at accept), what (the command; in "full" mode its
arguments, with secrets redacted by redact.py), how it ended and how long
it took. Requests a listener's policy denied are recorded too (outcome
"denied"). The proxy's own read-only calls (its syncs, guest-info, the
exporter's polls, the freeze status it asks after every sync) are not
recorded; what it does to the guest by itself (the freeze guard's thaw,
closing the files a departed client left open) is, with ``"origin":
"qgaproxy"`` and no peer.

Record fields::

    time      UTC, ISO 8601 with milliseconds, when the outcome was known
    agent     the agent's configured name
    origin    "client", or "qgaproxy" for the proxy's own calls
    listener  the listener's name (the proxy's own calls: "qgaproxy")
    client    the proxy's number for the connection (as in its log lines)
    uid, gid, pid, exe   the peer (null when unknown)
    command   the command name
    arguments ("full" only, when the request had any) redacted arguments;
              over MAX_ARGUMENTS characters of JSON: a truncated string,
              and "arguments_truncated": the full length
    outcome   "ok", the agent's error class ("GenericError",
              "CommandNotFound", ...), "timeout", "unavailable" or "denied"
    duration  seconds from the request's arrival to its outcome

Writing: a file opened in append mode, created 0600, rotated by size the
way logging.handlers.RotatingFileHandler does (path -> path.1 -> ... ->
path.N, the oldest dropped), one write and flush per record; or stderr
(for journald). A write error is logged once and the record dropped: the
proxy keeps serving (an audit trail that stops the service is a denial
of service waiting to happen).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, BinaryIO

import attrs

from . import redact
from .policy import READ_ONLY, Policy
from .status import iso, peer_fields

log = logging.getLogger("qgaproxy.audit")

MODES = ("off", "commands", "full")

# A record stays one readable line: guest-exec's argv or a long path fit;
# a 64 MiB argument does not belong in an audit trail.
MAX_ARGUMENTS = 4096

_READ_ONLY = Policy(allow=READ_ONLY)


@attrs.frozen
class AuditConfig:
    mode: str = "off"  # off | commands | full
    path: str = "stderr"  # a file, or "stderr"
    max_bytes: int = 100 << 20  # rotate past this size; 0: never
    backups: int = 5  # rotated files kept


def record(
    *,
    wall: float,
    agent: str,
    client: Any,
    command: str,
    arguments: Any,
    outcome: str,
    duration: float,
    full: bool,
) -> dict:
    """One audit record (a dict ready for json.dumps)."""
    internal = getattr(client, "internal", False)
    entry: dict = {
        "time": iso(wall),
        "agent": agent,
        "origin": "qgaproxy" if internal else "client",
        "listener": client.listener,
        "client": None if internal else client.number,
    }
    entry.update(peer_fields(None if internal else client.peer))
    entry["command"] = command
    if full and arguments is not None:
        shown = redact.arguments(command, arguments)
        text = json.dumps(shown, ensure_ascii=False)
        if len(text) > MAX_ARGUMENTS:
            entry["arguments"] = text[:MAX_ARGUMENTS]
            entry["arguments_truncated"] = len(text)
        else:
            entry["arguments"] = shown
    entry["outcome"] = outcome
    entry["duration"] = round(duration, 6)
    return entry


def wanted(client: Any, command: str) -> bool:
    """Whether a call is recorded: every client's; the proxy's own only
    when it may change the guest."""
    return not getattr(client, "internal", False) or not _READ_ONLY.allows(command)


class AuditLog:
    """Where records go; one per process, shared by its agents."""

    def __init__(self, config: AuditConfig):
        if config.mode not in MODES:
            raise ValueError("audit mode must be one of %s" % ", ".join(MODES))
        self.config = config
        self.full = config.mode == "full"
        self._stream: BinaryIO | None = None
        self._size = 0
        self._failed = False
        if config.path != "stderr":
            self._open()

    @property
    def path(self) -> str:
        return self.config.path

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._stream = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size

    def write(self, entry: dict) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
        try:
            if self.config.path == "stderr":
                sys.stderr.write(line)
                sys.stderr.flush()
            else:
                data = line.encode("utf-8")
                if self.config.max_bytes and self._size and self._size + len(data) > self.config.max_bytes:
                    self._rotate()
                assert self._stream is not None
                self._stream.write(data)
                self._stream.flush()
                self._size += len(data)
            self._failed = False
        except (OSError, ValueError) as exc:
            if not self._failed:
                log.error("audit trail %s: cannot write: %s (records are lost until it works again)", self.path, exc)
            self._failed = True
            if self._stream is None and self.config.path != "stderr":
                try:
                    self._open()
                except OSError:
                    pass

    def _rotate(self) -> None:
        """path.N-1 -> path.N, ..., path -> path.1; a new path."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        backups = self.config.backups
        for i in range(backups - 1, 0, -1):
            source = "%s.%d" % (self.path, i)
            if os.path.exists(source):
                os.replace(source, "%s.%d" % (self.path, i + 1))
        if backups > 0:
            os.replace(self.path, self.path + ".1")
        else:
            os.unlink(self.path)
        self._open()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def open_log(config: AuditConfig | None) -> AuditLog | None:
    """The log a configuration asks for; None when auditing is off."""
    if config is None or config.mode == "off":
        return None
    return AuditLog(config)
