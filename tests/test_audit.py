"""The audit trail: who ran what on the guest, with nothing secret in it.

Clients are separate processes (socat, a python child) so that the pid,
uid, gid and executable in each record are checked against what the test
knows. guest-set-user-password goes to the real qemu-ga; guest-exec to the
simulated agent, because the real one here has it blocked (tests/realagent.py
blocks everything that could change the host).
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys

import pytest
import trio

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy import audit, cli, sim
from qgaproxy import config as configmod
from qgaproxy.audit import AuditConfig, AuditLog
from qgaproxy.config import ListenerConfig
from qgaproxy.policy import READ_ONLY
from qgaproxy.upstream import State
from test_cli import processes  # noqa: F401  (fixture)
from test_cli import sock_path

STEP = 10.0
PASSWORD = "Tr0ub4dor&3-audit"
PASSWORD_B64 = base64.b64encode(PASSWORD.encode()).decode()
EXEC_INPUT = base64.b64encode(b"the secret exec input").decode()
EXEC_ENV = "API_TOKEN=s3cr3t-t0ken"

# A client in its own process: sends one request, prints its pid and the reply.
CHILD = r"""
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
buf = b""
while not buf.endswith(b"\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
print(os.getpid())
sys.stdout.buffer.write(buf)
"""


def records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


async def socat(path: str, request: dict) -> tuple[int, dict]:
    """One request from a socat process: (its pid, the reply)."""

    def run():
        proc = subprocess.Popen(
            ["socat", "-t5", "-", "UNIX-CONNECT:" + path], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        out, _ = proc.communicate(json.dumps(request).encode(), timeout=STEP)
        return proc.pid, json.loads(out)

    return await trio.to_thread.run_sync(run)


async def python_child(path: str, request: dict) -> tuple[int, dict]:
    def run():
        done = subprocess.run(
            [sys.executable, "-c", CHILD, path], input=json.dumps(request).encode(), capture_output=True, timeout=STEP
        )
        assert done.returncode == 0, done.stderr
        pid, reply = done.stdout.split(b"\n", 1)
        return int(pid), json.loads(reply)

    return await trio.to_thread.run_sync(run)


def assert_peer(record: dict, pid: int, exe: str) -> None:
    assert record["pid"] == pid
    assert record["exe"] == exe
    assert record["uid"] == os.getuid()
    assert record["gid"] == os.getgid()
    assert record["origin"] == "client"


def assert_time(record: dict) -> None:
    import datetime

    datetime.datetime.strptime(record["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert record["time"].endswith("Z") and len(record["time"]) == 24


async def test_set_user_password_on_the_real_agent(real_agent, tmp_path):
    log_path = tmp_path / "audit.log"
    async with run_proxy(
        "unix:%s" % real_agent.path, audit=AuditConfig("full", str(log_path)), name="vm1"
    ) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        request = {
            "execute": "guest-set-user-password",
            "arguments": {"username": "root", "password": PASSWORD_B64, "crypted": False},
            "id": 1,
        }
        pid, reply = await socat(proxy.config.listen[0], request)
        # The agent here blocks it: its own error, recorded by class.
        assert reply["error"]["class"] == "CommandNotFound", reply
        ping_pid, ping = await socat(proxy.config.listen[0], {"execute": "guest-ping"})
        assert ping == {"return": {}}
        proxy.close_audit()
    text = log_path.read_text()
    assert PASSWORD not in text and PASSWORD_B64 not in text
    first, second = records(log_path)
    assert first["command"] == "guest-set-user-password"
    assert_peer(first, pid, "socat")
    assert_time(first)
    assert first["agent"] == "vm1" and first["listener"] == "proxy"
    assert first["arguments"] == {
        "username": "root",
        "password": "<redacted %d chars>" % len(PASSWORD_B64),
        "crypted": False,
    }
    assert first["outcome"] == "CommandNotFound"
    assert first["duration"] >= 0
    assert second["command"] == "guest-ping" and second["outcome"] == "ok"
    assert_peer(second, ping_pid, "socat")
    assert second["client"] != first["client"]
    assert "arguments" not in second  # it had none
    # What the proxy itself sent (syncs, guest-info, its freeze status check)
    # is not a client's and changes nothing: not recorded.
    assert len(records(log_path)) == 2
    assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600


async def test_exec_on_the_sim_denials_and_the_proxys_own_thaw(tmp_path):
    log_path = tmp_path / "audit.log"
    admin, monitoring = str(tmp_path / "admin.sock"), str(tmp_path / "mon.sock")
    configs = (ListenerConfig(admin, name="admin"), ListenerConfig(monitoring, name="monitoring", allow=READ_ONLY))
    async with run_proxy(
        "sim", [admin, monitoring], listeners=configs, audit=AuditConfig("full", str(log_path))
    ) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        request = {
            "execute": "guest-exec",
            "arguments": {"path": "/bin/cat", "arg": ["-"], "input-data": EXEC_INPUT, "env": [EXEC_ENV]},
            "id": "x",
        }
        pid, reply = await python_child(admin, request)
        assert "pid" in reply["return"], reply
        denied_pid, denied = await python_child(monitoring, request)
        assert denied["error"]["class"] == "CommandNotFound"
        # A client freezes the guest and leaves without thawing: the freeze
        # guard thaws it, recorded as the proxy's own.
        with trio.fail_after(STEP):
            async with await Client.connect(admin) as c:
                assert (await c.call("guest-fsfreeze-freeze"))["return"] == 2
            while not any(r["command"] == "guest-fsfreeze-thaw" for r in records(log_path)):
                await trio.sleep(0.01)
    text = log_path.read_text()
    assert EXEC_INPUT not in text and "the secret exec input" not in text and "s3cr3t" not in text
    run, refused, freeze, thaw = records(log_path)
    assert run["command"] == "guest-exec" and run["outcome"] == "ok"
    assert_peer(run, pid, os.path.basename(os.path.realpath(sys.executable)))
    assert run["listener"] == "admin"
    assert run["arguments"] == {
        "path": "/bin/cat",
        "arg": ["-"],
        "input-data": "<redacted %d chars>" % len(EXEC_INPUT),
        "env": "<redacted 1 items>",
    }
    assert refused["outcome"] == "denied" and refused["listener"] == "monitoring"
    assert_peer(refused, denied_pid, os.path.basename(os.path.realpath(sys.executable)))
    assert refused["duration"] == 0
    assert freeze["command"] == "guest-fsfreeze-freeze" and freeze["pid"] == os.getpid()
    assert thaw["origin"] == "qgaproxy" and thaw["outcome"] == "ok"
    assert thaw["client"] is None and thaw["pid"] is None and thaw["listener"] == "qgaproxy"


async def test_commands_mode_has_no_arguments_and_timeouts_unavailable(autojump_clock, tmp_path):
    log_path = tmp_path / "audit.log"
    agent = sim.SimAgent(sim.SimConfig(late={"guest-get-osinfo": 8.0}))
    async with run_proxy(
        "sim", sim_agent=agent, request_timeout=5.0, audit=AuditConfig("commands", str(log_path))
    ) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            await c.call("guest-set-user-password", {"username": "root", "password": PASSWORD_B64, "crypted": False})
            await c.call("guest-get-osinfo")  # times out
            await proxy.wait_state(State.READY)  # resynced
            await c.call("guest-sync", {"id": 5})  # answered by the proxy: not recorded
            await c.call("qgaproxy-status")  # likewise
            await c.call("guest-no-such-command")  # the agent's error, known to the proxy
    entries = records(log_path)
    assert [(e["command"], e["outcome"]) for e in entries] == [
        ("guest-set-user-password", "ok"),
        ("guest-get-osinfo", "timeout"),
        ("guest-no-such-command", "CommandNotFound"),
    ]
    assert all("arguments" not in e for e in entries)
    assert entries[1]["duration"] == pytest.approx(5.0)
    assert PASSWORD_B64 not in log_path.read_text()


async def test_unavailable_is_recorded(tmp_path):
    log_path = tmp_path / "audit.log"
    async with run_proxy("unix:%s" % (tmp_path / "none.sock"), audit=AuditConfig("full", str(log_path))) as proxy:
        async with await Client.connect(proxy.config.listen[0]) as c:
            with trio.fail_after(STEP):
                await c.call("guest-ping")
    (entry,) = records(log_path)
    assert entry["outcome"] == "unavailable" and entry["pid"] == os.getpid()


async def test_off_writes_nothing_and_costs_nothing(tmp_path):
    log_path = tmp_path / "audit.log"
    async with run_proxy("sim", audit=AuditConfig("off", str(log_path))) as proxy:
        assert proxy.router.audit is False and proxy.audit_log is None
        with trio.fail_after(STEP):
            await wait_ready(proxy)
            async with await Client.connect(proxy.config.listen[0]) as c:
                assert (await c.call("guest-ping")) == {"return": {}}
    assert not log_path.exists()


def test_rotation_at_the_size_bound_mode_0600(tmp_path):
    path = tmp_path / "audit.log"
    log = AuditLog(AuditConfig("full", str(path), max_bytes=4096, backups=2))
    sizes = []
    for i in range(100):
        log.write({"n": i, "pad": "x" * 150})
        sizes.append(os.path.getsize(path))
    log.close()
    line = len(json.dumps({"n": 10, "pad": "x" * 150}, separators=(",", ":"))) + 1
    # Never over the bound; rolled over when the next line would cross it.
    assert max(sizes) <= 4096
    assert sorted(os.listdir(tmp_path)) == ["audit.log", "audit.log.1", "audit.log.2"]
    for name in ("audit.log", "audit.log.1", "audit.log.2"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    kept = records(tmp_path / "audit.log.2") + records(tmp_path / "audit.log.1") + records(path)
    numbers = [r["n"] for r in kept]
    assert numbers == list(range(numbers[0], 100))  # the newest, in order, none lost between files
    assert os.path.getsize(tmp_path / "audit.log.1") > 4096 - line
    # Reopening appends (a restart does not truncate the trail).
    again = AuditLog(AuditConfig("full", str(path), max_bytes=4096, backups=2))
    again.write({"n": 100})
    again.close()
    assert records(path)[-1] == {"n": 100}


def test_record_truncates_huge_arguments():
    class Peerless:
        internal = False
        listener = "l"
        number = 3
        peer = (10, 20, 30)

    entry = audit.record(
        wall=0.0,
        agent="a",
        client=Peerless(),
        command="guest-file-open",
        arguments={"path": "/" + "p" * 10000},
        outcome="ok",
        duration=0.5,
        full=True,
    )
    assert len(entry["arguments"]) == audit.MAX_ARGUMENTS and entry["arguments_truncated"] > audit.MAX_ARGUMENTS
    assert (entry["pid"], entry["uid"], entry["gid"], entry["exe"]) == (10, 20, 30, None)
    assert entry["time"] == "1970-01-01T00:00:00.000Z"


def test_stderr_mode_through_the_cli(processes, tmp_path):  # noqa: F811
    path = sock_path(tmp_path)
    p = processes("serve", "--upstream", "sim", "--listen", path, "--audit", "stderr", "--audit-mode", "commands")
    p.wait_line(r"agent \w+ -> ready")
    proc = subprocess.Popen(["socat", "-t5", "-", "UNIX-CONNECT:" + path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = proc.communicate(
        json.dumps({"execute": "guest-set-user-password", "arguments": {"username": "u", "password": PASSWORD_B64}}).encode(),
        timeout=STEP,
    )
    assert b"return" in out or b"error" in out
    line = p.wait_line(r'^\{"time":.*"command":"guest-set-user-password"')
    entry = json.loads(line.string)
    assert_peer(entry, proc.pid, "socat")
    assert "arguments" not in entry
    assert p.stop() == 0
    assert PASSWORD_B64 not in p.rest_of_log()


def test_configuration_and_flags(tmp_path):
    def problems(text: str) -> list[str]:
        with pytest.raises(configmod.ConfigError) as err:
            configmod.parse(configmod.tomllib.loads(AGENT + text))
        return err.value.problems

    AGENT = '[[agent]]\nname = "a"\nupstream = "sim"\n[[agent.listener]]\npath = "%s"\n' % (tmp_path / "a.sock")
    ok = configmod.parse(configmod.tomllib.loads(AGENT + '[audit]\npath = "%s"\n' % (tmp_path / "audit.log")))
    assert ok.audit == AuditConfig("full", str(tmp_path / "audit.log"))  # a path alone: full
    assert configmod.parse(configmod.tomllib.loads(AGENT)).audit is None
    assert problems('[audit]\nmode = "loud"\npath = "stderr"\nmax_bytes = 10\nbackups = 0\ncolour = 1\n') == [
        "audit.colour: unknown key (known: backups, max_bytes, mode, path)",
        "audit.mode: must be off, commands, full, got 'loud'",
        "audit.max_bytes: must be 0 (never rotate) or at least 4096",
        "audit.backups: must be at least 1",
    ]
    assert problems('[audit]\nmode = "full"\n') == [
        'audit.path: is required when mode is not off (a file, or "stderr")'
    ]
    assert problems('[audit]\npath = "/no/such/dir/audit.log"\n') == [
        "audit.path: directory /no/such/dir does not exist"
    ]

    parser = cli.build_parser()
    base = ["serve", "--upstream", "sim", "--listen", str(tmp_path / "a.sock")]
    cfg = cli.build_config(parser.parse_args(base + ["--audit", "stderr"]))
    assert cfg.audit == AuditConfig("full", "stderr")
    cfg = cli.build_config(parser.parse_args(base + ["--audit", "stderr", "--audit-mode", "commands"]))
    assert cfg.audit.mode == "commands"
    with pytest.raises(cli._UsageError, match="needs --audit"):
        cli.build_config(parser.parse_args(base + ["--audit-mode", "full"]))
    assert cli.build_config(parser.parse_args(base)).audit is None


async def test_two_agents_one_trail_status_by_name_and_reload(tmp_path):
    from qgaproxy.server import Server
    from test_observability import http

    def toml(audit: str) -> str:
        text = '[metrics]\nlisten = "127.0.0.1:0"\n' + audit
        for name in ("vm1", "vm2"):
            text += '[[agent]]\nname = "%s"\nupstream = "sim"\n[[agent.listener]]\npath = "%s"\n' % (
                name,
                tmp_path / (name + ".sock"),
            )
        return text

    log_path = tmp_path / "audit.log"
    server = Server(configmod.parse(configmod.tomllib.loads(toml(""))))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        with trio.fail_after(STEP):
            for name in ("vm1", "vm2"):
                await server.agents[name].proxy.wait_state(State.READY)
            assert all(not r.proxy.router.audit for r in server.agents.values())
            port = server.metrics_listeners[0].socket.getsockname()[1]
            code, _, body = await http(port, "/status")
            assert code == 200 and set(json.loads(body)["agents"]) == {"vm1", "vm2"}
            # Reload with an [audit] section: the running agents start recording.
            await server.apply(configmod.parse(configmod.tomllib.loads(toml('[audit]\npath = "%s"\n' % log_path))))
            for name in ("vm1", "vm2"):
                async with await Client.connect(str(tmp_path / (name + ".sock"))) as c:
                    assert await c.call("guest-ping") == {"return": {}}
        nursery.cancel_scope.cancel()
    assert [(r["agent"], r["command"]) for r in records(log_path)] == [("vm1", "guest-ping"), ("vm2", "guest-ping")]
