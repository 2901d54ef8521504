"""Capability negotiation for clients, which qemu-ga itself never got.

Two listener protocols:

``qga`` (default): today's agent protocol, unchanged for old clients.
A modern client may send ``{"execute": "request-negotiation"}`` (the
command proposed on qemu-devel in 2022) and gets the greeting as the
return value; it then selects with ``qmp_capabilities`` (``{"enable":
[...]}``) and gets ``{"return": {}}`` or an error naming the capability,
and may try again. One offer, one selection, one answer: no modes.

``qmp``: QMP as its specification says: the greeting on connect,
``qmp_capabilities`` before anything else, so that standard QMP clients
(qemu.qmp's QMPClient, qmp-shell without -N) talk to the guest agent
unmodified.

Capabilities are the proxy's own, each off unless selected:
- ``agent-events``: QMP events when the agent becomes available
  (AGENT_AVAILABLE), unavailable (AGENT_UNAVAILABLE), and when the channel
  was resynced after a timeout (AGENT_RESYNCED). Only clients that
  selected it get them.

Negotiated clients (either way) also get ``query-agent``: the channel's
state, since when, the agent's version and commands, answered by the
proxy: a client can learn all that without a guest round trip.

Decisions and message bodies only; no I/O.
"""

from __future__ import annotations

import re
from typing import Any

from . import __version__, messages
from .messages import Request

CAPABILITIES = ("agent-events",)

EXPECTING = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY = "Capabilities negotiation is already complete, command ignored"


def greeting(agent_version: str | None) -> dict:
    numbers = [int(n) for n in re.findall(r"\d+", agent_version or "")[:3]]
    numbers += [0] * (3 - len(numbers))
    return {
        "QMP": {
            "version": {
                "qemu": {"major": numbers[0], "minor": numbers[1], "micro": numbers[2]},
                "package": "qemu-ga %s via qgaproxy %s" % (agent_version or "(not yet known)", __version__),
            },
            "capabilities": list(CAPABILITIES),
        }
    }


def select(request: Request) -> tuple[set[str] | None, bytes | None]:
    """qmp_capabilities: (the capabilities chosen, None) or (None, error)."""
    args = request.arguments or {}
    unexpected = [key for key in args if key != "enable"]
    if unexpected:
        return None, messages.error_reply(
            messages.GENERIC_ERROR, "Parameter '%s' is unexpected" % unexpected[0], request.has_id, request.id
        )
    enable = args.get("enable", [])
    if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
        return None, messages.error_reply(
            messages.GENERIC_ERROR, "Invalid parameter type for 'enable', expected: array", request.has_id, request.id
        )
    for capability in enable:
        if capability not in CAPABILITIES:
            return None, messages.error_reply(
                messages.GENERIC_ERROR,
                "Capability '%s' is not available (offered: %s)" % (capability, ", ".join(CAPABILITIES)),
                request.has_id,
                request.id,
            )
    return set(enable), None


def event(name: str, data: dict, wall: float) -> bytes:
    seconds = int(wall)
    body: dict[str, Any] = {
        "event": name,
        "data": data,
        "timestamp": {"seconds": seconds, "microseconds": int((wall - seconds) * 1e6)},
    }
    return messages.qjson.dumpb(body) + b"\n"
