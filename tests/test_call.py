"""`qgaproxy call` as a real process: against a proxy in front of the real
qemu-ga, straight against the real agent's socket, and against the
simulated agent for what the real one may not do here (freeze, exec).
Output formats (a pipe, a terminal), exit statuses, cat and exec.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

import pytest

from operatorutil import QGAPROXY, STEP, call, client_env, proxy, qmp_proxy, shell_lines, short_tmpdir, sim_agent
from ptyutil import PtyProcess
from qgaproxy import cli
from qgaproxy.call import UsageError, parse_pairs
from realagent import RealAgent, qga_request, require_real_agent

HOSTNAME = socket.gethostname()


# -- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_proxy():
    """A proxy (its own process) in front of a real qemu-ga; yields
    (proxy socket, agent)."""
    require_real_agent()
    with RealAgent() as agent:
        with proxy("unix:" + str(agent.path)) as path:
            yield path, agent


@pytest.fixture(params=["proxy", "agent"])
def real_socket(request):
    """The proxy's socket in front of the real agent, or the real agent's
    own socket: the client must work on both."""
    if request.param == "proxy":
        path, agent = request.getfixturevalue("real_proxy")
        return path, agent
    agent = request.getfixturevalue("real_agent")
    return str(agent.path), agent


@pytest.fixture(scope="module")
def sim_raw():
    """A simulated agent's own socket (no proxy), with a guest file."""
    with sim_agent("--file", "/etc/motd=hello from the guest\n") as path:
        yield path


def agent_file(agent, name: str, content: bytes) -> str:
    """A file the real agent (running as nobody) may read."""
    path = agent.tmpdir / name
    path.write_bytes(content)
    os.chmod(path, 0o644)
    return str(path)


def out(result) -> str:
    return result.stdout.decode()


def err(result) -> str:
    return result.stderr.decode()


# -- the KEY=VALUE rule ------------------------------------------------------------


def test_key_value_rule():
    assert parse_pairs(["path=/etc/hostname", "mode=r"]) == {"path": "/etc/hostname", "mode": "r"}
    assert parse_pairs(["count=4096", "x=1.5", "t=true", "f=false", "n=null"]) == {
        "count": 4096, "x": 1.5, "t": True, "f": False, "n": None}
    assert parse_pairs(['arg=["-l","/"]', 'o={"a":1}']) == {"arg": ["-l", "/"], "o": {"a": 1}}
    # What does not parse as JSON, or parses as a JSON string, stays as written.
    assert parse_pairs(['s="quoted"', "e=", "w=a=b", "nan=NaN", "h=12ab"]) == {
        "s": '"quoted"', "e": "", "w": "a=b", "nan": "NaN", "h": "12ab"}
    # := forces JSON.
    assert parse_pairs(['id:="123"', "n:=7", "l:=[]"]) == {"id": "123", "n": 7, "l": []}
    assert parse_pairs(["b=2"], {"a": 1}) == {"a": 1, "b": 2}
    for bad in (["novalue"], ["=x"], [":=1"], ["k:=nope"], ["k=1", "k=2"], ["k:=NaN"]):
        with pytest.raises(UsageError):
            parse_pairs(bad)
    with pytest.raises(UsageError):
        parse_pairs(["a=2"], {"a": 1})


# -- agent commands, output formats ------------------------------------------------------


def test_command_prints_return_compact_on_a_pipe(real_socket):
    path, agent = real_socket
    result = call(path, "guest-get-host-name")
    assert result.returncode == 0, result
    assert out(result) == '{"host-name":%s}\n' % json.dumps(HOSTNAME)
    assert result.stderr == b""
    # Arguments as KEY=VALUE, and as --json.
    name = agent_file(agent, "args.txt", b"abc")
    for args in (["path=" + name, "mode=r"], ["--json", json.dumps({"path": name}), "mode=r"]):
        result = call(path, "guest-file-open", *args)
        assert result.returncode == 0, result
        handle = json.loads(result.stdout)
        assert isinstance(handle, int)
        closed = call(path, "guest-file-close", "handle=%d" % handle)
        if path == str(agent.path):
            assert closed.stdout == b"{}\n"
        else:
            # The proxy closed it when its owner left, and would not let
            # another client touch it anyway.
            assert closed.returncode == 1 and "handle" in err(closed), closed


def test_command_prints_return_indented_on_a_terminal(real_proxy):
    path, _ = real_proxy
    argv = QGAPROXY + ["call", "--socket", path, "guest-get-host-name"]
    with PtyProcess(argv, env=client_env()) as p:
        text = p.read_to_eof()
        assert p.proc.wait(STEP) == 0
    assert text == '{\n  "host-name": %s\n}\n' % json.dumps(HOSTNAME)


def test_agent_error(real_socket):
    path, _ = real_socket
    result = call(path, "guest-nope")
    assert result.returncode == 1, result
    assert result.stdout == b""
    assert err(result) == "qgaproxy: CommandNotFound: The command guest-nope has not been found\n"
    result = call(path, "guest-file-open", "path=/nonexistent/file")
    assert result.returncode == 1, result
    assert err(result).startswith("qgaproxy: GenericError: failed to open file '/nonexistent/file'"), err(result)
    # Blocked on the real agent here: its own error, status 1.
    result = call(path, "guest-fsfreeze-freeze")
    assert result.returncode == 1, result
    assert "Command guest-fsfreeze-freeze has been disabled" in err(result), err(result)


def test_socket_from_the_environment(real_proxy):
    path, _ = real_proxy
    result = call(None, "guest-ping", env=client_env(QGAPROXY_SOCKET=path))
    assert (result.returncode, result.stdout) == (0, b"{}\n"), result
    # --socket wins over the variable.
    result = call(path, "guest-ping", env=client_env(QGAPROXY_SOCKET="/nonexistent.sock"))
    assert (result.returncode, result.stdout) == (0, b"{}\n"), result


@pytest.mark.parametrize(
    "args, message",
    [
        (["guest-ping", "novalue"], "expected KEY=VALUE or KEY:=JSON, got 'novalue'"),
        (["guest-ping", "k:=x"], "k:=x: not JSON"),
        (["--json", "[1]", "guest-ping"], "--json: the arguments must be a JSON object"),
        (["guest-ping", "--json", "{"], "--json: not JSON"),
        (["guest-ping", "--json"], "--json needs a value"),
        (["--timeout", "0", "guest-ping"], "--timeout must be positive"),
        (["ping", "--timeout=soon"], "--timeout: not a number: 'soon'"),
        (["ping", "extra"], "ping takes no arguments"),
        (["cat"], "cat takes one guest path"),
        (["exec"], "exec needs a program"),
        (["fsinfo", "--json={}"], "--json takes no value with the convenience form fsinfo"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors(sim_raw, args, message, capsys):
    """In this process (the same code as the command; no socket is
    touched before the words are checked, except for the forms' own)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["call", "--socket", sim_raw] + args)
    assert exit_.value.code == 2
    stderr = capsys.readouterr().err
    assert "usage: qgaproxy call" in stderr
    assert message in stderr, stderr


def test_no_socket_is_a_usage_error():
    result = call(None, "guest-ping")
    assert result.returncode == 2, result
    assert "no socket: give --socket PATH or set QGAPROXY_SOCKET" in err(result)


def test_help_documents_the_rules():
    result = subprocess.run(QGAPROXY + ["call", "--help"], capture_output=True, text=True, timeout=STEP)
    assert result.returncode == 0
    for text in ("KEY:=JSON", "exit status:", "3    connection problem or timeout", "QGAPROXY_SOCKET",
                 "fsfreeze-status", "exec -- PROGRAM"):
        assert text in result.stdout, text


#: What only `serve` and `demo` need; the operator's tools start without them.
SERVER_MODULES = ("trio", "prometheus_client", "qgaproxy.router", "qgaproxy.proxy", "qgaproxy.metrics",
                  "qgaproxy.transport")

_REPORT_MODULES = """\
import sys
from qgaproxy import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("MODULES", code, " ".join(sorted(sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, status",
    [
        (["call", "--socket", "{sock}", "ping"], 0),
        (["call", "--socket", "{sock}", "guest-get-host-name"], 0),
        (["call", "--help"], 0),
        (["shell", "--socket", "{sock}"], 0),
        # The raw agent does not know the command: still the whole client path.
        (["status", "--socket", "{sock}"], 1),
    ],
    ids=["ping", "command", "help", "shell", "status"],
)
def test_client_commands_import_no_server_modules(sim_raw, argv, status):
    argv = [word.replace("{sock}", sim_raw) for word in argv]
    result = subprocess.run([sys.executable, "-c", _REPORT_MODULES] + argv, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=STEP, env=client_env())
    report = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    assert report, result.stderr
    _, code, modules = report[-1].split(" ", 2)
    assert code == str(status), result.stderr
    loaded = set(modules.split())
    assert "qgaproxy.cli" in loaded
    assert not loaded & set(SERVER_MODULES), sorted(loaded & set(SERVER_MODULES))


# -- connection problems -------------------------------------------------------------------


def test_no_such_socket():
    result = call("/nonexistent/qga.sock", "guest-ping")
    assert result.returncode == 3, result
    assert err(result) == "qgaproxy: cannot connect to /nonexistent/qga.sock: No such file or directory\n"


class FakeAgent:
    """A unix socket served by a thread: answers the sync (or not), then
    sends what a test wants."""

    def __init__(self, after_sync: bytes | None):
        self.dir = short_tmpdir()
        self.path = os.path.join(self.dir, "fake.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(1)
        self.after_sync = after_sync
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.server.accept()
        with conn:
            data = b""
            while b"\n" not in data:
                chunk = self._recv(conn)
                if not chunk:
                    return
                data += chunk
            if self.after_sync is not None:
                sync_id = json.loads(data[1:].split(b"\n")[0])["arguments"]["id"]
                try:
                    conn.sendall(b'\xff{"return": %d}\n' % sync_id + self.after_sync)
                except OSError:
                    return  # the client gave up first
            while self._recv(conn):  # silent until the client leaves
                pass

    @staticmethod
    def _recv(conn) -> bytes:
        ready, _, _ = select.select([conn], [], [], STEP)
        try:
            return conn.recv(65536) if ready else b""
        except OSError:
            return b""

    def close(self):
        self.server.close()
        self.thread.join(STEP)
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.mark.parametrize(
    "after_sync, message",
    [
        (None, "qgaproxy: timeout: no reply to the sync within 0.5 s"),
        (b"", "qgaproxy: timeout: no reply to guest-ping within 0.5 s"),
        (b"x" * (65 << 20), "qgaproxy: a reply larger than 64 MiB"),
        (b"not json\n", "qgaproxy: the agent sent something that is not JSON"),
    ],
    ids=["silent", "no-reply", "too-large", "not-json"],
)
def test_never_hangs(after_sync, message):
    fake = FakeAgent(after_sync)
    try:
        result = call(fake.path, "--timeout", "0.5", "guest-ping")
    finally:
        fake.close()
    assert result.returncode == 3, result
    assert err(result).startswith(message), err(result)


def test_stale_input_on_the_real_agent(real_agent):
    """Half a request left in the agent's parser by an earlier client: the
    client's 0xFF and sync get past it."""
    with real_agent.connect() as conn:
        conn.sync()
        conn.send(b'{"execute": "guest-get-host-na')
    result = call(str(real_agent.path), "guest-get-host-name")
    assert result.returncode == 0, result
    assert json.loads(result.stdout) == {"host-name": HOSTNAME}
    assert qga_request(real_agent.path, b'{"execute": "guest-ping", "id": 1}\n') == b'{"return": {}, "id": 1}\n'


def test_stale_replies_before_the_sync():
    """Unread replies (with and without ids) and garbage waiting on the
    socket, as a previous client leaves them: all skipped."""
    stale = '{"return": 5}\n{"return": {}, "id": 12}\n\xffgarbage{"return": 42}\n{"error": {"class": "X", "desc": "y"}}'
    with sim_agent("--on-connect", stale) as path:
        for _ in range(2):
            result = call(path, "guest-get-host-name")
            assert (result.returncode, result.stdout) == (0, b'{"host-name":"qgasim"}\n'), result


# -- convenience forms ---------------------------------------------------------------------------


def test_forms_on_the_real_agent(real_proxy):
    path, _ = real_proxy
    result = call(path, "ping")
    assert (result.returncode, out(result)) == (0, "ok\n"), result

    result = call(path, "info")
    assert result.returncode == 0, result
    lines = out(result).splitlines()
    assert lines[0].startswith("version: 7."), lines
    assert lines[1].startswith("enabled ("), lines
    assert "guest-ping" in out(result) and "disabled (" in out(result)

    result = call(path, "osinfo")
    assert result.returncode == 0, result
    assert "pretty-name:" in out(result) and "kernel-release:" in out(result)
    assert os.uname().release in out(result)

    result = call(path, "ifconfig")
    assert result.returncode == 0, result
    header, *rows = out(result).splitlines()
    assert header.split() == ["INTERFACE", "HARDWARE", "ADDRESS", "RX", "TX", "ADDRESS"]
    lo = next(r for r in rows if r.startswith("lo "))
    assert "00:00:00:00:00:00" in lo and "127.0.0.1/8" in lo

    result = call(path, "fsinfo")
    assert result.returncode == 0, result
    header, *rows = out(result).splitlines()
    assert header.split() == ["MOUNTPOINT", "TYPE", "DEVICE", "USED", "TOTAL", "USE%"]
    assert any(r.split()[0] == "/" for r in rows), rows

    # --json: the agent's own reply.
    raw = json.loads(call(path, "ifconfig", "--json").stdout)
    assert any(i["name"] == "lo" for i in raw)
    assert "/" in [fs["mountpoint"] for fs in json.loads(call(path, "fsinfo", "--json").stdout)]


def test_forms_on_the_simulated_agent(sim_raw):
    assert out(call(sim_raw, "fsinfo")).splitlines() == [
        "MOUNTPOINT  TYPE  DEVICE  USED     TOTAL    USE%",
        "/           ext4  vda1    1.0 GiB  8.0 GiB  12%",
        "/boot       ext4  vda2    1.0 GiB  8.0 GiB  12%",
    ]
    assert out(call(sim_raw, "ifconfig")).splitlines() == [
        "INTERFACE  HARDWARE ADDRESS   RX   TX   ADDRESS",
        "lo         00:00:00:00:00:00  0 B  0 B  127.0.0.1/8",
        "                                        ::1/128",
        "eth0       52:54:00:12:34:56  0 B  0 B  10.0.2.15/24",
        "                                        fe80::5054:ff:fe12:3456/64",
    ]


def test_freeze_and_thaw(sim_raw):
    def run(*args):
        result = call(sim_raw, *args)
        return result.returncode, out(result), err(result)

    assert run("fsfreeze-status") == (0, "thawed\n", "")
    assert run("freeze") == (0, "2 filesystems frozen\n", "")
    assert run("fsfreeze-status") == (0, "frozen\n", "")
    assert run("guest-get-host-name") == (
        1, "", "qgaproxy: CommandNotFound: Command guest-get-host-name has been disabled: the agent is in frozen state\n")
    assert run("thaw") == (0, "2 filesystems thawed\n", "")
    assert run("freeze", "/boot") == (0, "1 filesystem frozen\n", "")
    assert run("thaw", "--json") == (0, "1\n", "")


# -- cat -------------------------------------------------------------------------------------------


def test_cat_real_files(real_socket):
    path, agent = real_socket
    small = agent_file(agent, "small.txt", b"one line\nand no newline at the end")
    big_content = os.urandom(5 * 1024 * 1024 + 123)
    big = agent_file(agent, "big.bin", big_content)
    result = call(path, "cat", small)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"one line\nand no newline at the end", b"")
    result = call(path, "cat", big, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == big_content
    assert result.stderr == b""  # no progress line: stderr is no terminal
    result = call(path, "cat", "/etc/hostname")
    with open("/etc/hostname", "rb") as f:
        assert result.stdout == f.read()
    result = call(path, "cat", "/nonexistent")
    assert result.returncode == 1
    assert err(result).startswith("qgaproxy: GenericError: failed to open file '/nonexistent'")
    if path != str(agent.path):
        return  # the proxy closes what a departed client left open anyway
    # Every handle was closed: the next one's predecessor is gone.
    handle = json.loads(call(path, "guest-file-open", "path=" + small).stdout)
    gone = call(path, "guest-file-close", "handle=%d" % (handle - 1))
    assert gone.returncode == 1 and "handle" in err(gone), gone
    assert call(path, "guest-file-close", "handle=%d" % handle).returncode == 0


def test_cat_progress_on_a_terminal(real_proxy, tmp_path):
    path, agent = real_proxy
    content = os.urandom(3 * 1024 * 1024)
    name = agent_file(agent, "progress.bin", content)
    target = tmp_path / "copy"
    with open(target, "wb") as stdout:
        argv = QGAPROXY + ["call", "--socket", path, "cat", name]
        with PtyProcess(argv, env=client_env(), stdout=stdout) as p:
            text = p.read_to_eof()
            assert p.proc.wait(STEP) == 0, text
    assert target.read_bytes() == content
    assert "3.0 MiB read" in text, repr(p.raw)
    assert p.raw.endswith(b"\r\x1b[K"), p.raw[-100:]  # the line is wiped at the end


def test_cat_interrupted_closes_the_handle(tmp_path):
    """Ctrl-C while a file streams: the handle is closed before exiting."""
    host_file = tmp_path / "large"
    host_file.write_bytes(os.urandom(5 * 1024 * 1024))
    with sim_agent("--file", "/large=@%s" % host_file, "--command-latency", "guest-file-read=0.5") as path:
        proc = subprocess.Popen(QGAPROXY + ["call", "--socket", path, "cat", "/large"], env=client_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], STEP)
            assert ready and proc.stdout.read(1), "no data streamed"
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=STEP)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130, stderr
        assert stderr == b"qgaproxy: interrupted\n"
        handle = json.loads(call(path, "guest-file-open", "path=/large").stdout)
        gone = call(path, "guest-file-close", "handle=%d" % (handle - 1))
        assert gone.returncode == 1 and "handle" in err(gone), gone


# -- exec ----------------------------------------------------------------------------------------


def test_exec(sim_raw):
    """guest-exec is blocked on the real agent here: the simulated one."""
    exec_socket = sim_raw
    result = call(exec_socket, "exec", "--", "/bin/echo", "hello", "guest")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello guest\n", b"")
    result = call(exec_socket, "exec", "--", "echo", "-n", "no newline")
    assert (result.returncode, result.stdout) == (0, b"no newline"), result
    result = call(exec_socket, "exec", "--", "/bin/false")
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")
    # The program's stderr and exit status.
    result = call(exec_socket, "exec", "--", "/bin/sleep", "soon")
    assert result.returncode == 1
    assert result.stderr.startswith(b"sleep: invalid time interval 'soon'\n"), result.stderr
    # A program that outlives --timeout: status 3, and it is named.
    result = call(exec_socket, "--timeout", "0.5", "exec", "--", "/bin/sleep", "30")
    assert result.returncode == 3, result
    assert "/bin/sleep (pid " in err(result) and "still running after 0.5 s" in err(result)
    # One that takes a while but less than --timeout is waited for.
    result = call(exec_socket, "--timeout", "5", "exec", "--", "/bin/sleep", "0.3")
    assert (result.returncode, result.stderr) == (0, b""), result
    # The agent's error when there is no such program.
    result = call(exec_socket, "exec", "--", "/no/such/program")
    assert result.returncode == 1
    assert err(result).startswith("qgaproxy: GenericError: Guest agent command failed"), err(result)
    # --json: the final guest-exec-status reply.
    status = json.loads(call(exec_socket, "exec", "--json", "--", "/bin/echo", "x").stdout)
    assert status == {"exited": True, "exitcode": 0, "out-data": "eAo=", "out-truncated": False}


def test_exec_through_the_proxy():
    with proxy("sim") as path:
        result = call(path, "exec", "--", "/bin/sleep", "0.2")
        assert (result.returncode, result.stdout, result.stderr) == (0, b"", b""), result
        result = call(path, "exec", "/bin/echo", "-n", "--json")
        assert (result.returncode, result.stdout) == (0, b"--json"), result
        result = call(path, "exec", "--", "/bin/false")
        assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"")


def test_exec_is_blocked_on_the_real_agent(real_proxy):
    path, _ = real_proxy
    result = call(path, "exec", "--", "/bin/true")
    assert result.returncode == 1
    assert "Command guest-exec has been disabled" in err(result), err(result)


# -- stdout closed early ------------------------------------------------------------------------

BIG = "x" * 100_000 + "\n"  # more than a pipe holds (64 KiB)
BROKEN_PIPE = 141  # as a program that SIGPIPE ends


@pytest.fixture(scope="module")
def sim_proxy():
    """A proxy (its own process) in front of a simulated agent with a file
    larger than a pipe's buffer."""
    with sim_agent("--file", "/var/log/big=" + BIG) as agent:
        with proxy("unix:" + agent) as path:
            yield path


def run_closed(argv: list[str], stdin: bytes = b"", read_first: int = 0,
               env: dict | None = None) -> tuple[int, bytes, bytes]:
    """Run qgaproxy with stdout on a real pipe whose reader goes away: at
    once (read_first=0), or, like `| head -c N`, after reading N bytes.
    Returns (status, what was read, stderr)."""
    r, w = os.pipe()
    if not read_first:
        os.close(r)
    proc = subprocess.Popen(QGAPROXY + argv, stdin=subprocess.PIPE, stdout=w, stderr=subprocess.PIPE,
                            env=env or client_env())
    os.close(w)
    got = b""
    if read_first:
        with os.fdopen(r, "rb", buffering=0) as reader:
            while len(got) < read_first:
                ready, _, _ = select.select([reader], [], [], STEP)
                assert ready, "no output within %gs" % STEP
                chunk = reader.read(read_first - len(got))
                if not chunk:
                    break
                got += chunk
    _, stderr = proc.communicate(stdin, timeout=STEP)
    return proc.returncode, got, stderr


@pytest.mark.parametrize(
    "argv, stdin",
    [
        (["status", "--socket", "{sock}"], b""),
        (["status", "--socket", "{sock}", "--json"], b""),
        (["call", "--socket", "{sock}", "guest-info"], b""),
        (["call", "--socket", "{sock}", "info"], b""),
        (["shell", "--socket", "{sock}"], b"guest-info\ninfo\nping\n"),
    ],
    ids=["status", "status-json", "call", "call-form", "shell"],
)
def test_stdout_closed_before_any_output(sim_proxy, argv, stdin):
    argv = [word.replace("{sock}", sim_proxy) for word in argv]
    status, _, stderr = run_closed(argv, stdin)
    assert (status, stderr) == (BROKEN_PIPE, b"")


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_stdout_closed_during_cat(sim_proxy, unbuffered):
    """`qgaproxy call cat BIG | head -c 10`: the closed pipe stops the
    output midway; the client ends quietly (closing the guest file says
    nothing on stderr either). Unbuffered, the write that the closed pipe
    cuts short is seen too, not taken for the whole."""
    env = client_env(PYTHONUNBUFFERED=unbuffered)
    status, got, stderr = run_closed(["call", "--socket", sim_proxy, "cat", "/var/log/big"], read_first=10, env=env)
    assert got == b"x" * 10
    assert (status, stderr) == (BROKEN_PIPE, b"")


# -- qmp listeners --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_qmp_proxy():
    """A proxy with a qga and a qmp listener in front of a real qemu-ga."""
    require_real_agent()
    with RealAgent() as agent:
        with qmp_proxy("unix:" + str(agent.path)) as paths:
            yield paths




def status_json(path: str) -> dict:
    result = subprocess.run(QGAPROXY + ["status", "--socket", path, "--json"], capture_output=True,
                            timeout=STEP, env=client_env())
    assert result.returncode == 0, result
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", ["qmp", "qga"])
def test_call_shell_status_on_both_listener_kinds_real_agent(real_qmp_proxy, kind):
    """A qmp listener greets and wants qmp_capabilities first: the client
    negotiates and then works as on a qga listener."""
    path = real_qmp_proxy[kind]
    result = call(path, "guest-get-host-name")
    assert (result.returncode, out(result), err(result)) == (0, '{"host-name":%s}\n' % json.dumps(HOSTNAME), "")
    result = call(path, "info")
    assert result.returncode == 0, result
    assert out(result).startswith("version: "), out(result)
    result = shell_lines(path, ["guest-ping", "guest-get-host-name", "ping"])
    assert (result.returncode, err(result)) == (0, ""), result
    assert out(result) == '{"return":{}}\n{"return":{"host-name":%s}}\nok\n' % json.dumps(HOSTNAME)
    st = status_json(path)
    assert st["state"] == "ready", st
    clients = {listener["name"]: listener["clients"] for listener in st["listeners"]}
    (me,) = clients[kind]  # the status command's own connection
    assert me["exe"].startswith("python") and me["requests"] == (3 if kind == "qmp" else 1), me


def test_forms_through_a_qmp_listener_simulated_agent():
    """exec and cat (several round trips each) through a qmp listener."""
    with sim_agent("--file", "/etc/motd=hello from the guest\n") as agent:
        with qmp_proxy("unix:" + agent) as paths:
            result = call(paths["qmp"], "cat", "/etc/motd")
            assert (result.returncode, result.stdout) == (0, b"hello from the guest\n"), result
            result = call(paths["qmp"], "exec", "--", "/bin/echo", "hi")
            assert result.returncode == 0, result
            result = call(paths["qmp"], "ping")
            assert (result.returncode, out(result)) == (0, "ok\n"), result


class Greeter(FakeAgent):
    """A qmp-style server that greets, then refuses qmp_capabilities."""

    def __init__(self):
        super().__init__(None)

    def _serve(self):
        conn, _ = self.server.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            data = b""
            while b"qmp_capabilities" not in data:
                ready, _, _ = select.select([conn], [], [], STEP)
                chunk = conn.recv(65536) if ready else b""
                if not chunk:
                    return
                data += chunk
            caps = json.loads(data[data.rindex(b"{", 0, data.index(b"qmp_capabilities")):].split(b"\n")[0])
            conn.sendall(b'{"error": {"class": "GenericError", "desc": "no"}, "id": %s}\n'
                         % json.dumps(caps["id"]).encode())
            self._recv(conn)


def test_refused_negotiation_is_a_connection_problem():
    greeter = Greeter()
    try:
        result = call(greeter.path, "--timeout", "2", "guest-ping")
    finally:
        greeter.close()
    assert result.returncode == 3, result
    assert err(result) == "qgaproxy: %s refused qmp_capabilities: no\n" % greeter.path
