"""Run the real QEMU guest agent (qemu-ga) for tests, and talk to it directly.

Plain synchronous code (no trio), so it can be used from pytest fixtures, from
trio tests (start/stop are quick) and from scripts such as tests/wire/capture.py.

    with RealAgent() as agent:
        reply = qga_request(agent.path, b'{"execute": "guest-ping", "id": 1}\\n')

The agent runs as::

    setpriv --reuid=nobody --regid=nogroup --clear-groups \\
        qemu-ga -m unix-listen -p SOCK -t STATEDIR -l LOGFILE -b BLOCKLIST [-v]

in a fresh temporary directory owned by nobody (when not run as root, setpriv
cannot switch users and qemu-ga runs as the current user instead).  BLOCKLIST is
every command listed by ``qemu-ga -b help`` except the harmless ones in ``ALLOW``.

Things to know about qemu-ga 7.2 in unix-listen mode (see /work/shared/PROTOCOL.md
and tests/wire/FINDINGS.md):

* it serves ONE client at a time; a second connect succeeds but waits;
* it EXITS (rc 0) when a client closes while a reply is still unread (the
  close resets the socket, the agent's next read fails with ECONNRESET and it
  stops), so read every reply you asked for before closing
  (``AgentConn.close(drain=True)``);
* its JSON parser state is global to the process, not per connection: start a
  conversation with ``AgentConn.sync()`` (0xFF + guest-sync-delimited).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import grp
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

QEMU_GA = os.environ.get("QEMU_GA", "/usr/sbin/qemu-ga")

#: Commands that stay enabled: read-only queries, and file access (confined to
#: what user nobody may touch).  Everything else `qemu-ga -b help` prints is
#: blocked.
ALLOW = frozenset(
    {
        "guest-sync-delimited",
        "guest-sync",
        "guest-ping",
        "guest-info",
        "guest-get-time",
        "guest-get-host-name",
        "guest-get-timezone",
        "guest-get-osinfo",
        "guest-get-users",
        "guest-get-vcpus",
        "guest-network-get-interfaces",
        "guest-get-fsinfo",
        "guest-get-disks",
        "guest-get-diskstats",
        "guest-get-cpustats",
        "guest-get-memory-block-info",
        "guest-get-devices",
        "guest-file-open",
        "guest-file-close",
        "guest-file-read",
        "guest-file-write",
        "guest-file-seek",
        "guest-file-flush",
    }
)

#: These must end up blocked, whatever the agent version lists.
MUST_BLOCK = ("guest-shutdown", "guest-exec", "guest-exec-status", "guest-set-time")
MUST_BLOCK_PREFIXES = ("guest-suspend-", "guest-fsfreeze-")

READY_TIMEOUT = 10.0

#: What qemu-ga 7.2 answers to a lone 0xFF (and so to every sync's 0xFF).
STRAY_FF = (b'{"error": {"class": "GenericError", "desc": '
            b'"JSON parse error, stray \'\\uFFFD\'"}}\n')


class AgentUnavailable(RuntimeError):
    """qemu-ga or setpriv is not installed (tests skip, or fail when CI=true)."""


def unavailable_reason() -> str | None:
    """Why the real agent cannot be run here, or None if it can."""
    if not os.access(QEMU_GA, os.X_OK):
        return f"{QEMU_GA} not found (apt-get install qemu-guest-agent)"
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        return "setpriv not found (apt-get install util-linux)"
    return None


@contextlib.contextmanager
def readable_by_agent(name: str, content: bytes):
    """A file the real agent (user nobody) can read: world-readable, in a
    world-accessible folder of its own (removed after). Yields its path."""
    tmp = tempfile.mkdtemp(prefix="qgaproxy-file-")
    try:
        os.chmod(tmp, 0o755)
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o644)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def require_real_agent() -> None:
    """pytest.skip() if the real agent cannot run; pytest.fail() instead when CI=true."""
    reason = unavailable_reason()
    if reason is None:
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the real agent is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def list_commands(binary: str = QEMU_GA) -> list[str]:
    """Every command this qemu-ga knows, from `qemu-ga -b help`."""
    out = subprocess.run(
        [binary, "-b", "help"], check=True, capture_output=True, text=True, timeout=10
    ).stdout
    cmds = [line.strip() for line in out.splitlines() if line.strip()]
    if not cmds or not all(c.startswith("guest-") for c in cmds):
        raise RuntimeError(f"unexpected output from {binary} -b help: {out!r}")
    return cmds


def compute_blocklist(commands: list[str], allow=ALLOW) -> list[str]:
    blocked = [c for c in commands if c not in allow]
    bs = set(blocked)
    for c in MUST_BLOCK:
        assert c in bs, f"{c} must be blocked"
    for c in commands:
        if c.startswith(MUST_BLOCK_PREFIXES):
            assert c in bs, f"{c} must be blocked"
    # The prefixes must match something, or the agent's command set changed.
    assert any(c.startswith("guest-fsfreeze-") for c in bs), commands
    assert any(c.startswith("guest-suspend-") for c in bs), commands
    return blocked


class RealAgent:
    """One qemu-ga process listening on a unix socket in its own temp dir.

    Attributes (valid after start()): ``path`` (socket), ``proc``
    (subprocess.Popen), ``log_path``, ``statedir``, ``tmpdir`` (all Path
    objects except proc), ``blocked`` (list of blocked commands).
    ``restart()`` starts a new agent in a NEW temporary directory: re-read
    ``.path`` afterwards.  ``verbose=True`` (-v) logs every read and write;
    set QGA_KEEP_TMPDIR=1 to keep the directory (and log) after stop().
    """

    def __init__(self, *, verbose: bool = True, ready_timeout: float = READY_TIMEOUT,
                 extra_args: tuple[str, ...] = ()):
        self.verbose = verbose
        self.ready_timeout = ready_timeout
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.tmpdir: Path | None = None
        self.path: Path | None = None
        self.statedir: Path | None = None
        self.log_path: Path | None = None
        self.blocked: list[str] = []
        self._keep_tmpdir = False

    # -- lifecycle -------------------------------------------------------

    def start(self) -> "RealAgent":
        if self.proc is not None:
            raise RuntimeError("already started")
        reason = unavailable_reason()
        if reason:
            raise AgentUnavailable(reason)
        self.blocked = compute_blocklist(list_commands())

        # A fresh directory that nobody can use: /tmp (or $TMPDIR) is
        # traversable by everyone; mkdtemp makes it 0700, so hand it over.
        self.tmpdir = Path(tempfile.mkdtemp(prefix="qga-real-"))
        self.statedir = self.tmpdir / "state"
        self.statedir.mkdir()
        self.path = self.tmpdir / "qga.sock"
        self.log_path = self.tmpdir / "qemu-ga.log"
        prefix: list[str] = []
        if os.geteuid() == 0:
            uid = pwd.getpwnam("nobody").pw_uid
            gid = grp.getgrnam("nogroup").gr_gid
            for p in (self.tmpdir, self.statedir):
                os.chown(p, uid, gid)
            os.chmod(self.tmpdir, 0o755)  # root (the test) reads the log
            prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        # else: not root, setpriv cannot switch user; the agent runs as the
        # current (already unprivileged) user.

        argv = prefix + [
            QEMU_GA,
            "-m", "unix-listen",
            "-p", str(self.path),
            "-t", str(self.statedir),
            "-l", str(self.log_path),
            "-b", ",".join(self.blocked),
        ]
        if self.verbose:
            argv.append("-v")
        argv += list(self.extra_args)
        self.argv = argv
        # Ignore any /etc/qemu/qemu-ga.conf (it could add methods, paths or
        # block lists): QGA_CONF names a config file that does not exist.
        env = dict(os.environ, QGA_CONF=str(self.tmpdir / "no-such-qemu-ga.conf"))
        self._out = open(self.tmpdir / "stdout.txt", "wb")
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=self.tmpdir,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self._keep_tmpdir = True
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Wait until the socket exists and accepts a connection.

        The probe sends nothing: the agent exits if a client leaves with a
        reply unread, and anything sent would also touch its parser state.
        """
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.001
        last_err: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"qemu-ga exited with rc {self.proc.returncode} during startup\n"
                    + self.read_log()
                )
            if self.path.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.path))
                    return
                except OSError as e:  # bound but not yet listening
                    last_err = e
                finally:
                    s.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"qemu-ga not ready after {self.ready_timeout}s ({last_err})\n"
                    + self.read_log()
                )
            time.sleep(delay)  # poll interval while waiting on the state
            delay = min(delay * 2, 0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate, wait, kill if needed.  Returns the exit status."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGTERM)
                    rc = self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    rc = self.proc.wait()
            rc = self.proc.returncode
        if getattr(self, "_out", None) is not None:
            self._out.close()
            self._out = None
        if self.tmpdir is not None and not self._keep_tmpdir and not os.environ.get(
            "QGA_KEEP_TMPDIR"
        ):
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        return rc

    def restart(self) -> "RealAgent":
        self.stop()
        self.proc = None
        self._keep_tmpdir = False
        return self.start()

    def read_log(self) -> str:
        out = []
        for p in (self.log_path, self.tmpdir / "stdout.txt" if self.tmpdir else None):
            if p is not None and p.exists():
                out.append(f"--- {p.name} ---\n" + p.read_text(errors="replace")[-20000:])
        return "\n".join(out)

    def connect(self, timeout: float = 5.0) -> "AgentConn":
        return AgentConn(self.path, timeout=timeout)

    def __enter__(self) -> "RealAgent":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "alive" if self.alive() else "stopped"
        return f"<RealAgent {self.path} {state}>"


# -- talking to it directly ------------------------------------------------


class AgentConn:
    """A plain blocking unix-socket connection to an agent (real or proxy).

    All reads are bounded by ``timeout`` seconds (raising TimeoutError with
    the bytes received so far in ``.partial``).  Replies are raw bytes.
    """

    def __init__(self, path, timeout: float = 5.0):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = bytearray()
        self._sync_id = int(time.time() * 1000) % 1_000_000_000 * 1000

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """Read once into buf; False on EOF.  Raises TimeoutError at deadline."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout(self.buf)
        r, _, _ = select.select([self.sock], [], [], left)
        if not r:
            raise _timeout(self.buf)
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def recv_lines(self, n: int = 1, timeout: float | None = None) -> bytes:
        """Read until n newline-terminated replies; return exactly those bytes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        end = 0
        for _ in range(n):
            while True:
                i = self.buf.find(b"\n", end)
                if i >= 0:
                    end = i + 1
                    break
                if not self._fill(deadline):
                    raise EOFError(f"EOF after {bytes(self.buf)!r}")
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def recv_until_delimited(self, sync_id=None, timeout: float | None = None) -> bytes:
        """Read through a 0xFF-delimited sync reply; return everything up to and
        including its newline.  With sync_id, wait for ``\\xff{"return": sync_id}\\n``
        exactly (an earlier 0xFF with another id is just data)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        want = None if sync_id is None else b'\xff{"return": %d}\n' % sync_id
        while True:
            if want is not None:
                i = self.buf.find(want)
                if i >= 0:
                    end = i + len(want)
                    break
            else:
                i = self.buf.find(b"\xff")
                j = self.buf.find(b"\n", i) if i >= 0 else -1
                if j >= 0:
                    end = j + 1
                    break
            if not self._fill(deadline):
                raise EOFError(f"EOF after {bytes(self.buf)!r}")
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def sync(self, timeout: float | None = None) -> bytes:
        """Reset the agent's parser and drop stale data: send 0xFF +
        guest-sync-delimited with a fresh id, read through its reply.  Returns
        the bytes received before the sync reply: always at least the agent's
        error for the 0xFF itself (``STRAY_FF``), preceded by replies nobody
        read and complaints about earlier input, if any."""
        self._sync_id += 1
        sid = self._sync_id
        self.send(
            b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' % sid
        )
        got = self.recv_until_delimited(sid, timeout)
        return got[: -len(b'\xff{"return": %d}\n' % sid)]

    def request(self, payload: bytes, n: int = 1, timeout: float | None = None) -> bytes:
        self.send(payload)
        return self.recv_lines(n, timeout)

    def close(self, drain: bool = False, quiet: float = 0.2) -> None:
        """Close.  With drain=True first read until the agent has been quiet
        for `quiet` seconds, so no unread reply makes qemu-ga 7.2 exit."""
        if drain:
            try:
                self.sock.settimeout(quiet)
                while self.sock.recv(1 << 20):
                    pass
            except (TimeoutError, OSError):
                pass
        self.sock.close()

    def __enter__(self) -> "AgentConn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _timeout(buf) -> TimeoutError:
    e = TimeoutError(f"timed out; received so far: {bytes(buf)[:2000]!r}")
    e.partial = bytes(buf)
    return e


def qga_request(path, payload: bytes, n: int = 1, *, delimited: bool = False,
                sync_id=None, timeout: float = 5.0) -> bytes:
    """Connect, write payload, read n newline-terminated replies (or, with
    delimited=True, through the first 0xFF-delimited reply, optionally the one
    with sync_id), close, and return the raw bytes read."""
    with AgentConn(path, timeout=timeout) as c:
        c.send(payload)
        if delimited:
            return c.recv_until_delimited(sync_id)
        return c.recv_lines(n)


def json_lines(raw: bytes) -> list:
    """Decode newline-separated replies (a leading 0xFF is dropped)."""
    return [json.loads(line.lstrip(b"\xff")) for line in raw.split(b"\n") if line.strip()]
