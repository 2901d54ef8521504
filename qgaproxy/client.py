"""A blocking agent-protocol client for the operator's tools.

It speaks to a qgaproxy socket and to a raw qemu-ga socket alike: every
connection starts with 0xFF and guest-sync-delimited with a random id, and
everything read before that sync's own reply is thrown away (an agent's
error for the 0xFF, replies a previous client left unread, half a line).

A proxy listener with ``protocol = "qmp"`` greets first ({"QMP": ...}) and
wants ``qmp_capabilities`` before anything else: when the first line of a
connection is such a greeting, the client negotiates (no capabilities)
and syncs again, so the same tools work on both kinds of listener.

Plain blocking sockets: a command-line tool does one thing at a time.
It must never hang: every read has a deadline, and a reply larger than
MAX_REPLY is an error. No trio here.
"""

from __future__ import annotations

import json
import random
import select
import socket
import time
from typing import Any

#: The agent's parser accepts messages up to 64 MiB, and guest-file-read
#: sizes its largest reply to fit; nothing legitimate is larger.
MAX_REPLY = 64 * 1024 * 1024
_TOO_LARGE = "a reply larger than %d MiB" % (MAX_REPLY >> 20)

#: What may precede the sync's reply and be discarded: stale replies
#: another client left unread (each at most MAX_REPLY), bounded too.
MAX_DISCARD = 2 * MAX_REPLY

_READ_SIZE = 1 << 20


class ClientError(Exception):
    """The root of everything this client raises."""


class ConnectionProblem(ClientError):
    """The socket could not be reached, closed, or sent what no agent sends."""


class ClientTimeout(ClientError):
    """No reply within the deadline."""


class AgentError(ClientError):
    """The agent (or the proxy on its behalf) answered with an error."""

    def __init__(self, error_class: str, desc: str, reply: dict | None = None):
        super().__init__("%s: %s" % (error_class, desc))
        self.error_class = error_class
        self.desc = desc
        self.reply = reply


def new_id() -> int:
    """A random id: a sync id must not match a stale sync reply of anyone
    else's, and the agent wants an integer for guest-sync-delimited."""
    return random.randint(1, (1 << 31) - 1)


class AgentClient:
    """One connection to an agent socket.

    ``timeout`` bounds each round trip (connect and sync included).
    After a timeout or an interruption the connection's reply stream may be
    behind; the next call resyncs first.
    """

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._needs_sync = True
        # Agents before QEMU 4.0 refuse a request's "id"; learnt on first use.
        self._use_ids = True
        # Whether the connection's first line (a QMP greeting?) is yet to come.
        self._first_line = False
        #: The QMP greeting of a qmp listener, None elsewhere.
        self.greeting: dict | None = None

    # -- connection ----------------------------------------------------------

    def connect(self) -> "AgentClient":
        """Connect and sync (within one timeout)."""
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except socket.timeout:
            sock.close()
            raise ClientTimeout("connecting to %s timed out after %g s" % (self.path, self.timeout)) from None
        except OSError as exc:
            sock.close()
            raise ConnectionProblem("cannot connect to %s: %s" % (self.path, exc.strerror or exc)) from None
        sock.setblocking(False)
        self._sock = sock
        self._buf.clear()
        self._first_line = True
        self.greeting = None
        self.sync(deadline)
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "AgentClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def sync(self, deadline: float | None = None) -> None:
        """Reset the agent's parser and skip everything before our sync's
        reply (0xFF + guest-sync-delimited with a fresh random id)."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        self._needs_sync = True
        want = self._send_sync(deadline)
        discarded = 0
        while True:
            if self._first_line:
                greeted = self._take_greeting()
                if greeted is None:
                    self._fill(deadline, "reply to the sync")
                    continue
                self._first_line = False
                if greeted:
                    self._negotiate(deadline)
                    want = self._send_sync(deadline)
            i = self._buf.find(want)
            if i >= 0:
                del self._buf[: i + len(want)]
                break
            # Keep only what could still be the start of the reply.
            keep = len(want) - 1
            if len(self._buf) > keep:
                discarded += len(self._buf) - keep
                del self._buf[:-keep]
            if discarded > MAX_DISCARD:
                raise ConnectionProblem("no reply to the sync after %d bytes of other data" % discarded)
            self._fill(deadline, "reply to the sync")
        self._needs_sync = False

    def _send_sync(self, deadline: float) -> bytes:
        """0xFF and a sync with a fresh id; the reply to look for."""
        sync_id = new_id()
        self._send(b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' % sync_id, deadline)
        return b'\xff{"return": %d}\n' % sync_id

    def _take_greeting(self) -> bool | None:
        """Whether the connection began with a QMP greeting (then taken
        out of the buffer); None until that can be told."""
        if self._buf[:1] not in (b"", b"{"):
            return False  # an agent's 0xFF, or anything else but an object
        i = self._buf.find(b"\n")
        if i < 0:
            if len(self._buf) > MAX_REPLY:
                return False  # the sync's bound on discarded data applies
            return None
        try:
            first = json.loads(bytes(self._buf[:i]))
        except ValueError:
            return False
        if not (isinstance(first, dict) and isinstance(first.get("QMP"), dict)):
            return False
        del self._buf[: i + 1]
        self.greeting = first["QMP"]
        return True

    def _negotiate(self, deadline: float) -> None:
        """qmp_capabilities, none enabled. The error the listener answered
        our first sync with goes by with everything else before the reply."""
        caps_id = "qgaproxy-caps-%d" % new_id()
        self._send(json.dumps({"execute": "qmp_capabilities", "id": caps_id}).encode() + b"\n", deadline)
        while True:
            reply = self._read_reply(deadline, "reply to qmp_capabilities")
            if isinstance(reply, dict) and reply.get("id") == caps_id:
                break
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise ConnectionProblem(
                "%s refused qmp_capabilities: %s" % (self.path, error.get("desc", reply["error"]))
            )

    # -- requests --------------------------------------------------------------

    def request(self, message: dict, deadline: float | None = None) -> dict:
        """Send one request object, return the whole reply object.

        An "id" is added when the message has none, and replies carrying
        another id (late replies to an interrupted request) are skipped."""
        if self._sock is None:
            self.connect()
        if self._needs_sync:
            # A round trip of its own (after a timeout it waits for the
            # late reply too), within the caller's deadline if any.
            sync_deadline = time.monotonic() + self.timeout
            self.sync(sync_deadline if deadline is None else min(deadline, sync_deadline))
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        message = dict(message)
        if self._use_ids:
            message.setdefault("id", new_id())
        want_id = message.get("id")
        data = json.dumps(message, ensure_ascii=False).encode("utf-8")
        what = "reply to %s" % message.get("execute", "the request")
        # Until the reply is read whole, the stream is behind.
        self._needs_sync = True
        self._send(data + b"\n", deadline)
        while True:
            reply = self._read_reply(deadline, what)
            if not isinstance(reply, dict):
                raise ConnectionProblem("the agent sent a reply that is not an object: %.200r" % (reply,))
            if "id" in reply and reply["id"] != want_id:
                continue  # a late reply to something interrupted earlier
            self._needs_sync = False
            reply.pop("id", None)
            if want_id is not None and _refuses_ids(reply):
                self._use_ids = False
                message.pop("id")
                return self.request(message, deadline)
            return reply

    def execute(self, command: str, arguments: dict | None = None, deadline: float | None = None) -> Any:
        """Run one command; its "return" value, or AgentError."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        reply = self.request(message, deadline)
        return result_of(reply)

    # -- bytes ----------------------------------------------------------------

    def _broken(self, why: str) -> ConnectionProblem:
        """Close the connection (it is of no more use); the error to raise."""
        self.close()
        return ConnectionProblem(why)

    def _send(self, data: bytes, deadline: float) -> None:
        assert self._sock is not None
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientTimeout("sending timed out after %g s" % self.timeout)
            _, writable, _ = select.select([], [self._sock], [], left)
            if not writable:
                continue
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._broken("connection to %s lost: %s" % (self.path, exc.strerror or exc)) from None
            view = view[sent:]

    def _fill(self, deadline: float, what: str) -> None:
        """Read once into the buffer, or raise at the deadline or on EOF."""
        assert self._sock is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientTimeout("no %s within %g s" % (what, self.timeout))
            readable, _, _ = select.select([self._sock], [], [], left)
            if not readable:
                continue
            try:
                chunk = self._sock.recv(_READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._broken("connection to %s lost: %s" % (self.path, exc.strerror or exc)) from None
            if not chunk:
                raise self._broken("%s closed the connection while waiting for %s" % (self.path, what))
            self._buf += chunk
            return

    def _read_reply(self, deadline: float, what: str) -> Any:
        """The next reply line, parsed (a leading 0xFF is dropped)."""
        line = b""
        while not line:
            start = 0
            while True:
                i = self._buf.find(b"\n", start)
                if i >= 0:
                    break
                start = len(self._buf)
                if start > MAX_REPLY:
                    raise self._broken(_TOO_LARGE)
                self._fill(deadline, what)
            line = bytes(self._buf[:i]).lstrip(b"\xff").strip()
            del self._buf[: i + 1]
        if len(line) > MAX_REPLY:
            raise self._broken(_TOO_LARGE)
        try:
            return json.loads(line)
        except ValueError:
            raise ConnectionProblem("the agent sent something that is not JSON: %.200r" % line) from None


def _refuses_ids(reply: dict) -> bool:
    error = reply.get("error")
    return isinstance(error, dict) and "member 'id' is unexpected" in str(error.get("desc", ""))


def result_of(reply: dict) -> Any:
    """A reply's "return", or AgentError for its "error"."""
    if "error" in reply:
        error = reply["error"]
        if isinstance(error, dict):
            raise AgentError(str(error.get("class", "GenericError")), str(error.get("desc", "")), reply)
        raise AgentError("GenericError", str(error), reply)
    if "return" not in reply:
        raise ConnectionProblem("a reply with neither return nor error: %.200r" % (reply,))
    return reply["return"]
