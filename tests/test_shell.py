"""`qgaproxy shell` as a real process: on a terminal (a pty) with history
and completion, and reading lines from a pipe, against the proxy in front
of the real qemu-ga and against the simulated agent.
"""

from __future__ import annotations

import json
import socket

import pytest

from operatorutil import QGAPROXY, client_env, proxy, shell_lines, sim_agent
from ptyutil import PtyProcess
from realagent import RealAgent, require_real_agent

HOSTNAME = socket.gethostname()
PROMPT = r"qga> "


@pytest.fixture(scope="module")
def real_proxy():
    require_real_agent()
    with RealAgent() as agent:
        with proxy("unix:" + str(agent.path)) as path:
            yield path



def test_session_on_a_terminal(real_proxy, tmp_path):
    """Completion, a command with arguments, errors, quit; then the history
    of the first run in a second one."""
    env = client_env(XDG_STATE_HOME=str(tmp_path / "state"), TERM="dumb")
    argv = QGAPROXY + ["shell", "--socket", real_proxy]
    with PtyProcess(argv, env=env) as p:
        p.expect(r"qgaproxy shell on .*: \d+ agent commands")
        p.expect(PROMPT)
        p.send("guest-get-host-n\t")  # completed to its full name
        p.expect("guest-get-host-name")
        p.send("\r")
        p.expect(r'\{"return":\{"host-name":%s\}\}\n' % json.dumps(HOSTNAME))
        p.expect(PROMPT)
        p.send("ifcon\t\r")  # a convenience form completes too
        p.expect(r"INTERFACE +HARDWARE ADDRESS")
        p.expect(PROMPT)
        p.send("guest-file-open path=/etc/hostname mode=r\r")
        handle = int(p.expect(r'\{"return":(\d+)\}\n').group(1))
        p.expect(PROMPT)
        p.send("guest-file-read handle=%d count=100\r" % handle)
        reply = p.expect(r'(\{"return":\{.*\}\})\n').group(1)
        assert json.loads(reply)["return"]["eof"] is True
        p.expect(PROMPT)
        p.send("guest-nope\r")  # the agent's error
        p.expect(r'\{"error":\{"class":"CommandNotFound","desc":"The command guest-nope has not been found"\}\}\n')
        p.expect(PROMPT)
        p.send("guest-ping stray\r")  # a local error
        p.expect(r"error: expected KEY=VALUE or KEY:=JSON, got 'stray'\n")
        p.expect(PROMPT)
        p.send('{"execute": "guest-ping", "id": "mine"}\r')  # a raw request
        p.expect(r'\{"return":\{\},"id":"mine"\}\n')
        p.expect(PROMPT)
        # Blocked on the real agent here; its password never reaches the history.
        p.send("guest-set-user-password username=nobody password=s3cret crypted=false\r")
        p.expect(r'\{"error":\{"class":"CommandNotFound"')
        p.expect(PROMPT)
        p.send("guest-get-timezone\r")
        p.expect(r'\{"return":\{.*"offset":')
        p.expect(PROMPT)
        p.send("quit\r")
        assert p.wait() == 0
    history_file = tmp_path / "state" / "qgaproxy" / "history"
    history = history_file.read_text().splitlines()
    assert history[-2:] == ["guest-get-timezone", "quit"], history
    assert "guest-get-host-name" in history
    assert "s3cret" not in history_file.read_text()
    assert history_file.stat().st_mode & 0o077 == 0

    with PtyProcess(argv, env=env) as p:
        p.expect(PROMPT)
        p.send("\x10\x10")  # Ctrl-P twice: the line before `quit`
        p.expect("guest-get-timezone")
        p.send("\r")
        p.expect(r'\{"return":\{.*"offset":')
        p.expect(PROMPT)
        p.send("\x04")  # Ctrl-D leaves
        assert p.wait() == 0


def test_lines_from_a_pipe(real_proxy):
    result = shell_lines(real_proxy, [
        "guest-ping",
        "# a comment, and an empty line",
        "",
        "guest-get-host-name",
        "guest-file-open path:='\"/nonexistent\"'",
        "not-a-command x=1",
        '{"execute": "guest-ping", "id": 3}',
        '["not", "an", "object"]',
        "ping",
        "cat /etc/hostname",
        "quit",
        "guest-ping",
    ])
    assert result.returncode == 0, result
    with open("/etc/hostname") as f:
        hostname_file = f.read()
    assert result.stdout.decode() == "".join([
        '{"return":{}}\n',
        '{"return":{"host-name":%s}}\n' % json.dumps(HOSTNAME),
        '{"error":{"class":"GenericError","desc":"failed to open file \'/nonexistent\' (mode: \'r\'): No such file or directory"}}\n',
        '{"error":{"class":"CommandNotFound","desc":"The command not-a-command has not been found"}}\n',
        '{"return":{},"id":3}\n',
        "ok\n",
        hostname_file,
    ])
    assert result.stderr == b"error: a request is a JSON object\n"
    # No prompt and no banner without a terminal.
    assert "qga>" not in result.stdout.decode()


def test_freeze_thaw_and_exec_in_one_session():
    """Through the proxy, a freeze lasts while the client that made it
    stays connected: the shell holds it."""
    with proxy("sim") as path:
        result = shell_lines(path, [
            "freeze",
            "fsfreeze-status",
            "guest-get-host-name",
            "thaw",
            "fsfreeze-status",
            "exec /bin/echo hello",
            "exec -- /bin/false",
            "cat /nonexistent",
        ])
    assert result.returncode == 0, result
    assert result.stdout.decode().splitlines() == [
        "2 filesystems frozen",
        "frozen",
        '{"error":{"class":"CommandNotFound","desc":"Command guest-get-host-name has been disabled: '
        'the agent is in frozen state"}}',
        "2 filesystems thawed",
        "thawed",
        "hello",
        "[exit status 0]",
        "[exit status 1]",
    ]
    assert result.stderr.decode().startswith("error: GenericError: ")


def test_a_timeout_does_not_end_the_shell():
    """A reply that comes too late is skipped; the next command works."""
    with sim_agent("--command-latency", "guest-get-time=1.5") as path:
        result = shell_lines(path, ["guest-get-time", "guest-get-host-name"], "--timeout", "1.2")
    assert result.returncode == 0, result
    assert result.stderr.decode() == "error: timeout: no reply to guest-get-time within 1.2 s\n"
    assert result.stdout == b'{"return":{"host-name":"qgasim"}}\n'


def test_no_agent():
    result = shell_lines("/nonexistent/qga.sock", ["guest-ping"])
    assert result.returncode == 3
    assert result.stderr.decode() == "qgaproxy: cannot connect to /nonexistent/qga.sock: No such file or directory\n"
