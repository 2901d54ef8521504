"""Opening the agent channel and the client listeners.

Upstream addresses:
    unix:PATH    connect to QEMU's ``-chardev socket,server=on`` (or to
                 ``qemu-ga -m unix-listen``).
    serial:PATH  a character device or pty, put in raw mode. It has no
                 connection semantics at all: nothing tells us the other
                 side went away, only silence.
    sim          the embedded simulated agent (qgaproxy.sim).

This module opens things and sets them up safely (socket modes, stale
socket files); it decides nothing about the protocol.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import termios
import tty

import attrs
import trio


class AddressError(ValueError):
    pass


@attrs.frozen
class UpstreamAddress:
    kind: str  # "unix", "serial" or "sim"
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> "UpstreamAddress":
        if text == "sim":
            return cls("sim")
        kind, sep, path = text.partition(":")
        if not sep or kind not in ("unix", "serial") or not path:
            raise AddressError(
                "upstream %r: expected unix:PATH, serial:PATH or sim" % text
            )
        return cls(kind, path)

    def __str__(self) -> str:
        return self.kind if self.kind == "sim" else "%s:%s" % (self.kind, self.path)


async def open_unix(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def open_serial(path: str) -> trio.lowlevel.FdStream:
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if os.isatty(fd):
            # Raw: no echo, no line editing, no CR/LF translation; bytes are
            # bytes, as the agent's own isa-serial mode expects.
            tty.setraw(fd, termios.TCSANOW)
    except BaseException:
        os.close(fd)
        raise
    return trio.lowlevel.FdStream(fd)  # it owns (and closes) the descriptor


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a process that died; refuse to take
    the path from a live one or to delete anything that is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "%s: another process is listening there" % path)


async def open_unix_listener(
    path: str, mode: int = 0o660, owner: int | None = None, group: int | None = None, backlog: int = 128
) -> trio.SocketListener:
    """A listening unix socket whose file never exists with a looser mode
    than ``mode`` (the umask covers the window between bind and chmod)."""
    _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        await sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    try:
        if owner is not None or group is not None:
            os.chown(path, -1 if owner is None else owner, -1 if group is None else group)
        os.chmod(path, mode)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        os.unlink(path)
        raise
    return trio.SocketListener(sock)


def peer_credentials(stream) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of a unix-socket peer, from SO_PEERCRED."""
    sock = getattr(stream, "socket", None)
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    import struct

    return struct.unpack("3i", raw)
