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

import array
import errno
import os
import socket
import stat
import sys
import termios
import tty

from typing import NamedTuple

import attrs
import trio


class AddressError(ValueError):
    pass


_KINDS = "unix:PATH, unix-listen:PATH, serial:PATH, tcp:HOST:PORT, vsock:CID:PORT or sim"


@attrs.frozen
class UpstreamAddress:
    kind: str  # "unix", "unix-listen", "serial", "tcp", "vsock" or "sim"
    path: str = ""  # unix, unix-listen, serial
    host: str = ""  # tcp
    port: int = 0  # tcp, vsock
    cid: int = 0  # vsock

    @classmethod
    def parse(cls, text: str) -> "UpstreamAddress":
        if text == "sim":
            return cls("sim")
        kind, sep, rest = text.partition(":")
        bad = AddressError("upstream %r: expected %s" % (text, _KINDS))
        if not sep or not rest:
            raise bad
        if kind in ("unix", "unix-listen", "serial"):
            return cls(kind, path=rest)
        if kind == "tcp":
            host, sep, port = rest.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise bad
            return cls(kind, host=host.strip("[]"), port=int(port))
        if kind == "vsock":
            cid, sep, port = rest.partition(":")
            if not sep or not cid.isdigit() or not port.isdigit():
                raise bad
            return cls(kind, cid=int(cid), port=int(port))
        raise bad

    def __str__(self) -> str:
        if self.kind == "sim":
            return "sim"
        if self.kind == "tcp":
            host = "[%s]" % self.host if ":" in self.host else self.host
            return "tcp:%s:%d" % (host, self.port)
        if self.kind == "vsock":
            return "vsock:%d:%d" % (self.cid, self.port)
        return "%s:%s" % (self.kind, self.path)


async def open_unix(path: str) -> trio.SocketStream:
    return await trio.open_unix_socket(path)


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream(host, port)
    # Notice a peer that vanished without a FIN (host crash, cable).
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return stream


async def open_vsock(cid: int, port: int) -> trio.SocketStream:
    """An agent listening on vsock in the guest (qemu-ga -m vsock-listen)."""
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError(errno.EAFNOSUPPORT, "vsock is not supported on this system")
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        await sock.connect((cid, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


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


class Peer(NamedTuple):
    """Who is at the other end of a client connection, as of accept."""

    pid: int
    uid: int
    gid: int
    exe: str | None  # the executable's base name, best effort


def peer(stream) -> Peer | None:
    """SO_PEERCRED and the peer's executable name."""
    creds = peer_credentials(stream)
    if creds is None:
        return None
    return Peer(creds[0], creds[1], creds[2], peer_executable(creds[0]))


def peer_executable(pid: int) -> str | None:
    """The base name of /proc/PID/exe; when that link may not be read (a
    process of another user, without CAP_SYS_PTRACE), /proc/PID/comm.
    Best effort, for logs, status and audit only: None if the process is
    already gone or hidden (a /proc with hidepid, as the shipped units'
    ProtectProc=invisible mounts it, shows no other user's processes)."""
    if pid <= 0:
        return None
    try:
        return os.path.basename(os.readlink("/proc/%d/exe" % pid))
    except OSError:
        pass
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip() or None
    except OSError:
        return None


#: Linux 4.13+ (asm-generic/socket.h); the socket module may not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)

#: getsockopt() takes at most 1024 bytes here: 256 groups. A peer with more
#: is looked up in /proc instead.
_PEERGROUPS_BUFLEN = 1024


def peer_groups(pid: int, gid: int, sock: socket.socket | None = None) -> frozenset:
    """A peer's primary and supplementary groups.

    The supplementary ones come from SO_PEERGROUPS on ``sock`` (as the peer
    had them at connect; it needs no /proc, which the shipped units'
    ProtectProc=invisible hides from the proxy for other users' processes),
    else from /proc/PID/status; if neither tells, only the primary counts."""
    groups = {gid}
    supplementary = _socket_groups(sock) if sock is not None else None
    if supplementary is None:
        supplementary = _proc_groups(pid)
    groups.update(supplementary)
    return frozenset(groups)


def _socket_groups(sock: socket.socket) -> list[int] | None:
    """SO_PEERGROUPS, or None where it is not to be had (an older kernel,
    not a unix socket, more groups than fit)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _PEERGROUPS_BUFLEN)
    except OSError:
        return None
    return list(array.array("I", raw[: len(raw) - len(raw) % 4]))


def _proc_groups(pid: int) -> list[int]:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []
