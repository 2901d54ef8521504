"""Access policy: who may connect to a listener, and which commands they
may run through it.

A listener's policy has
- ``allow`` and ``deny``: glob patterns of command names (fnmatch, case
  sensitive); a command runs only if it matches an allow pattern and no
  deny pattern: deny wins;
- ``peer_uids`` / ``peer_gids``: the peers (from SO_PEERCRED at accept)
  that may connect; empty means whoever the socket file's mode lets in;
- ``max_clients``: connections open at once on this listener.

Decisions only; no I/O. A denied command is answered in the agent's own
shape for a disabled command, with a reason naming this policy, so a
client can tell it apart from the agent's own block list.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

import attrs

# Commands that only read: what a monitoring socket may safely run.
READ_ONLY = (
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-get-*",
    "guest-network-get-interfaces",
    "guest-fsfreeze-status",
    "guest-ssh-get-authorized-keys",
)


def _compile(patterns: Iterable[str]) -> re.Pattern | None:
    patterns = list(patterns)
    if not patterns:
        return None
    return re.compile("|".join("(?:%s)" % fnmatch.translate(p) for p in patterns))


@attrs.frozen
class Policy:
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    peer_uids: tuple[int, ...] = ()
    peer_gids: tuple[int, ...] = ()
    max_clients: int = 1024
    name: str = ""  # the listener's name, for the denial reason
    _allow_re: re.Pattern | None = attrs.field(init=False, repr=False, eq=False)
    _deny_re: re.Pattern | None = attrs.field(init=False, repr=False, eq=False)
    # Decisions made so far: the same few commands, over and over.
    _decided: dict = attrs.field(init=False, repr=False, eq=False, factory=dict)

    def __attrs_post_init__(self):
        object.__setattr__(self, "_allow_re", _compile(self.allow))
        object.__setattr__(self, "_deny_re", _compile(self.deny))

    def allows(self, command: str) -> bool:
        decided = self._decided.get(command)
        if decided is not None:
            return decided
        if self._deny_re is not None and self._deny_re.match(command):
            decided = False
        else:
            decided = self._allow_re is not None and self._allow_re.match(command) is not None
        if len(self._decided) < 1024 and len(command) <= 128:  # names come from clients
            self._decided[command] = decided
        return decided

    def denial_reason(self) -> str:
        return "denied by qgaproxy policy of listener '%s'" % self.name

    def admits(self, uid: int | None, gids: frozenset = frozenset()) -> bool:
        """Whether a peer with this uid and these groups (primary and
        supplementary) may connect."""
        if not self.peer_uids and not self.peer_gids:
            return True
        if uid is None:
            return False  # credentials unknown: a restricted listener refuses
        if uid in self.peer_uids:
            return True
        return any(gid in self.peer_gids for gid in gids)


OPEN = Policy()
