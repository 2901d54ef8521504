"""The systemd notify protocol, without a dependency (see sd_notify(3)).

A service started with ``Type=notify`` (or ``notify-reload``) finds in
``$NOTIFY_SOCKET`` the address of a unix datagram socket owned by the
service manager, and sends it one datagram per state change: newline
separated ``VARIABLE=value`` assignments, UTF-8, nothing else. An address
that starts with ``@`` is in the abstract namespace (the ``@`` stands for
a leading NUL byte). The ones systemd acts on and that we use:

``READY=1``
    start-up is finished; for ``Type=notify`` systemd considers the
    service started only now (and starts what is ordered after it).
``RELOADING=1``
    a reload (SIGHUP) began; ``READY=1`` must follow when it is done.
    systemd >= 253 with ``Type=notify-reload`` also wants
    ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, in microseconds) in the same
    message so it can tell this reload from an older one.
``STOPPING=1``
    shutdown began (on SIGTERM, while draining).
``STATUS=text``
    one line shown by ``systemctl status``.
``WATCHDOG=1``
    keep-alive when the unit has ``WatchdogSec=``: it must come more often
    than ``$WATCHDOG_USEC`` (the manager's interval) or the service is
    killed. ``$WATCHDOG_PID``, when set, names the process meant.

Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op that
returns False. A failed send is never an error for the service: it is
reported as False, never raised.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["notify", "ready", "reloading", "stopping", "status", "watchdog", "watchdog_interval"]


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to $NOTIFY_SOCKET.

    True when the datagram was sent; False when $NOTIFY_SOCKET is unset or
    empty or the send failed. Never raises for those."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        # sd_notify(3) also knows vsock:CID:PORT (systemd >= 253); a unix
        # path must be absolute. Anything else: not for us.
        return False
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError:
        return False
    try:
        sock.sendto(state.encode("utf-8"), address)
        return True
    except (OSError, ValueError):
        return False
    finally:
        sock.close()


def _line(text: str) -> str:
    # One assignment is one line: a newline in the text would start another.
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Start-up (or a reload) is done: ``READY=1`` (+ ``STATUS=``)."""
    return notify("READY=1" + ("\nSTATUS=" + _line(status) if status is not None else ""))


def reloading() -> bool:
    """A reload began: ``RELOADING=1`` and ``MONOTONIC_USEC=`` (now)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1\nMONOTONIC_USEC=%d" % usec)


def stopping() -> bool:
    """Shutdown began: ``STOPPING=1``."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status for ``systemctl status``: ``STATUS=text``."""
    return notify("STATUS=" + _line(text))


def watchdog() -> bool:
    """The watchdog keep-alive: ``WATCHDOG=1``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """The watchdog interval in seconds ($WATCHDOG_USEC), or None when the
    watchdog is off, the value is not a positive integer, or $WATCHDOG_PID
    names another process. Send watchdog() at about half of it."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000
