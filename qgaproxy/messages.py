"""Requests and replies of the agent protocol, as values.

This module owns the checks qemu-ga's dispatcher makes on a decoded
message before any command runs (qapi/qmp-dispatch.c), with the agent's
exact wording, and the byte forms of replies: the agent's error shape,
and the id rewriting that gives every client its own ``id`` back.

No I/O here, and no knowledge of who sent what (that is the router's).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from . import qjson

GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"

# Commands the agent runs without ever answering on success.
NO_REPLY_COMMANDS = frozenset(
    {"guest-shutdown", "guest-suspend-disk", "guest-suspend-ram", "guest-suspend-hybrid"}
)
SYNC_COMMANDS = frozenset({"guest-sync", "guest-sync-delimited"})


# Not frozen: one is built per request, and a frozen attrs class costs
# three times as much to build. Nothing changes one after the check.
@attrs.define
class Request:
    """A request that passed the dispatcher's checks."""

    execute: str
    arguments: dict | None  # None: the member was absent
    has_id: bool
    id: Any = None
    size: int = 0

    def id_json(self) -> bytes | None:
        """The id as the agent would echo it, or None when absent."""
        if not self.has_id:
            return None
        if type(self.id) is int:
            return b"%d" % self.id
        return qjson.dumpb(self.id)


@attrs.frozen
class Rejected:
    """A message the dispatcher refuses before looking up the command."""

    desc: str
    has_id: bool
    id: Any = None

    def reply(self) -> bytes:
        return error_reply(GENERIC_ERROR, self.desc, self.has_id, self.id)


_MEMBERS = frozenset({"execute", "arguments", "id"})


def check_request(value: Any, size: int = 0) -> Request | Rejected:
    """qmp_dispatch() up to the command lookup, for qemu-ga (no OOB)."""
    if type(value) is dict and value.keys() <= _MEMBERS and type(value.get("execute")) is str:
        # Nothing to refuse (the usual case): no order to find the first
        # problem in.
        arguments = value.get("arguments")
        if arguments is None or type(arguments) is dict:
            if "arguments" not in value or arguments is not None:
                return Request(value["execute"], arguments, "id" in value, value.get("id"), size)
    if not isinstance(value, dict):
        return Rejected("QMP input must be a JSON object", False)
    has_id = "id" in value
    ident = value.get("id")
    execute = None
    for key in qjson.qdict_order(value):
        member = value[key]
        if key == "execute":
            if not isinstance(member, str):
                return Rejected("QMP input member 'execute' must be a string", has_id, ident)
            execute = member
        elif key == "arguments":
            if not isinstance(member, dict):
                return Rejected("QMP input member 'arguments' must be an object", has_id, ident)
        elif key == "id":
            continue
        else:
            return Rejected("QMP input member '%s' is unexpected" % key, has_id, ident)
    if execute is None:
        return Rejected("QMP input lacks member 'execute'", has_id, ident)
    return Request(execute, value.get("arguments"), has_id, ident, size)


def _with_id(body: dict, has_id: bool, ident: Any) -> dict:
    if has_id:
        body["id"] = ident
    return body


def error_reply(error_class: str, desc: str, has_id: bool = False, ident: Any = None) -> bytes:
    """The agent's error reply, newline included."""
    body = _with_id({"error": {"class": error_class, "desc": desc}}, has_id, ident)
    return qjson.dumpb(body) + b"\n"


def return_reply(value: Any, has_id: bool = False, ident: Any = None) -> bytes:
    return qjson.dumpb(_with_id({"return": value}, has_id, ident)) + b"\n"


def not_found_reply(command: str, has_id: bool, ident: Any) -> bytes:
    return error_reply(COMMAND_NOT_FOUND, "The command %s has not been found" % command, has_id, ident)


def disabled_reply(command: str, has_id: bool, ident: Any, reason: str | None = None) -> bytes:
    desc = "Command %s has been disabled" % command
    if reason:
        desc += ": " + reason
    return error_reply(COMMAND_NOT_FOUND, desc, has_id, ident)


def encode_request(execute: str, arguments: dict | None, ident: Any = None, *, has_id: bool = True) -> bytes:
    """A request for the agent, serialized by us.

    Members keep their insertion order so that the agent rebuilds the
    very QDict the client sent (its error messages depend on that order).
    The proxy's own ids are integers: those requests are spliced from a
    cached head, which is what the writer would make of them."""
    if has_id and type(ident) is int:
        head = _REQUEST_HEADS.get(execute)
        if head is None:
            head = _request_head(execute)
        if arguments is None:
            return b"%s, \"id\": %d}\n" % (head, ident)
        return b"%s, \"arguments\": %s, \"id\": %d}\n" % (head, qjson.dumpb(arguments, qdict_order=False), ident)
    body: dict = {"execute": execute}
    if arguments is not None:
        body["arguments"] = arguments
    if has_id:
        body["id"] = ident
    return qjson.dumpb(body, qdict_order=False) + b"\n"


_REQUEST_HEADS: dict[str, bytes] = {}


def _request_head(execute: str) -> bytes:
    head = b'{"execute": ' + qjson.dumpb(execute)
    if len(_REQUEST_HEADS) < 1024:  # command names a client may invent are many
        _REQUEST_HEADS[execute] = head
    return head


# -- id rewriting ------------------------------------------------------------

# Where the writer puts "id" relative to "return"/"error" is fixed by QDict
# order: after "return", before "error".
_ID_FIRST = {key: qjson.qdict_order([key, "id"])[0] == "id" for key in ("return", "error")}


def reply_kind(raw: bytes) -> str | None:
    """'return' or 'error' from the start of a reply line (cheap sniff)."""
    if raw.startswith(b'{"return": '):
        return "return"
    if raw.startswith(b'{"error": '):
        return "error"
    if raw.startswith(b'{"id": '):
        tail = raw.find(b', "', 7)
        if tail > 0:
            if raw.startswith(b'"error": ', tail + 2):
                return "error"
            if raw.startswith(b'"return": ', tail + 2):
                return "return"
    return None


def rewrite_id(raw: bytes, upstream_id: bytes | None, client_id: bytes | None, kind: str) -> bytes:
    """Turn an agent reply line into the client's reply, newline included.

    raw is the agent's line as written (no newline); upstream_id the id
    text the proxy sent (None if it sent none); client_id the client's id
    text (None if it sent none). Only the id changes: the rest of the
    reply, however large, is passed on as the agent wrote it."""
    # Pieces joined once, the agent's text through a memoryview: a 64 MiB
    # reply costs one copy, not one per concatenation.
    id_first = _ID_FIRST[kind]
    view = memoryview(raw)
    if upstream_id is not None:
        if id_first:
            prefix = b'{"id": ' + upstream_id + b", "
            if not raw.startswith(prefix):
                return _rewrite_slow(raw, client_id)
            head = b"{" if client_id is None else b'{"id": ' + client_id + b", "
            return b"".join((head, view[len(prefix) :], b"\n"))  # body: '"error": ...}'
        suffix = b', "id": ' + upstream_id + b"}"
        if not raw.endswith(suffix):
            return _rewrite_slow(raw, client_id)
        tail = b"}" if client_id is None else b', "id": ' + client_id + b"}"
        return b"".join((view[: -len(suffix)], tail, b"\n"))  # body: '{"return": ...'
    # The agent was sent no id: add the client's where the agent would.
    if client_id is None:
        return raw + b"\n"
    if id_first:
        return b"".join((b'{"id": ', client_id, b", ", view[1:], b"\n"))
    return b"".join((view[:-1], b', "id": ', client_id, b"}\n"))


def _rewrite_slow(raw: bytes, client_id: bytes | None) -> bytes:
    value = json.loads(raw)
    value.pop("id", None)
    if client_id is not None:
        value["id"] = json.loads(client_id)
    return qjson.dumpb(value) + b"\n"
