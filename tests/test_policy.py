"""Listener policy: which commands a socket may run (allow/deny globs),
who may connect (SO_PEERCRED uids and gids), how many at once; the policy
keys of the configuration file; and the commands the proxy answers itself
because it already knows the agent's answer.

The policy tests run against the real qemu-ga (as nobody, dangerous
commands blocked; see tests/realagent.py); the peer-credential tests use
real client processes started as user nobody. Where a test must prove
that a request never reached the agent it reads the agent's own verbose
log (every request it reads is logged), after a marker request that did
reach it; the simulated agent's `received` list does the same job where
MockClock time is used.
"""

from __future__ import annotations

import base64
import grp
import json
import logging
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest
import trio
import trio.testing

from proxyutil import Client, Watch, metric, run_proxy, wait_ready
from qgaproxy import config as configmod
from qgaproxy import sim
from qgaproxy.config import ListenerConfig

STEP = 10.0  # a bound that only turns a hang into a failure

READ_ONLY = ("guest-ping", "guest-info", "guest-get-*", "guest-network-get-interfaces", "guest-sync*")

NOBODY_PYTHON = "/usr/bin/python3"  # root's pyenv python is under /root (0700)


def denied(command: str, listener: str, ident: bytes | None) -> bytes:
    """What a policy denial looks like on the wire: the agent's own shape
    for a disabled command (id first, as the agent writes it)."""
    body = (
        b'"error": {"class": "CommandNotFound", "desc": "Command %s has been disabled: '
        b"denied by qgaproxy policy of listener '%s'\"}}\n" % (command.encode(), listener.encode())
    )
    return (b'{"id": ' + ident + b", " if ident is not None else b"{") + body


def executed(agent, command: str) -> int:
    """How many requests for `command` the real agent has read (its -v log
    shows every request it reads, as the proxy serialized it)."""
    return agent.log_path.read_bytes().count(b'"execute": "%s"' % command.encode())


async def reach_agent_marker(client: Client, agent) -> None:
    """Send a request that the agent must execute (a file open of a unique
    path that does not exist), wait for its reply, and check the agent
    logged it: everything sent to the agent before it is in the log now."""
    mark = "/nonexistent-qgaproxy-marker/%s" % uuid.uuid4().hex
    with trio.fail_after(STEP):
        reply = await client.call("guest-file-open", {"path": mark}, id="marker")
    assert reply["id"] == "marker" and "failed to open file" in reply["error"]["desc"], reply
    assert mark.encode() in agent.log_path.read_bytes(), "the agent log lags behind its replies"


async def raw_call(client: Client, payload: bytes) -> bytes:
    await client.send(payload)
    with trio.fail_after(STEP):
        return await client.read_line()


@pytest.fixture
def guest_dir():
    """A directory user nobody (the real agent) can use: world-accessible,
    with a file it may read and write."""
    tmp = tempfile.mkdtemp(prefix="qgaproxy-policy-")
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "data.txt")
    with open(path, "wb") as f:
        f.write(b"original content of the guest file\n")
    os.chmod(path, 0o666)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def direct_replies(agent, payloads: list[bytes]) -> list[bytes]:
    """The real agent's own replies, measured on a direct connection (before
    any proxy connects: the agent serves one client at a time)."""
    with agent.connect(timeout=STEP) as conn:
        conn.sync()
        return [conn.request(p) for p in payloads]


# -- allow / deny ---------------------------------------------------------------------


async def test_read_only_listener_denies_admin_listener_runs(real_agent, guest_dir, caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    data_path = os.path.join(guest_dir, "data.txt")
    exec_request = b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}, "id": "e1"}\n'
    (agent_exec,) = direct_replies(real_agent, [exec_request])
    # The agent's own block: no policy reason in it.
    assert agent_exec == (
        b'{"id": "e1", "error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled"}}\n'
    )

    exec_before = executed(real_agent, "guest-exec")  # the direct measurement's
    sockdir = tempfile.mkdtemp(prefix="qgaproxy-listeners-")
    ro_path, admin_path = os.path.join(sockdir, "ro.sock"), os.path.join(sockdir, "admin.sock")
    listeners = (
        ListenerConfig(ro_path, name="monitoring", allow=READ_ONLY),
        ListenerConfig(admin_path, name="admin"),
    )
    try:
        async with run_proxy("unix:" + str(real_agent.path), [ro_path, admin_path], listeners=listeners) as proxy:
            with trio.fail_after(STEP):
                await wait_ready(proxy)
            async with await Client.connect(ro_path) as ro, await Client.connect(admin_path) as admin:
                # Through the read-only socket: refused by the proxy, with the
                # client's id (any JSON value) first, as the agent writes it.
                open_req = json.dumps(
                    {"execute": "guest-file-open", "arguments": {"path": data_path, "mode": "r+"}, "id": "o1"}
                ).encode()
                assert await raw_call(ro, open_req) == denied("guest-file-open", "monitoring", b'"o1"')
                write_req = (
                    b'{"execute": "guest-file-write", "arguments": {"handle": 1000, "buf-b64": "aGk="}, '
                    b'"id": {"k": [1, "two"]}}'
                )
                assert await raw_call(ro, write_req) == denied("guest-file-write", "monitoring", b'{"k": [1, "two"]}')
                assert await raw_call(ro, exec_request) == denied("guest-exec", "monitoring", b'"e1"')
                # without an id: no id in the reply either
                assert await raw_call(ro, b'{"execute": "guest-file-write", "arguments": {"handle": 1000, '
                                          b'"buf-b64": "aGk="}}') == denied("guest-file-write", "monitoring", None)
                # What the read-only socket may do still works.
                assert await raw_call(ro, b'{"execute": "guest-ping", "id": 1}') == b'{"return": {}, "id": 1}\n'
                host = await ro.call("guest-get-host-name", id="h")
                assert host["id"] == "h" and host["return"]["host-name"] == socket.gethostname()
                assert await raw_call(ro, b'{"execute": "guest-sync-delimited", "arguments": {"id": 42}}') == (
                    b'\xff{"return": 42}\n'
                )
                info = await ro.call("guest-info")
                assert isinstance(info["return"]["version"], str) and info["return"]["supported_commands"]

                # None of the denied requests reached the agent.
                await reach_agent_marker(admin, real_agent)
                assert executed(real_agent, "guest-file-write") == 0
                assert executed(real_agent, "guest-exec") == exec_before
                # (the marker is a file open too: look for this file's opens)
                assert data_path.encode() not in real_agent.log_path.read_bytes()

                # Through the admin socket they run, with the agent's own replies.
                reply = await admin.call("guest-file-open", {"path": data_path, "mode": "r+"}, id="o2")
                handle = reply["return"]
                assert type(handle) is int, reply
                text = b"written through the admin socket"
                reply = await admin.call(
                    "guest-file-write", {"handle": handle, "buf-b64": base64.b64encode(text).decode()}, id="w"
                )
                assert reply == {"return": {"count": len(text), "eof": False}, "id": "w"}
                assert await admin.call("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"}) == {
                    "return": {"position": 0, "eof": False}
                }
                reply = await admin.call("guest-file-read", {"handle": handle, "count": len(text)})
                assert base64.b64decode(reply["return"]["buf-b64"]) == text
                assert await admin.call("guest-file-close", {"handle": handle}, id=9) == {"return": {}, "id": 9}
                with open(data_path, "rb") as f:
                    assert f.read().startswith(text)  # the guest file really changed
                assert executed(real_agent, "guest-file-write") == 1

                # guest-exec is blocked in the agent itself: the admin client
                # gets the agent's own text, byte for byte, without the
                # policy's reason, so a client can tell the two apart.
                admin_exec = await raw_call(admin, exec_request)
                assert admin_exec == agent_exec
                assert admin_exec != denied("guest-exec", "monitoring", b'"e1"')
                assert executed(real_agent, "guest-exec") == exec_before + 1

            denials = metric(proxy, "qgaproxy_policy_denials_total", listener="monitoring")
            assert denials == 4
            assert metric(proxy, "qgaproxy_policy_denials_total", listener="admin") is None
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    logged = [r.getMessage() for r in caplog.records if "denied by policy" in r.getMessage()]
    assert any("on monitoring: guest-file-write denied by policy" in m for m in logged), logged


async def test_deny_wins_and_globs(autojump_clock, tmp_path):
    agent = sim.SimAgent(sim.SimConfig(files={"/tmp/f": b"x"}))
    listeners = (
        # everything but the file commands
        ListenerConfig(str(tmp_path / "a.sock"), name="nofiles", allow=("*",), deny=("guest-file-*",)),
        # globs: *, ?, [...] ; anchored at both ends; case sensitive
        ListenerConfig(
            str(tmp_path / "b.sock"),
            name="globs",
            allow=("guest-get-*", "guest-p?ng", "guest-file-[or]*", "guest-sync*", "guest-info"),
            deny=("guest-get-[uv]*", "guest-get-time"),
        ),
    )
    paths = [l.path for l in listeners]
    async with run_proxy("sim", paths, sim_agent=agent, listeners=listeners) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(paths[0]) as a, await Client.connect(paths[1]) as b:
            # the proxy's own start-up request (guest-fsfreeze-status) is done
            assert await a.call("guest-ping") == {"return": {}}

            async def outcome(client, listener, command, arguments=None):
                """'denied' (the proxy's policy answer, nothing sent to the
                agent) or 'agent' (the request reached the agent)."""
                before = len(agent.received)
                reply = await client.call(command, arguments, id=command)
                reached = len(agent.received) - before
                if reply.get("error", {}).get("desc", "").endswith("qgaproxy policy of listener '%s'" % listener):
                    assert reply == {
                        "id": command,
                        "error": {
                            "class": "CommandNotFound",
                            "desc": "Command %s has been disabled: denied by qgaproxy policy of listener '%s'"
                            % (command, listener),
                        },
                    }
                    assert reached == 0, "a denied %s reached the agent" % command
                    return "denied"
                assert reached == 1, (command, reply)
                return "agent"

            # allow ["*"], deny ["guest-file-*"]: deny wins
            assert await outcome(a, "nofiles", "guest-file-open", {"path": "/tmp/f"}) == "denied"
            assert await outcome(a, "nofiles", "guest-file-read", {"handle": 1000}) == "denied"
            assert await outcome(a, "nofiles", "guest-ping") == "agent"
            assert await outcome(a, "nofiles", "guest-get-osinfo") == "agent"
            assert await outcome(a, "nofiles", "guest-exec", {"path": "/bin/true"}) == "agent"

            expected = {
                "guest-get-osinfo": "agent",  # guest-get-*
                "guest-get-host-name": "agent",
                "guest-get-users": "denied",  # deny guest-get-[uv]*
                "guest-get-vcpus": "denied",
                "guest-get-time": "denied",  # exact deny
                "guest-get-timezone": "agent",  # deny is anchored: guest-get-time is not a prefix match
                "guest-ping": "agent",  # guest-p?ng
                "guest-info": "agent",
                "guest-file-open": "agent",  # guest-file-[or]*
                "guest-file-write": "denied",
                "guest-file-close": "denied",  # [or] is one character, then *: close starts with c
                "guest-network-get-interfaces": "denied",  # not allowed at all
                "guest-exec": "denied",
                "GUEST-PING": "denied",  # case sensitive
            }
            arguments = {"guest-file-open": {"path": "/tmp/f"}, "guest-file-write": {"handle": 1, "buf-b64": ""},
                         "guest-file-close": {"handle": 1}, "guest-exec": {"path": "/bin/true"}}
            got = {c: await outcome(b, "globs", c, arguments.get(c)) for c in expected}
            assert got == expected
            # guest-sync* admits both syncs (answered by the proxy itself)
            assert await b.call("guest-sync", {"id": 5}) == {"return": 5}
            assert await b.call("guest-sync-delimited", {"id": 6}) == {"return": 6}


# -- who may connect -------------------------------------------------------------------

NOBODY_CLIENT = r"""
import json, socket, sys
path = sys.argv[1]
out = {"uid": __import__("os").getuid(), "groups": __import__("os").getgroups(), "got": "", "closed": False, "error": None}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(path)
    s.sendall(b'{"execute": "guest-ping", "id": "from-nobody"}')
    buf = b""
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            out["closed"] = True
            break
        buf += chunk
    out["got"] = buf.decode("latin-1")
except OSError as e:
    out["error"] = type(e).__name__
    out["closed"] = True
print(json.dumps(out))
"""


async def run_as_nobody(path: str, groups: str | None = None) -> dict:
    """A real client process as user nobody (group nogroup), optionally
    with supplementary groups; it pings through `path` and reports."""
    if not os.access(NOBODY_PYTHON, os.X_OK) or shutil.which("setpriv") is None:
        pytest.skip("needs setpriv and %s" % NOBODY_PYTHON)
    argv = ["setpriv", "--reuid=nobody", "--regid=nogroup"]
    argv += ["--groups=%s" % groups] if groups else ["--clear-groups"]
    argv += [NOBODY_PYTHON, "-c", NOBODY_CLIENT, path]
    with trio.fail_after(30):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


PONG = '{"return": {}, "id": "from-nobody"}\n'


async def test_peer_credentials(real_agent, caplog):
    if os.geteuid() != 0:
        pytest.skip("needs root to start clients as nobody")
    caplog.set_level(logging.INFO, logger="qgaproxy")
    nogroup = grp.getgrnam("nogroup").gr_gid
    nobody = pwd.getpwnam("nobody").pw_uid
    extra_gid = 4242  # a supplementary group only the test's nobody client gets
    # A world-accessible directory; every socket 0660 with group nogroup, so
    # that user nobody CAN open each socket file: any refusal below comes
    # from SO_PEERCRED, not from the file mode.
    sockdir = tempfile.mkdtemp(prefix="qgaproxy-peers-")
    os.chmod(sockdir, 0o755)
    paths = {name: os.path.join(sockdir, name + ".sock") for name in ("rootonly", "open", "bygroup")}
    listeners = (
        ListenerConfig(paths["rootonly"], mode=0o660, group=nogroup, name="rootonly", peer_uids=(0,)),
        ListenerConfig(paths["open"], mode=0o660, group=nogroup, name="open"),
        ListenerConfig(paths["bygroup"], mode=0o660, group=nogroup, name="bygroup", peer_gids=(extra_gid,)),
    )
    try:
        async with run_proxy("unix:" + str(real_agent.path), list(paths.values()), listeners=listeners) as proxy:
            with trio.fail_after(STEP):
                await wait_ready(proxy)
            for path in paths.values():
                st = os.stat(path)
                assert st.st_gid == nogroup and st.st_mode & 0o777 == 0o660

            # Control: nobody can use a socket without peer rules.
            out = await run_as_nobody(paths["open"])
            assert out["uid"] == nobody and out["groups"] == []
            assert out["got"] == PONG, out

            # peer_uids = [0]: nobody is refused, closed without a reply.
            out = await run_as_nobody(paths["rootonly"])
            assert out["got"] == "" and out["closed"], out
            refused = metric(proxy, "qgaproxy_clients_refused_total", listener="rootonly", reason="peer not allowed")
            assert refused == 1
            # the refused connection never became a client
            assert metric(proxy, "qgaproxy_clients_connected", listener="rootonly") is None
            # root is admitted
            async with await Client.connect(paths["rootonly"]) as root_client:
                with trio.fail_after(STEP):
                    assert await root_client.call("guest-ping", id=1) == {"return": {}, "id": 1}

            # peer_gids: a supplementary group admits, its absence refuses
            out = await run_as_nobody(paths["bygroup"], groups=str(extra_gid))
            assert out["groups"] == [extra_gid] and out["got"] == PONG, out
            out = await run_as_nobody(paths["bygroup"])
            assert out["got"] == "" and out["closed"], out
            assert metric(proxy, "qgaproxy_clients_refused_total", listener="bygroup", reason="peer not allowed") == 1
            assert metric(proxy, "qgaproxy_clients_refused_total", listener="open") is None
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    refusals = [r.getMessage() for r in caplog.records if "refused a client" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert refusals[0].startswith("refused a client on rootonly: peer not allowed (pid ")
    assert "uid %d" % nobody in refusals[0]
    assert "uid %d" % nobody in refusals[1] and "gids %d" % nogroup in refusals[1]


def test_peer_groups_from_the_socket():
    """SO_PEERGROUPS gives a peer's supplementary groups with no /proc
    (pid 0 here: /proc cannot help); the primary group always counts."""
    script = ("import socket, sys\n"
              "from qgaproxy import transport\n"
              "a, b = socket.socketpair()\n"
              "print(sorted(transport.peer_groups(0, 12345, a)), sorted(transport.peer_groups(0, 12345)))\n")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to set supplementary groups")
    groups = "4242,4243,%d" % grp.getgrnam("nogroup").gr_gid
    result = subprocess.run(["setpriv", "--groups=" + groups, sys.executable, "-c", script],
                            capture_output=True, text=True, timeout=STEP)
    assert result.returncode == 0, result.stderr
    nogroup = grp.getgrnam("nogroup").gr_gid
    assert result.stdout == "%s [12345]\n" % sorted([4242, 4243, nogroup, 12345])


#: A group nothing here has: the gid= of a hidepid /proc mount sees all.
PROC_GID = 4249

#: argv prefix: what follows runs as root but sees /proc as a service under
#: ProtectProc=invisible does (a private mount namespace, /proc mounted
#: again with hidepid=invisible, no CAP_SYS_PTRACE): other users'
#: processes are not there.
HIDDEN_PROC = [
    "unshare", "-m", "sh", "-c", 'mount -t proc -o hidepid=invisible,gid=%d proc /proc && exec "$@"' % PROC_GID, "sh",
    "setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace", "--",
]

_PROC_PROBE = """\
import sys
from qgaproxy import transport
print(sorted(transport.peer_groups(int(sys.argv[1]), 0) - {0}))  # from /proc: no socket
"""


async def test_peer_gids_with_hidden_proc(tmp_path):
    """A proxy that cannot see other users' processes in /proc (the shipped
    units' ProtectProc=invisible) still admits a peer by a supplementary
    group, and still refuses one without it."""
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "setpriv")):
        pytest.skip("needs root, unshare and setpriv")
    extra_gid = 4242
    # First, that /proc is blind there: a process of nobody's with the group.
    holder = subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--groups=%d" % extra_gid, "cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        probes = [
            subprocess.run(prefix + [sys.executable, "-c", _PROC_PROBE, str(holder.pid)],
                           capture_output=True, text=True, timeout=STEP)
            for prefix in ([], HIDDEN_PROC)
        ]
    finally:
        holder.stdin.close()
        holder.wait(STEP)
    if probes[1].returncode != 0:
        pytest.skip("cannot mount a hidden /proc here: %s" % probes[1].stderr.strip())
    assert [p.stdout for p in probes] == ["[%d]\n" % extra_gid, "[]\n"], probes

    from test_cli import READY_RE, ProxyProcess

    sockdir = tempfile.mkdtemp(prefix="qgaproxy-hidden-")
    os.chmod(sockdir, 0o755)
    path = os.path.join(sockdir, "bygroup.sock")
    cfg = tmp_path / "proxy.toml"
    cfg.write_text('[[agent]]\nname = "vm"\nupstream = "sim"\n[[agent.listener]]\npath = "%s"\nmode = "0660"\n'
                   'group = "nogroup"\npeer_gids = [%d]\n' % (path, extra_gid))
    proxy = ProxyProcess(HIDDEN_PROC + [sys.executable, "-m", "qgaproxy", "serve", "--config", str(cfg)])
    try:
        proxy.wait_line(READY_RE)
        out = await run_as_nobody(path, groups=str(extra_gid))
        assert out["groups"] == [extra_gid] and out["got"] == PONG, (out, proxy.rest_of_log())
        out = await run_as_nobody(path)
        assert out["got"] == "" and out["closed"], out
        proxy.find_line(r"refused a client on bygroup: peer not allowed \(pid \d+, uid %d, gids %d\)"
                        % (pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid))
        assert proxy.stop() == 0
    finally:
        proxy.kill()
        shutil.rmtree(sockdir, ignore_errors=True)


async def test_max_clients(autojump_clock, tmp_path):
    path = str(tmp_path / "limited.sock")
    listeners = (ListenerConfig(path, name="limited", max_clients=2),)
    async with run_proxy("sim", [path], listeners=listeners) as proxy:
        await wait_ready(proxy)
        watch = Watch(proxy)

        def refused():
            return metric(proxy, "qgaproxy_clients_refused_total", listener="limited", reason="too many clients")

        def connected():
            return metric(proxy, "qgaproxy_clients_connected", listener="limited")

        first = await Client.connect(path)
        second = await Client.connect(path)
        assert await first.call("guest-ping", id=1) == {"return": {}, "id": 1}
        assert await second.call("guest-ping", id=2) == {"return": {}, "id": 2}
        # The third is closed at once: no reply, end of file.
        third = await Client.connect(path)
        with trio.fail_after(STEP):
            try:
                await third.send(b'{"execute": "guest-ping", "id": 3}')
                assert await third.at_eof()
            except trio.BrokenResourceError:
                pass  # already closed (EPIPE), or closed with our request unread (reset): no reply either way
        assert third.buf == b""
        await third.aclose()
        assert refused() == 1
        assert connected() == 2
        # One leaves; then a new one is admitted.
        await first.aclose()
        await watch.until(lambda: connected() == 1, STEP, "the first client's departure")
        async with await Client.connect(path) as fourth:
            assert await fourth.call("guest-ping", id=4) == {"return": {}, "id": 4}
            assert refused() == 1
            # full again
            async with await Client.connect(path) as fifth:
                with trio.fail_after(STEP):
                    assert await fifth.at_eof()
            assert refused() == 2
        # the second client was never disturbed
        assert await second.call("guest-ping", id=5) == {"return": {}, "id": 5}
        await second.aclose()


# -- configuration ----------------------------------------------------------------------


POLICY_TOML = """
[limits]
max_buffered_bytes = 268435456

[[agent]]
name = "vm1"
upstream = "sim"
freeze_max = 30

  [[agent.listener]]
  name = "admin"
  path = "{dir}/admin.sock"
  deny = ["guest-set-user-password", "guest-ssh-*"]

  [[agent.listener]]
  name = "monitoring"
  path = "{dir}/monitoring.sock"
  allow = ["guest-ping", "guest-info", "guest-get-*", "guest-network-get-interfaces", "guest-sync*"]
  peer_uids = [0, "nobody"]
  peer_gids = ["nogroup", 4242]
  max_clients = 16
"""


def test_config_policy_keys_load(tmp_path):
    path = tmp_path / "qgaproxy.toml"
    path.write_text(POLICY_TOML.format(dir=tmp_path))
    cfg = configmod.load(str(path))
    assert cfg.max_buffered_bytes == 256 << 20
    (agent,) = cfg.agents
    assert agent.settings.freeze_max == 30.0
    admin, monitoring = agent.listeners
    assert admin.allow == ("*",) and admin.deny == ("guest-set-user-password", "guest-ssh-*")
    assert admin.peer_uids == () and admin.max_clients == 1024
    assert monitoring.allow == READ_ONLY and monitoring.deny == ()
    assert monitoring.peer_uids == (0, pwd.getpwnam("nobody").pw_uid)
    assert monitoring.peer_gids == (grp.getgrnam("nogroup").gr_gid, 4242)
    assert monitoring.max_clients == 16
    policy = monitoring.policy()
    assert policy.name == "monitoring"
    assert policy.allows("guest-get-osinfo") and not policy.allows("guest-file-open")
    assert policy.denial_reason() == "denied by qgaproxy policy of listener 'monitoring'"
    assert admin.policy().allows("guest-file-open") and not admin.policy().allows("guest-ssh-add-authorized-keys")

    result = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "OK: 1 agent(s)" in result.stdout


BAD_TOML = """
[limits]
max_buffered_bytes = 1000

[[agent]]
name = "vm1"
upstream = "sim"
freeze_max = 0

  [[agent.listener]]
  path = "{dir}/a.sock"
  allow = "x"
  deny = ["guest-file-*", ""]
  peer_uids = ["no-such-user", -1]
  peer_gids = ["no-such-group-qgaproxy"]
  max_clients = 0

  [[agent.listener]]
  path = "{dir}/b.sock"
  peer_uids = "root"
  max_clients = true
"""


def test_check_config_rejects_bad_policy_values(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_TOML.format(dir=tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    problems = [line[len(str(path)) + 2:] for line in result.stderr.splitlines() if line.startswith(str(path) + ": ")]
    expected = [
        "limits.max_buffered_bytes: must be at least 1048576",
        "agent[0].listener[0].allow: must be an array of command name patterns",
        "agent[0].listener[0].deny: must be an array of command name patterns",
        "agent[0].listener[0].peer_uids[0]: no such user 'no-such-user'",
        "agent[0].listener[0].peer_uids[1]: must be a user name or uid",
        "agent[0].listener[0].peer_gids[0]: no such group 'no-such-group-qgaproxy'",
        "agent[0].listener[0].max_clients: must be at least 1",
        "agent[0].listener[1].peer_uids: must be an array",
        "agent[0].listener[1].max_clients: must be an integer, not a boolean",
        "agent[0].freeze_max: must be positive",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert problems[-1] == "%d problem(s)" % (len(problems) - 1), problems
    # the same file never starts a proxy
    serve = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "serve", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert serve.returncode == 2 and "agent[0].listener[0].max_clients" in serve.stderr


# -- answers the proxy knows without asking ---------------------------------------------------


async def test_unknown_and_disabled_commands_answered_locally_real_agent(real_agent):
    bogus = b'{"execute": "guest-bogus", "arguments": {"a": 1}, "id": ["b", 1]}'
    exec_ = b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}, "id": 77}'
    direct_bogus, direct_exec = direct_replies(real_agent, [bogus + b"\n", exec_ + b"\n"])
    assert direct_bogus == (
        b'{"id": ["b", 1], "error": {"class": "CommandNotFound", "desc": "The command guest-bogus has not been found"}}\n'
    )
    assert direct_exec == (
        b'{"id": 77, "error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled"}}\n'
    )
    bogus_before, exec_before = executed(real_agent, "guest-bogus"), executed(real_agent, "guest-exec")
    async with run_proxy("unix:" + str(real_agent.path)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            # unknown: answered by the proxy from the first call on
            assert await raw_call(c, bogus) == direct_bogus
            assert await raw_call(c, bogus) == direct_bogus
            await reach_agent_marker(c, real_agent)
            assert executed(real_agent, "guest-bogus") == bogus_before
            # disabled: the first call asks the agent, the next ones do not
            assert await raw_call(c, exec_) == direct_exec
            await reach_agent_marker(c, real_agent)
            assert executed(real_agent, "guest-exec") == exec_before + 1
            for _ in range(3):
                assert await raw_call(c, exec_) == direct_exec
            await reach_agent_marker(c, real_agent)
            assert executed(real_agent, "guest-exec") == exec_before + 1


async def test_unknown_and_disabled_commands_answered_locally_sim(autojump_clock):
    agent = sim.SimAgent(sim.SimConfig(blocked={"guest-exec"}))

    def asked(command):
        return sum(1 for r in agent.received if isinstance(r.value, dict) and r.value.get("execute") == command)

    async with run_proxy("sim", sim_agent=agent) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            # the proxy's own start-up request (guest-fsfreeze-status) is done
            assert await c.call("guest-ping") == {"return": {}}
            before = len(agent.received)
            reply = await raw_call(c, b'{"execute": "guest-bogus", "id": "u"}')
            assert reply == (
                b'{"id": "u", "error": {"class": "CommandNotFound", "desc": "The command guest-bogus has not been found"}}\n'
            )
            assert len(agent.received) == before
            first = await raw_call(c, b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}, "id": "x"}')
            assert first == (
                b'{"id": "x", "error": {"class": "CommandNotFound", "desc": "Command guest-exec has been disabled"}}\n'
            )
            assert asked("guest-exec") == 1
            second = await raw_call(c, b'{"execute": "guest-exec", "arguments": {"path": "/bin/true"}, "id": "x"}')
            assert second == first
            assert asked("guest-exec") == 1
            # guest-get-devices is always disabled on Linux: same rule
            one = await raw_call(c, b'{"execute": "guest-get-devices"}')
            two = await raw_call(c, b'{"execute": "guest-get-devices"}')
            assert one == two == (
                b'{"error": {"class": "CommandNotFound", "desc": "Command guest-get-devices has been disabled"}}\n'
            )
            assert asked("guest-get-devices") == 1
