"""The upstream state machine: one agent channel, from connect to ready.

States (the only ones; the router reads them to decide what a request
gets):

    connecting   no channel (QEMU not started, restarted, socket gone).
                 Requests fail fast; a connection is retried with backoff.
    syncing      a channel is open and the first sync is outstanding:
                 0xFF + guest-sync-delimited with a fresh random id, then
                 guest-info to learn the agent. Requests wait.
    ready        synced and learned: requests flow, pipelined.
    resyncing    a request timed out, or a command that never answers was
                 sent: everything up to the new sync reply is suspect.
                 Requests wait.
    unavailable  a sync went unanswered for sync_timeout (no agent in the
                 guest, guest booting or paused, agent hung). Requests
                 fail fast. Syncs keep being retried with backoff, and the
                 reply to the *latest* one makes the channel ready again at
                 any time, so a returning agent is served at once.

    connecting --connected--> syncing --sync+info--> ready
    ready --timeout/no-reply command--> resyncing --sync+info--> ready
    syncing/resyncing --sync_timeout--> unavailable --sync+info--> ready
    any --connection lost--> connecting

Why a sync is accepted only by its latest id: earlier syncs may still be
queued in QEMU's buffer and be answered later; taking an older one would
leave the newer ones' replies in the stream, where an agent that does not
echo ids would have them mistaken for replies to requests.

Writes: while QEMU is not reading (no agent), a write can block for ever.
The machine never queues a sync while a write is still in progress; the
caller tells it when a write completes.

No I/O and no clock here: callers pass ``now`` and ask for deadlines.
"""

from __future__ import annotations

import enum
import random
from typing import Any, Mapping

import attrs

from . import messages


class State(enum.Enum):
    CONNECTING = "connecting"
    SYNCING = "syncing"
    READY = "ready"
    RESYNCING = "resyncing"
    UNAVAILABLE = "unavailable"


# The states every request is checked against, as plain names: an Enum
# member looked up on its class costs about 170 ns in Python 3.11.
_READY = State.READY
_WAITABLE = (State.READY, State.SYNCING, State.RESYNCING)


@attrs.frozen
class CommandInfo:
    enabled: bool
    success_response: bool


@attrs.frozen
class AgentInfo:
    """What guest-info told us, plus what we detected."""

    version: str | None
    commands: Mapping[str, CommandInfo]
    echoes_id: bool

    def success_response(self, command: str) -> bool:
        info = self.commands.get(command)
        if info is None:
            return command not in messages.NO_REPLY_COMMANDS
        return info.success_response

    def has_command(self, command: str) -> bool:
        return command in self.commands


@attrs.frozen
class Timings:
    # How long a sync may stay unanswered before requests fail fast. A
    # healthy agent answers in well under a millisecond on the host and
    # about 1.5 ms in a TCG VM; a second leaves room for a loaded guest.
    sync_timeout: float = 1.0
    # Backoff between connection attempts, doubling up to the cap; syncs
    # are re-sent from sync_timeout doubling up to the same cap.
    backoff_min: float = 0.1
    backoff_max: float = 5.0


class Upstream:
    def __init__(self, timings: Timings = Timings(), rng: random.Random | None = None):
        self.timings = timings
        self._rng = rng or random.SystemRandom()
        self.state = State.CONNECTING
        self.info: AgentInfo | None = None
        self.since: float = 0.0  # when the state last changed
        self.generation = 0  # bumps on every new connection
        self.resync_reason: str | None = None
        self.last_resync_reason: str | None = None  # why the last (re)sync happened
        self.use_delimited = True
        # sync bookkeeping
        self._phase: str | None = None  # "sync", "info" or None
        self.sync_id: int | None = None
        self._info_id: int | None = None
        self._unavailable_at: float | None = None
        self._retry_at: float | None = None
        self._retry_delay = timings.sync_timeout
        self._sync_wanted: bool | None = None
        self._outbox: list[bytes] = []
        self.writing = False
        # connect backoff
        self._connect_backoff = timings.backoff_min
        self.reconnect_at: float = 0.0
        self.syncs_sent = 0

    # -- queries -----------------------------------------------------------
    @property
    def syncing(self) -> bool:
        return self._phase is not None

    def accepts_requests(self) -> bool:
        """Whether requests may wait for the channel (else they fail fast)."""
        return self.state in _WAITABLE

    def can_send_requests(self) -> bool:
        return self.state is _READY and self._phase is None

    def next_deadline(self) -> float | None:
        a, b = self._unavailable_at, self._retry_at
        if a is None:
            return b
        return a if b is None or a < b else b

    def take_outbox(self) -> bytes:
        data = b"".join(self._outbox)
        self._outbox.clear()
        return data

    def has_outbox(self) -> bool:
        return bool(self._outbox)

    # -- transitions ---------------------------------------------------------
    def _set(self, state: State, now: float) -> State:
        old = self.state
        if state is not old:
            self.state = state
            self.since = now
        return old

    def connected(self, now: float) -> None:
        self.generation += 1
        self._retry_delay = self.timings.sync_timeout
        self._sync_wanted = None
        self.use_delimited = True
        self._outbox.clear()
        self.writing = False
        self._set(State.SYNCING, now)
        self.resync_reason = "connect"
        self._start_sync(now, sentinel=True)
        self._unavailable_at = now + self.timings.sync_timeout

    def lost(self, now: float) -> None:
        """The channel closed or failed; schedule a reconnect."""
        self._set(State.CONNECTING, now)
        self._phase = None
        self.sync_id = None
        self._info_id = None
        self._unavailable_at = None
        self._retry_at = None
        self._outbox.clear()
        self._sync_wanted = None
        self.writing = False
        self.reconnect_at = now + self._connect_backoff
        self._connect_backoff = min(self._connect_backoff * 2, self.timings.backoff_max)

    def connect_failed(self, now: float) -> None:
        self.lost(now)

    def resync(self, now: float, reason: str, sentinel: bool = True) -> None:
        """Start a resync (after a timeout, or after a no-reply command)."""
        if self.state is State.CONNECTING:
            return
        self.resync_reason = reason
        if self.state is State.READY:
            self._set(State.RESYNCING, now)
            self._unavailable_at = now + self.timings.sync_timeout
        self._retry_delay = self.timings.sync_timeout
        self._start_sync(now, sentinel=sentinel)

    def _start_sync(self, now: float, sentinel: bool) -> None:
        self._phase = "sync"
        self._info_id = None
        if self.writing:
            # A write is stuck (QEMU not reading): queue nothing more; the
            # sync goes out as soon as that write completes.
            self._sync_wanted = sentinel
            self._retry_at = None
            return
        self._sync_wanted = None
        self.sync_id = self._rng.randrange(1, 1 << 62)
        command = "guest-sync-delimited" if self.use_delimited else "guest-sync"
        data = messages.encode_request(command, {"id": self.sync_id}, has_id=False)
        self._outbox.append((b"\xff" if sentinel else b"") + data)
        self.syncs_sent += 1
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.timings.backoff_max)

    def write_started(self) -> None:
        self.writing = True

    def write_done(self, now: float) -> None:
        self.writing = False
        if self._phase == "sync" and self._sync_wanted is not None:
            self._start_sync(now, sentinel=self._sync_wanted)

    def tick(self, now: float) -> State | None:
        """Advance timers. Returns the previous state if it changed."""
        changed = None
        if self._unavailable_at is not None and now >= self._unavailable_at:
            self._unavailable_at = None
            if self.state in (State.SYNCING, State.RESYNCING):
                changed = self._set(State.UNAVAILABLE, now)
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            if self._phase is not None:
                # Unanswered: maybe lost (agent restarted mid-read). Send a
                # fresh one; the reply to the newest is the one we take.
                self._start_sync(now, sentinel=True)
        return changed

    # -- replies during a sync -------------------------------------------------
    def on_reply(self, value: Any, now: float) -> tuple[bool, State | None]:
        """Offer a decoded reply while syncing.

        Returns (consumed, previous state if the state changed)."""
        if self._phase is None or not isinstance(value, dict):
            return False, None
        if self._phase == "sync":
            if self.sync_id is not None and "id" not in value and value.get("return") == self.sync_id:
                self._phase = "info"
                self._info_id = self._rng.randrange(1, 1 << 62)
                self._outbox.append(messages.encode_request("guest-info", None, self._info_id))
                # A timer of its own: an agent gone before its guest-info
                # reply (stopped or restarted inside the guest, the channel
                # still open) is synced again.
                self._retry_at = now + self._retry_delay
                return True, None
            error = value.get("error")
            if (
                self.use_delimited
                and isinstance(error, dict)
                and error.get("class") == messages.COMMAND_NOT_FOUND
                and "guest-sync-delimited" in str(error.get("desc", ""))
                and "id" not in value
            ):
                # An agent without guest-sync-delimited: fall back.
                self.use_delimited = False
                self._start_sync(now, sentinel=False)
                return True, None
            # Anything else is for the router to judge (a reply to a request
            # still in flight, or stale: the 0xFF's stray error included).
            return False, None
        if self._phase == "info":
            if self._info_id is not None and value.get("id") == self._info_id:
                return True, self._learned(value, echoes=True, now=now)
            if "id" in value:
                return False, None  # some in-flight request's reply
            error = value.get("error")
            if isinstance(error, dict) and "'id'" in str(error.get("desc", "")) and self._info_id is not None:
                # A pre-4.0 agent rejecting the id member: ask again without.
                self._info_id = None
                self._outbox.append(messages.encode_request("guest-info", None, has_id=False))
                return True, None
            return True, self._learned(value, echoes=False, now=now)
        return False, None

    def _learned(self, value: dict, echoes: bool, now: float) -> State | None:
        commands: dict[str, CommandInfo] = {}
        version = None
        result = value.get("return")
        if isinstance(result, dict):
            version = result.get("version") if isinstance(result.get("version"), str) else None
            for item in result.get("supported_commands") or ():
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    commands[item["name"]] = CommandInfo(
                        enabled=bool(item.get("enabled", True)),
                        success_response=bool(item.get("success-response", True)),
                    )
        self.info = AgentInfo(version, commands, echoes)
        self._phase = None
        self.sync_id = None
        self._info_id = None
        self._unavailable_at = None
        self._retry_at = None
        self._retry_delay = self.timings.sync_timeout
        self._connect_backoff = self.timings.backoff_min
        self.last_resync_reason = self.resync_reason
        self.resync_reason = None
        return self._set(State.READY, now)
