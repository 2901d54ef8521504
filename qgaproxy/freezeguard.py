"""The freeze guard: a guest must not stay frozen because a client died.

After guest-fsfreeze-freeze (or -freeze-list) succeeds, the guest's
filesystems stay frozen until someone thaws them; a Linux agent does not
thaw by itself, even when it exits. A backup job that crashes between
freeze and thaw leaves the guest hung on every write.

So the proxy remembers who froze the guest and since when, and asks for
a thaw (guest-fsfreeze-thaw) when that client disconnects without
thawing, or when the freeze has lasted longer than ``max_seconds``; after
a (re)sync, a guest found frozen with no client owning the freeze is
thawed at once. While frozen, commands the agent will refuse get its
own "frozen state" error straight from the proxy.

Decisions only; the router sends the thaw.
"""

from __future__ import annotations

from typing import Any, Hashable

from . import messages
from .messages import Request

# What the agent still runs while frozen (qga/main.c: the freeze disables
# every other command with this reason).
ALLOWED_WHILE_FROZEN = frozenset(
    {
        "guest-ping",
        "guest-info",
        "guest-sync",
        "guest-sync-delimited",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
    }
)
FROZEN_REASON = "the agent is in frozen state"
FREEZE_COMMANDS = frozenset({"guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list"})

# A backup's snapshot takes seconds to minutes; Proxmox allows an hour for
# the freeze call itself. Ten minutes frozen is already an outage.
DEFAULT_MAX_FROZEN = 600.0


class FreezeGuard:
    def __init__(self, max_seconds: float = DEFAULT_MAX_FROZEN):
        self.max_seconds = max_seconds
        self.frozen = False
        self.owner: Hashable | None = None
        self.since: float | None = None
        self.thaw_requested = False

    def refuses(self, request: Request) -> bytes | None:
        """The agent's error for a command it will refuse while frozen."""
        if self.frozen and request.execute not in ALLOWED_WHILE_FROZEN:
            return messages.disabled_reply(request.execute, request.has_id, request.id, FROZEN_REASON)
        return None

    def on_reply(self, owner: Hashable, request: Request, value: dict, now: float) -> None:
        if "return" not in value:
            return
        command = request.execute
        if command in FREEZE_COMMANDS:
            if not self.frozen:
                self.frozen, self.owner, self.since = True, owner, now
            self.thaw_requested = False
        elif command == "guest-fsfreeze-thaw":
            self._thawed()
        elif command == "guest-fsfreeze-status":
            state: Any = value["return"]
            if state == "frozen" and not self.frozen:
                # Frozen before we knew (proxy restart, another host client):
                # nobody here owns it.
                self.frozen, self.owner, self.since = True, None, now
            elif state == "thawed":
                self._thawed()

    def _thawed(self) -> None:
        self.frozen = False
        self.owner = None
        self.since = None
        self.thaw_requested = False

    def deadline(self) -> float | None:
        if self.frozen and self.since is not None and not self.thaw_requested:
            return self.since + self.max_seconds
        return None

    def should_thaw(self, now: float, gone: Hashable | None = None) -> str | None:
        """Why a thaw is due now, or None."""
        if not self.frozen or self.thaw_requested:
            return None
        if self.owner is None:
            return "the guest is frozen and no client owns the freeze"
        if gone is not None and self.owner is gone:
            return "the client that froze the guest disconnected"
        if self.since is not None and now - self.since >= self.max_seconds:
            return "frozen for longer than %g seconds" % self.max_seconds
        return None

    def reset(self) -> None:
        """A new connection: what the agent says after the sync counts."""
        self.thaw_requested = False
