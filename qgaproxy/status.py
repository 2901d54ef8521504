"""Live status of one agent: what the proxy knows right now, as a value.

``build()`` turns the router's state (the upstream state machine, the
clients and what each waits for, the freeze guard, a few counters) into
plain JSON-ready data; ``render()`` turns that (for one agent or several)
into text for people. The proxy answers it to ``qgaproxy-status`` on any
client connection its listener's policy lets run it (STATUS_COMMAND),
and the metrics server serves it at ``GET /status``.

Pure functions: no I/O, no clock (callers pass the monotonic ``now`` the
router uses and the wall-clock ``wall`` that goes with it).

Keys are snake_case: the consumers are scripts (``jq .agents.vm1.state``).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:  # the router is not needed to ask for or render a status
    from .router import Router

#: The proxy's own command that answers the status.
STATUS_COMMAND = "qgaproxy-status"


def iso(wall: float) -> str:
    """UTC, ISO 8601 with milliseconds: 2026-11-22T00:30:01.123Z."""
    moment = datetime.datetime.fromtimestamp(wall, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


def peer_fields(peer: Any) -> dict:
    """pid, uid, gid and exe of a client's peer (None where unknown).

    peer: a transport.Peer, a (pid, uid, gid) tuple, or None."""
    fields: dict = {"pid": None, "uid": None, "gid": None, "exe": None}
    if peer is None:
        return fields
    for i, key in enumerate(("pid", "uid", "gid", "exe")):
        fields[key] = peer[i] if i < len(peer) else None
    return fields


def _client_ref(client) -> dict:
    ref = {"client": client.number, "listener": client.listener}
    ref.update(peer_fields(client.peer))
    return ref


def build(router: Router, *, name: str, listeners: Iterable[str], now: float, wall: float) -> dict:
    """The status of one agent.

    listeners: the listener names of the agent (so that a listener with no
    client shows, with none)."""
    upstream = router.upstream
    info = upstream.info
    waiting: dict = {}
    for call in router.outstanding():
        if call.client.internal:
            continue
        waiting.setdefault(call.client, []).append(
            {
                "command": call.request.execute,
                "state": "queued" if call.sent is None else "sent",
                "waiting_seconds": round(max(0.0, now - call.received), 3),
            }
        )
    by_listener: dict[str, list] = {name: [] for name in listeners}
    for client in router.clients:
        if client.internal or client.gone:
            continue
        entry = _client_ref(client)
        del entry["listener"]
        entry["requests"] = client.requests
        entry["in_flight"] = waiting.get(client, [])
        by_listener.setdefault(client.listener, []).append(entry)
    freeze = router.freeze
    frozen: dict = {"frozen": freeze.frozen}
    if freeze.frozen:
        owner = freeze.owner
        frozen["by"] = _client_ref(owner) if owner is not None and not getattr(owner, "internal", False) else None
        if freeze.since is not None:
            frozen["since"] = iso(wall - (now - freeze.since))
            frozen["seconds"] = round(max(0.0, now - freeze.since), 3)
    return {
        "agent": name,
        "state": upstream.state.value,
        "since": iso(router.state_since_wall),
        "state_seconds": round(max(0.0, wall - router.state_since_wall), 3),
        "version": info.version if info is not None else None,
        "echoes_id": info.echoes_id if info is not None else None,
        "connects": upstream.generation,
        "resyncs": router.resyncs,
        "timeouts": router.timeouts,
        "stale_replies": router.stale_replies,
        "in_flight": router.in_flight(),
        "queued": router.queued(),
        "freeze": frozen,
        "listeners": [
            {"name": listener, "clients": clients} for listener, clients in sorted(by_listener.items())
        ],
    }


def _who(ref: dict) -> str:
    exe = ref.get("exe") or "?"
    return "client %s (pid %s %s, uid %s) on %s" % (
        ref.get("client"),
        _or_q(ref.get("pid")),
        exe,
        _or_q(ref.get("uid")),
        ref.get("listener"),
    )


def _or_q(value) -> str:
    return "?" if value is None else str(value)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return "%.1fs" % seconds
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return "%dd%02dh%02dm" % (days, hours, minutes)
    if hours:
        return "%dh%02dm%02ds" % (hours, minutes, sec)
    return "%dm%02ds" % (minutes, sec)


def render_one(status: dict) -> str:
    """One agent's status as text for people."""
    lines = []
    version = status.get("version")
    lines.append(
        "agent %s: %s%s since %s (%s)"
        % (
            status["agent"],
            status["state"],
            " (qemu-ga %s)" % version if version else "",
            status["since"],
            _duration(status["state_seconds"]),
        )
    )
    lines.append(
        "  connects %d, resyncs %d, timeouts %d, stale replies %d; in flight %d, queued %d"
        % (
            status["connects"],
            status["resyncs"],
            status["timeouts"],
            status["stale_replies"],
            status["in_flight"],
            status["queued"],
        )
    )
    freeze = status["freeze"]
    if freeze["frozen"]:
        by = freeze.get("by")
        lines.append(
            "  FROZEN%s%s, by %s"
            % (
                " since %s" % freeze["since"] if "since" in freeze else "",
                " (%s)" % _duration(freeze["seconds"]) if "seconds" in freeze else "",
                _who(by) if by else "no client of this proxy",
            )
        )
    else:
        lines.append("  not frozen")
    for listener in status["listeners"]:
        clients = listener["clients"]
        lines.append("  listener %s: %d client%s" % (listener["name"], len(clients), "" if len(clients) == 1 else "s"))
        for c in clients:
            lines.append(
                "    client %s: pid %s %s, uid %s, gid %s; %d request%s"
                % (
                    c["client"],
                    _or_q(c["pid"]),
                    c["exe"] or "?",
                    _or_q(c["uid"]),
                    _or_q(c["gid"]),
                    c["requests"],
                    "" if c["requests"] == 1 else "s",
                )
            )
            for call in c["in_flight"]:
                lines.append(
                    "      %s %s for %s" % (call["command"], call["state"], _duration(call["waiting_seconds"]))
                )
    return "\n".join(lines)


def render(statuses: dict) -> str:
    """Several agents ({name: status}) as text, one block each."""
    return "\n\n".join(render_one(statuses[name]) for name in sorted(statuses)) + "\n"
