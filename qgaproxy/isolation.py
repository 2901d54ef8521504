"""Isolation between clients: what one client created in the guest, no
other client can use.

The agent's file handles (guest-file-open) and process ids (guest-exec)
are global to the agent, not tied to a host connection: without this any
client could read another's open file, or steal another's exec status
(guest-exec-status forgets a process the first time it reports it exited,
so a monitoring client polling it would take the owner's exit code).

This module tracks who created what, from the replies, and answers a
foreign handle or pid with the agent's own error for one that does not
exist. It also says which handles a departing client left open, for the
proxy to close. Decisions only; no I/O.
"""

from __future__ import annotations

from typing import Any, Hashable

from . import messages
from .messages import Request

FILE_COMMANDS = frozenset(
    {"guest-file-read", "guest-file-write", "guest-file-seek", "guest-file-flush", "guest-file-close"}
)


class Ownership:
    def __init__(self) -> None:
        self.files: dict[int, Hashable] = {}
        self.pids: dict[int, Hashable] = {}

    def check(self, owner: Hashable, request: Request) -> bytes | None:
        """None if the request may go on; else the agent's own error reply."""
        args = request.arguments
        if args is None:
            return None
        if request.execute in FILE_COMMANDS:
            handle = args.get("handle")
            if type(handle) is int and self.files.get(handle) is not owner:
                return messages.error_reply(
                    messages.GENERIC_ERROR, "handle '%d' has not been found" % handle, request.has_id, request.id
                )
        elif request.execute == "guest-exec-status":
            pid = args.get("pid")
            if type(pid) is int and self.pids.get(pid) is not owner:
                return messages.error_reply(
                    messages.GENERIC_ERROR, "Invalid parameter 'pid'", request.has_id, request.id
                )
        return None

    def on_reply(self, owner: Hashable, request: Request, value: dict) -> None:
        """Learn from a reply to a request of owner's."""
        if "return" not in value:
            return
        result: Any = value["return"]
        command = request.execute
        if command == "guest-file-open" and type(result) is int:
            self.files[result] = owner
        elif command == "guest-file-close":
            handle = (request.arguments or {}).get("handle")
            self.files.pop(handle, None)
        elif command == "guest-exec" and isinstance(result, dict) and type(result.get("pid")) is int:
            self.pids[result["pid"]] = owner
        elif command == "guest-exec-status" and isinstance(result, dict) and result.get("exited") is True:
            self.pids.pop((request.arguments or {}).get("pid"), None)

    def release(self, owner: Hashable) -> list[int]:
        """Forget everything owner had; return its open file handles."""
        handles = [h for h, o in self.files.items() if o is owner]
        for handle in handles:
            del self.files[handle]
        for pid in [p for p, o in self.pids.items() if o is owner]:
            del self.pids[pid]
        return handles

    def reset(self) -> None:
        """A new agent process (reconnect): its handles and pids are new."""
        self.files.clear()
        self.pids.clear()
