"""A real QEMU VM (TCG) running the real qemu-ga, for tests.

Plain synchronous code (no trio), like tests/realagent.py.  The guest is built
and cached by tests/vm/build.sh (kernel + initramfs with busybox and the host's
qemu-ga); see the header of that script for what runs inside.

    with VM() as vm:                       # boots; returns when the agent is up
        conn = AgentConn(vm.agent_sock)    # tests/realagent.py
        conn.sync()
        vm.control("agent-kill")           # the guest's restart loop brings it back
        vm.qmp("stop"); vm.qmp("cont")

QEMU runs as::

    qemu-system-x86_64 -machine q35,accel=tcg -bios /usr/share/qemu/qboot.rom
        -m 256 -smp 1 -no-reboot -kernel K -initrd I
        -append 'console=ttyS0 quiet panic=-1' -nic none -display none
        -monitor none -serial unix:CONSOLE_SOCK,server=on,wait=off
        -chardev socket,path=AGENT_SOCK,server=on,wait=off,id=qga0
        -device virtio-serial-pci
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
        -qmp unix:QMP_SOCK,server=on,wait=off

in a fresh temporary directory (set QGAPROXY_VM_KEEP=1 to keep it: it holds
console.log and qemu.log).  Things to know (see /work/shared/PROTOCOL.md):

* the agent chardev serves ONE client at a time; the others wait, unserved;
* while the guest has not opened the port (booting, agent stopped or
  restarting) QEMU does not read the agent socket: writes pile up and are
  delivered when the agent opens the port; silence is the only symptom;
* the agent's parser state outlives host connections: begin with a sync;
* ``-no-reboot`` turns every reset into an exit: a guest reboot, a kernel
  panic (panic=-1) and QMP ``system_reset`` all make QEMU exit (use
  ``VM(no_reboot=False)`` to get real resets);
* the serial console is the control channel (VM.control); the helper keeps
  it connected from launch on, because QEMU drops console output while no
  client is connected.
"""

from __future__ import annotations

import atexit
import codecs
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

try:
    from realagent import AgentConn
except ImportError:  # used as a script, or from tests/vm only
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from realagent import AgentConn

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
QEMU = os.environ.get("QEMU_SYSTEM", "qemu-system-x86_64")
QBOOT = "/usr/share/qemu/qboot.rom"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"

#: Bounds (seconds).  They only turn a hang into a failure; TCG on a loaded CI
#: machine is slow, so they are generous.
BOOT_TIMEOUT = float(os.environ.get("QGAPROXY_VM_BOOT_TIMEOUT", "90"))
CONTROL_TIMEOUT = 15.0
QMP_TIMEOUT = 10.0
BUILD_TIMEOUT = 1200.0


def cache_dir() -> Path:
    return Path(
        os.environ.get("QGAPROXY_VM_CACHE")
        or Path.home() / ".cache" / "qgaproxy-vm"
    )


class VMError(RuntimeError):
    """Something about the VM went wrong (message carries the console tail)."""


class VMUnavailable(VMError):
    """QEMU is not installed (tests skip, or fail when CI=true)."""


class QMPError(VMError):
    def __init__(self, command: str, error: dict):
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


# -- availability and build -----------------------------------------------------


def unavailable_reason() -> str | None:
    """Why the VM cannot be booted here, or None if it can (the image may
    still need building)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (apt-get install qemu-system-x86, or run tests/vm/build.sh)"
    if not os.path.exists(QBOOT):
        return f"{QBOOT} not found (apt-get install qemu-system-data)"
    return None


def require_vm() -> None:
    """pytest.skip() if QEMU is missing; pytest.fail() instead when CI=true."""
    reason = unavailable_reason()
    if reason is None:
        return
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the test VM cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def build(force: bool = False, timeout: float = BUILD_TIMEOUT) -> Path:
    """Run tests/vm/build.sh (a no-op when the cache is fresh); return the
    cache directory.  Raises VMError with the script's output on failure."""
    argv = ["bash", str(BUILD_SH)] + (["--force"] if force else [])
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise VMError(f"{BUILD_SH} did not finish in {timeout}s\n{e.stderr or ''}") from None
    if p.returncode != 0:
        raise VMError(f"{BUILD_SH} failed (rc {p.returncode}):\n{p.stdout}\n{p.stderr}")
    return cache_dir()


def build_info(cache: Path | None = None) -> dict[str, str]:
    """The key=value lines build.sh wrote (versions, modules, blocked commands)."""
    path = (cache or cache_dir()) / "build-info"
    info = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition("=")
        info[k] = v
    return info


# -- the VM -------------------------------------------------------------------------

#: VMs whose QEMU may still run; killed at interpreter exit so an interrupted
#: test run leaves no QEMU behind.
_running: "weakref.WeakSet[VM]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for machine in list(_running):
        try:
            machine.kill()
            if not machine._closed and not os.environ.get("QGAPROXY_VM_KEEP"):
                shutil.rmtree(machine.workdir, ignore_errors=True)
        except Exception:
            pass


class VM:
    """One QEMU process (and its successors after restart()) in a temp dir.

    Paths (valid from construction): ``agent_sock``, ``qmp_sock``,
    ``console_sock``, ``console_log_path``, ``workdir``.  ``proc`` is the
    current subprocess.Popen.  ``console_log`` is everything the serial
    console printed so far (all boots; ``\\r`` removed).
    """

    _tags = itertools.count(1)

    def __init__(
        self,
        *,
        cache: Path | str | None = None,
        memory: int = 256,
        no_reboot: bool = True,
        extra_args: tuple[str, ...] = (),
        boot_timeout: float = BOOT_TIMEOUT,
        agent_sock: Path | str | None = None,
        agent_client: bool = False,
    ):
        """agent_client=True: QEMU connects to agent_sock (server=off,
        reconnect=1) instead of listening there: a proxy in unix-listen
        mode owns the socket."""
        self.cache = Path(cache) if cache else cache_dir()
        self.kernel = self.cache / "vmlinuz"
        self.initrd = self.cache / "initrd.img"
        self.memory = memory
        self.no_reboot = no_reboot
        self.extra_args = tuple(extra_args)
        self.boot_timeout = boot_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="qgavm-"))
        self.agent_sock = Path(agent_sock) if agent_sock else self.workdir / "qga.sock"
        self.agent_client = agent_client
        self.qmp_sock = self.workdir / "qmp.sock"
        self.console_sock = self.workdir / "console.sock"
        self.console_log_path = self.workdir / "console.log"
        self.qemu_log_path = self.workdir / "qemu.log"
        self.proc: subprocess.Popen | None = None
        self.launched_at: float | None = None  # time.monotonic() before Popen
        self.launches = 0
        self._cond = threading.Condition()
        self._text = ""  # console output, all boots
        self._boot_pos = 0  # offset in _text where the current boot starts
        self._eof = True  # the current console connection has ended
        self._con: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._log = open(self.console_log_path, "ab")
        self._qemu_log = None
        self._closed = False
        self.last_rc: int | None = None  # status of the last control() command

    # -- lifecycle -------------------------------------------------------------

    def argv(self) -> list[str]:
        a = [
            QEMU,
            "-machine", "q35,accel=tcg",
            "-bios", QBOOT,
            "-m", str(self.memory),
            "-smp", "1",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-nic", "none",
            "-display", "none",
            "-monitor", "none",
            "-serial", f"unix:{self.console_sock},server=on,wait=off",
            "-chardev", (
                f"socket,path={self.agent_sock},server=off,reconnect=1,id=qga0"
                if self.agent_client
                else f"socket,path={self.agent_sock},server=on,wait=off,id=qga0"
            ),
            "-device", "virtio-serial-pci",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT_NAME}",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
        ]
        if self.no_reboot:
            a.insert(a.index("-kernel"), "-no-reboot")
        return a + list(self.extra_args)

    def start(self, wait: bool = True) -> "VM":
        """Launch QEMU; with wait=True return once the guest printed
        QGAVM READY and qemu-ga has the virtio port open."""
        if self.alive():
            raise VMError("already running")
        reason = unavailable_reason()
        if reason:
            raise VMUnavailable(reason)
        for p in (self.kernel, self.initrd):
            if not p.exists():
                raise VMUnavailable(f"{p} missing: run {BUILD_SH}")
        self._launch()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()
                raise
        return self

    def _launch(self) -> None:
        self._join_reader()
        self.launches += 1
        header = f"\n===== qemu launch {self.launches} =====\n"
        with self._cond:
            self._text += header
            self._boot_pos = len(self._text)
            self._eof = False
        self._log.write(header.encode())
        self._log.flush()
        if self._qemu_log is None:
            self._qemu_log = open(self.qemu_log_path, "ab")
        for p in (self.console_sock, self.qmp_sock):  # so we wait for the new ones
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        _running.add(self)
        self.launched_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._qemu_log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        # Connect the console before the guest prints anything: QEMU drops
        # serial output while no client is connected.
        self._con = self._connect(self.console_sock, 10.0)
        self._reader = threading.Thread(
            target=self._read_console, args=(self._con,), daemon=True,
            name=f"qgavm-console-{self.launches}",
        )
        self._reader.start()

    def _connect(self, path: Path, timeout: float) -> socket.socket:
        """Connect to one of QEMU's listening sockets as soon as it exists."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise VMError(f"QEMU exited with rc {self.proc.returncode}\n" + self.tail())
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                return s
            except OSError as e:
                s.close()
                if time.monotonic() >= deadline:
                    raise VMError(f"cannot connect to {path}: {e}\n" + self.tail()) from None
            time.sleep(delay)  # poll interval while QEMU creates the socket
            delay = min(delay * 2, 0.02)

    def _read_console(self, s: socket.socket) -> None:
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while True:
                try:
                    chunk = s.recv(65536)
                except OSError:
                    chunk = b""
                if chunk:
                    self._log.write(chunk)
                    self._log.flush()
                text = dec.decode(chunk, final=not chunk).replace("\r", "")
                with self._cond:
                    self._text += text
                    if not chunk:
                        self._eof = True
                    self._cond.notify_all()
                if not chunk:
                    return
        finally:
            s.close()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(10)
            self._reader = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float | None = None) -> int:
        """Wait for QGAVM READY (this boot) and for qemu-ga to open its port;
        returns the agent's pid in the guest."""
        deadline = time.monotonic() + (self.boot_timeout if timeout is None else timeout)
        self.wait_console(r"^QGAVM READY", deadline - time.monotonic())
        return self.wait_agent(max(0.1, deadline - time.monotonic()))

    def wait_agent(self, timeout: float = CONTROL_TIMEOUT, *, not_pid: int | None = None) -> int:
        """Wait (asking over the console) until a qemu-ga, other than pid
        `not_pid`, runs in the guest with the virtio port open; returns its pid."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        last = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMError(f"agent not up after {timeout}s (last status: {last!r})\n"
                              + self.tail())
            last = self.control("status", timeout=left)
            m = re.search(r"agent running pid=(\d+) port=open", last)
            if m and int(m.group(1)) != not_pid:
                return int(m.group(1))
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # poll interval
            delay = min(delay * 2, 0.2)

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for QEMU to exit; returns its exit status (TimeoutError if not)."""
        if self.proc is None:
            raise VMError("not started")
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"QEMU still running after {timeout}s\n" + self.tail()) from None
        self._join_reader()
        return rc

    def kill(self) -> int | None:
        """SIGKILL QEMU (no clean shutdown; the agent socket file stays)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        rc = self.proc.wait()
        self._join_reader()
        return rc

    def restart(self, wait: bool = True) -> "VM":
        """Kill QEMU if it runs and launch a new one on the SAME socket paths
        (clients of the old one see EOF; the new QEMU re-binds agent_sock)."""
        self.kill()
        return self.start(wait=wait)

    def stop(self, timeout: float = 10.0) -> int | None:
        """QMP quit, wait for the exit, SIGKILL if that fails."""
        if self.proc is None:
            return None
        if self.alive():
            try:
                self.qmp("quit", timeout=min(timeout, QMP_TIMEOUT))
            except (OSError, VMError, TimeoutError):
                pass
            try:
                return self.wait_exit(timeout)
            except TimeoutError:
                pass
        return self.kill()

    def close(self) -> None:
        """stop(), then remove the work directory (unless QGAPROXY_VM_KEEP=1)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            self._log.close()
            if self._qemu_log is not None:
                self._qemu_log.close()
            if not os.environ.get("QGAPROXY_VM_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "VM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<VM {self.workdir} {state}>"

    # -- console -----------------------------------------------------------------

    @property
    def console_log(self) -> str:
        with self._cond:
            return self._text

    def console_pos(self) -> int:
        """The current end of console_log (for wait_console(since=...))."""
        with self._cond:
            return len(self._text)

    def tail(self, n: int = 3000) -> str:
        out = "--- console (tail) ---\n" + self.console_log[-n:]
        try:
            q = self.qemu_log_path.read_text(errors="replace")[-n:]
            if q.strip():
                out += "\n--- qemu.log (tail) ---\n" + q
        except OSError:
            pass
        return out

    def wait_console(self, pattern, timeout: float = CONTROL_TIMEOUT, *,
                     since: int | None = None) -> re.Match:
        """Wait until regex `pattern` (re.M) matches the console output after
        offset `since` (default: the start of the current boot), searching
        complete lines only.  Raises TimeoutError, or VMError as soon as the
        console closed (QEMU exited) without a match."""
        rx = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            start = self._boot_pos if since is None else since
            while True:
                # Complete lines only: a `$` must not match half a line.
                m = rx.search(self._text, start, self._text.rfind("\n") + 1)
                if m:
                    return m
                if self._eof:
                    rc = self.proc.poll() if self.proc else None
                    raise VMError(f"console closed (QEMU rc {rc}) before {rx.pattern!r}\n"
                                  + self._text[-3000:])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{rx.pattern!r} not on the console after {timeout}s\n"
                                       + self._text[-3000:])
                self._cond.wait(left)

    def control(self, cmd: str, timeout: float = CONTROL_TIMEOUT, *, check: bool = True) -> str:
        """Run a command of the guest's console loop (ping, status, agent-stop,
        agent-start, agent-kill [SIG], agent-log, run SHELL...); return its
        output (QGAVM EVENT lines left out).  Waits for QGAVM READY first.
        A non-zero status raises VMError unless check=False."""
        if "\n" in cmd:
            raise ValueError("one line only")
        deadline = time.monotonic() + timeout
        self.wait_console(r"^QGAVM READY", timeout)
        tag = f"@h{next(self._tags)}"
        pos = self.console_pos()
        if self._con is None:
            raise VMError("no console connection")
        self._con.sendall(f"{tag} {cmd}\n".encode())
        out, rc = self._wait_framed(tag, pos, deadline)
        self.last_rc = rc
        if check and rc != 0:
            raise VMError(f"guest command {cmd!r} failed (rc {rc}): {out}")
        return out

    def _wait_framed(self, tag: str, pos: int, deadline: float) -> tuple[str, int]:
        rx = re.compile(rf"^QGAVM BEGIN {tag}\n(.*?)^QGAVM END {tag} rc=(\d+)\n", re.M | re.S)
        m = self.wait_console(rx, max(0.0, deadline - time.monotonic()), since=pos)
        lines = [ln for ln in m.group(1).splitlines() if not ln.startswith("QGAVM EVENT ")]
        return "\n".join(lines), int(m.group(2))

    # -- QMP -----------------------------------------------------------------------

    def qmp(self, command: str, timeout: float = QMP_TIMEOUT, **arguments):
        """Run one QMP command on a fresh connection (greeting,
        qmp_capabilities, execute; events are skipped); return its "return"
        value.  Raises QMPError for an error reply.  `quit` tolerates EOF."""
        deadline = time.monotonic() + timeout
        s = self._connect(self.qmp_sock, timeout)
        buf = bytearray()

        def reply(want_id=None) -> dict | None:
            while True:
                i = buf.find(b"\n")
                if i >= 0:
                    line = bytes(buf[: i + 1])
                    del buf[: i + 1]
                    msg = json.loads(line)
                    if "event" in msg:
                        continue
                    if want_id is None or msg.get("id") == want_id:
                        return msg
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"QMP {command}: no reply in {timeout}s")
                s.settimeout(left)
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    raise TimeoutError(f"QMP {command}: no reply in {timeout}s") from None
                if not chunk:
                    return None
                buf.extend(chunk)

        try:
            greeting = reply()
            if not greeting or "QMP" not in greeting:
                raise VMError(f"QMP: bad greeting {greeting!r}")
            s.sendall(b'{"execute": "qmp_capabilities", "id": "cap"}\n')
            r = reply("cap")
            if not r or "return" not in r:
                raise VMError(f"QMP: qmp_capabilities failed: {r!r}")
            req = {"execute": command, "id": "cmd"}
            if arguments:
                req["arguments"] = arguments
            s.sendall(json.dumps(req).encode() + b"\n")
            r = reply("cmd")
        finally:
            s.close()
        if r is None:
            if command == "quit":
                return None
            raise VMError(f"QMP {command}: connection closed")
        if "error" in r:
            raise QMPError(command, r["error"])
        return r.get("return")

    # -- measurements --------------------------------------------------------------

    def rss_bytes(self) -> int:
        """Resident set size of the QEMU process."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise VMError("no VmRSS")


# -- direct measurements on the agent socket (no proxy) ------------------------------


PING = b'{"execute": "guest-ping"}\n'
PONG = b'{"return": {}}\n'


def direct_round_trip(agent_sock, n: int = 100, timeout: float = 10.0) -> list[float]:
    """Sync (0xFF + guest-sync-delimited), then n sequential guest-ping round
    trips on one plain socket; returns the n durations in seconds.  Reads
    every reply before closing (nothing left half-done for the next client)."""
    conn = AgentConn(agent_sock, timeout=timeout)
    try:
        conn.sync()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            conn.send(PING)
            got = conn.recv_lines(1)
            out.append(time.perf_counter() - t)
            if got != PONG:
                raise VMError(f"guest-ping: unexpected reply {got!r}")
        return out
    finally:
        conn.close()


def boot_to_first_reply(vm: VM | None = None, timeout: float = BOOT_TIMEOUT) -> float:
    """Seconds from launching QEMU to the first synced agent reply.

    Launches `vm` (not yet started; or a fresh VM, closed afterwards),
    connects to the agent socket as soon as it exists and writes 0xFF +
    guest-sync-delimited at once (QEMU holds it until the agent opens the
    port), and waits for the sync reply.  The connection is closed after the
    reply was read; a given `vm` is left running."""
    own = vm is None
    if own:
        vm = VM()
    try:
        vm.start(wait=False)
        deadline = vm.launched_at + timeout
        s = vm._connect(vm.agent_sock, timeout)
        s.close()  # socket exists; AgentConn connects on its own
        conn = AgentConn(vm.agent_sock, timeout=timeout)
        try:
            conn.sync(timeout=max(0.1, deadline - time.monotonic()))
            elapsed = time.monotonic() - vm.launched_at
        finally:
            conn.close()
        return elapsed
    finally:
        if own:
            vm.close()


def percentile(values, p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    v = sorted(values)
    if not v:
        raise ValueError("no values")
    k = max(0, min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1))
    return v[k]


if __name__ == "__main__":  # python3 tests/vm/vm.py: build, boot, measure
    t = time.monotonic()
    build()
    print(f"build.sh: {time.monotonic() - t:.2f} s")
    vm = VM()
    try:
        print(f"boot to first synced reply: {boot_to_first_reply(vm):.2f} s")
        vm.wait_ready()
        rt = direct_round_trip(vm.agent_sock, 500)
        print(f"guest-ping round trip: p50 {percentile(rt, 50) * 1e3:.2f} ms, "
              f"p99 {percentile(rt, 99) * 1e3:.2f} ms (n={len(rt)})")
        print(f"QEMU RSS: {vm.rss_bytes() / 2**20:.0f} MiB")
    finally:
        vm.close()
