"""The command line, as a real process: startup, the socket it makes,
signals, the metrics endpoint, bad arguments, an upstream that is down.

Plain synchronous tests: the proxy runs in its own process, so blocking
sockets with timeouts are all a client needs.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import urllib.request

import pytest

STEP = 10.0

READY_RE = r"qgaproxy ready: listening on (.+), upstream (\S+)$"
AGENT_READY_RE = r"agent \w+ -> ready"
NOT_AVAILABLE = b"Guest agent is not available"


def console_script() -> str:
    """The `qgaproxy` entry point installed next to this interpreter (not a
    pyenv shim, so that signals reach the proxy itself)."""
    path = os.path.join(os.path.dirname(sys.executable), "qgaproxy")
    if not os.access(path, os.X_OK):
        path = shutil.which("qgaproxy")
    assert path, "the qgaproxy console script is not installed (pip install -e .)"
    return path


class ProxyProcess:
    """`qgaproxy serve ...` in a child process, its stderr read line by line
    by a thread (so the child never blocks on a full pipe)."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        self.stdout = b""
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        threading.Thread(target=self._pump_stdout, daemon=True).start()

    def _pump_stderr(self):
        for raw in self.proc.stderr:
            self._lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self._lines.put(None)

    def _pump_stdout(self):
        self.stdout = self.proc.stdout.read()

    def wait_line(self, pattern: str, timeout: float = STEP) -> re.Match:
        """Read the log until a line matches (bounded)."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(
                    "no log line matching %r within %gs; log so far:\n%s" % (pattern, timeout, "\n".join(self.log))
                ) from None
            if line is None:
                self._lines.put(None)
                raise AssertionError(
                    "process exited (rc %s) before logging %r; log:\n%s"
                    % (self.proc.wait(STEP), pattern, "\n".join(self.log))
                )
            self.log.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def find_line(self, pattern: str, timeout: float = STEP) -> re.Match:
        """Like wait_line, but a line already read counts too."""
        for line in self.log:
            m = re.search(pattern, line)
            if m:
                return m
        return self.wait_line(pattern, timeout)

    def rest_of_log(self) -> str:
        """Everything logged until the process exited (call after it did)."""
        while True:
            line = self._lines.get(timeout=STEP)
            if line is None:
                self._lines.put(None)
                return "\n".join(self.log)
            self.log.append(line)

    def stop(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(STEP)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STEP)


@pytest.fixture
def processes():
    started: list[ProxyProcess] = []

    def start(*args: str, script: bool = False) -> ProxyProcess:
        prefix = [console_script()] if script else [sys.executable, "-m", "qgaproxy"]
        p = ProxyProcess(prefix + list(args))
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture(params=["sim", "real-agent"])
def upstream(request) -> str:
    """The upstream address to pass: the embedded simulated agent, or the
    real qemu-ga."""
    if request.param == "sim":
        return "sim"
    agent = request.getfixturevalue("real_agent")
    return "unix:" + str(agent.path)


def sock_path(tmp_path, name: str = "proxy.sock") -> str:
    path = str(tmp_path / name)
    assert len(path) < 100, "unix socket path too long: %s" % path
    return path


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(STEP)
    s.connect(path)
    return s


def request(s: socket.socket, data: bytes, lines: int = 1) -> bytes:
    s.sendall(data)
    buf = b""
    while buf.count(b"\n") < lines:
        chunk = s.recv(65536)
        assert chunk, "connection closed after %d bytes, %d lines (...%r)" % (len(buf), buf.count(b"\n"), buf[-200:])
        buf += chunk
    return buf


def assert_socket_file(path: str) -> None:
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)


# -- serve, signals ------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_and_signal(processes, upstream, tmp_path, signum):
    path = sock_path(tmp_path)
    second = sock_path(tmp_path, "second.sock")
    proxy = processes("serve", "--upstream", upstream, "--listen", path, "--listen", second)
    m = proxy.wait_line(READY_RE)
    assert m.group(1) == path + ", " + second
    for p in (path, second):
        assert_socket_file(p)
        with connect(p) as s:
            assert request(s, b'{"execute": "guest-ping", "id": 1}') == b'{"return": {}, "id": 1}\n'
            assert request(s, b'{"execute":"guest-ping"}') == b'{"return": {}}\n'
            info = request(s, b'{"execute": "guest-info"}')
            assert info.startswith(b'{"return": {"version": "') and info.endswith(b"}\n"), info[:200]
    # A client still connected when the signal comes does not keep it alive.
    lingering = connect(path)
    assert request(lingering, b'{"execute": "guest-ping"}') == b'{"return": {}}\n'
    rc = proxy.stop(signum)
    log = proxy.rest_of_log()
    assert rc == 0, log
    assert not os.path.exists(path), log
    assert not os.path.exists(second), log
    assert signal.Signals(signum).name + ": stopping" in log
    assert "Traceback" not in log, log
    lingering.close()


def test_console_script(processes, tmp_path):
    path = sock_path(tmp_path)
    proxy = processes("serve", "--upstream", "sim", "--listen", path, script=True)
    proxy.wait_line(READY_RE)
    assert_socket_file(path)
    with connect(path) as s:
        assert request(s, b'{"execute": "guest-ping", "id": "x"}') == b'{"return": {}, "id": "x"}\n'
    assert proxy.stop() == 0, proxy.rest_of_log()
    assert not os.path.exists(path)


def test_version(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "--version"], capture_output=True, text=True, timeout=STEP
    )
    assert result.returncode == 0
    assert result.stdout.strip().startswith("qgaproxy ")


# -- metrics ------------------------------------------------------------------------


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=STEP) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def _sample(text: str, name: str, labels: dict | None = None) -> float | None:
    """The value of one sample in a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if got == (labels or {}):
            return float(m.group(4))
    return None


def test_metrics(processes, upstream, tmp_path):
    path = sock_path(tmp_path)
    proxy = processes("serve", "--upstream", upstream, "--listen", path, "--metrics", "127.0.0.1:0")
    m = proxy.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
    port = int(m.group(1))
    assert port != 0
    proxy.wait_line(READY_RE)
    url = "http://127.0.0.1:%d/metrics" % port
    pings = 7
    with connect(path) as s:
        for n in range(pings):
            assert request(s, b'{"execute": "guest-ping", "id": %d}' % n) == b'{"return": {}, "id": %d}\n' % n
        # Other outcomes, which must not count as guest-ping ok.
        assert b"has not been found" in request(s, b'{"execute": "guest-nope"}')
        assert b"must be a JSON object" in request(s, b"[]")
        text = _scrape(url)
        agent = {"agent": "default"}
        assert _sample(text, "qgaproxy_agent_up", agent) == 1
        assert _sample(text, "qgaproxy_requests_total", {**agent, "command": "guest-ping", "outcome": "ok"}) == pings
        assert _sample(text, "qgaproxy_requests_total", {**agent, "command": "invalid", "outcome": "invalid"}) == 1
        assert _sample(text, "qgaproxy_request_duration_seconds_count", {**agent, "command": "guest-ping"}) == pings
        listener = os.path.basename(path).removesuffix(".sock")
        assert _sample(text, "qgaproxy_clients_connected", {**agent, "listener": listener}) == 1
        assert "# TYPE qgaproxy_resyncs_total counter" in text
        assert _sample(text, "qgaproxy_resyncs_total", {**agent, "reason": "timeout"}) == 0
        # never a path as a label value
        assert path not in text
        # Label values come from small fixed sets: no client-chosen name.
        assert "guest-nope" not in text
    # Unknown paths are not served.
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen("http://127.0.0.1:%d/other" % port, timeout=STEP)
    assert err.value.code == 404
    assert proxy.stop() == 0, proxy.rest_of_log()


# -- bad arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--upstream", "bogus"], "upstream 'bogus': expected unix:PATH, unix-listen:PATH, serial:PATH, tcp:HOST:PORT"),
        (["--upstream", "unix:"], "upstream 'unix:'"),
        (["--upstream", "tcp:1.2.3.4"], "upstream 'tcp:1.2.3.4'"),
        (["--upstream", "vsock:x:1"], "upstream 'vsock:x:1'"),
        (["--upstream", "sim", "--metrics", "nonsense"], "HOST:PORT"),
        (["--upstream", "sim", "--request-timeout", "0"], "--request-timeout must be positive"),
        (["--upstream", "sim", "--socket-mode", "rw"], "qgaproxy:"),
    ],
)
def test_bad_arguments(tmp_path, args, message):
    path = sock_path(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "serve", "--listen", path] + args,
        capture_output=True,
        text=True,
        timeout=STEP,
    )
    assert result.returncode == 2, result
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(path)


@pytest.mark.parametrize("args", [[], ["serve"], ["serve", "--upstream", "sim"], ["bogus-command"]])
def test_usage_errors(args):
    result = subprocess.run([sys.executable, "-m", "qgaproxy"] + args, capture_output=True, text=True, timeout=STEP)
    assert result.returncode == 2, result
    assert "usage: qgaproxy" in result.stderr
    assert "Traceback" not in result.stderr


def _startup_failure(kind: str, tmp_path, keep: list) -> tuple[list[str], str]:
    """Arguments that make startup fail, and the text the error must name."""
    path = sock_path(tmp_path)
    if kind == "listen-path-is-a-file":
        with open(path, "w") as f:
            f.write("not a socket")
        return ["--listen", path], "is not a socket"
    if kind == "listen-dir-missing":
        return ["--listen", str(tmp_path / "no-such-dir" / "p.sock")], "No such file or directory"
    if kind == "listen-path-served-by-another-process":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        keep.append(server)
        return ["--listen", path], "another process is listening there"
    if kind == "metrics-port-taken":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        keep.append(server)
        port = server.getsockname()[1]
        return ["--listen", path, "--metrics", "127.0.0.1:%d" % port], "ddress already in use"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["listen-path-is-a-file", "listen-dir-missing", "listen-path-served-by-another-process", "metrics-port-taken"],
)
def test_startup_failure_is_reported(tmp_path, kind):
    """What cannot be set up at start (unlike the upstream) is an error:
    exit code 1 and one line naming it, no traceback; nothing of anyone
    else's is deleted."""
    keep: list = []
    try:
        args, message = _startup_failure(kind, tmp_path, keep)
        before = sorted(os.listdir(tmp_path))
        result = subprocess.run(
            [sys.executable, "-m", "qgaproxy", "serve", "--upstream", "sim"] + args,
            capture_output=True,
            text=True,
            timeout=STEP,
        )
        assert result.returncode == 1, result
        assert message in result.stderr, result.stderr
        assert re.search(r"^qgaproxy: .*" + re.escape(message), result.stderr, re.M), result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert sorted(os.listdir(tmp_path)) == before
        if kind == "listen-path-is-a-file":
            with open(sock_path(tmp_path)) as f:
                assert f.read() == "not a socket"  # never deleted
    finally:
        for s in keep:
            s.close()


# -- the upstream is down ------------------------------------------------------------------


def test_upstream_down_never_exits(processes, tmp_path):
    path = sock_path(tmp_path)
    proxy = processes("serve", "--upstream", "unix:/nonexistent/sock", "--listen", path)
    proxy.wait_line(READY_RE)
    assert_socket_file(path)
    with connect(path) as s:
        for n in range(3):
            reply = request(s, b'{"execute": "guest-ping", "id": %d}' % n)
            assert reply.startswith(b'{"id": %d, "error": {"class": "GenericError", "desc": "' % n + NOT_AVAILABLE), reply
        reply = request(s, b'{"execute": "guest-info"}{"execute": "guest-ping"}', lines=2)
        assert reply.count(NOT_AVAILABLE) == 2, reply
    # Still there after its first failed attempts were logged.
    proxy.find_line(r"cannot open the agent channel unix:/nonexistent/sock")
    assert proxy.proc.poll() is None
    with connect(path) as s:
        assert NOT_AVAILABLE in request(s, b'{"execute": "guest-ping"}')
    assert proxy.stop() == 0, proxy.rest_of_log()
    assert not os.path.exists(path)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_leaving_does_not_stop_the_process(processes, upstream, tmp_path, how):
    """Clients go away with replies unread (a killed tool, a timeout in a
    script): the process serves on, and still exits cleanly on SIGTERM."""
    path = sock_path(tmp_path)
    proxy = processes("serve", "--upstream", upstream, "--listen", path)
    proxy.wait_line(READY_RE)
    for round_ in range(3):
        leaver = connect(path)
        leaver.sendall(b'{"execute": "guest-info"}' * 40)
        if how == "reset":
            leaver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        leaver.close()
        with connect(path) as s:
            # Enough work to outlast the leaver's replies.
            replies = request(s, b"".join(b'{"execute": "guest-info", "id": %d}' % n for n in range(40)), lines=40)
            assert replies.count(b'"version": ') == 40, round_
            assert request(s, b'{"execute": "guest-ping"}') == b'{"return": {}}\n'
    assert proxy.proc.poll() is None
    assert proxy.stop() == 0, proxy.rest_of_log()
    assert "Traceback" not in proxy.rest_of_log()
