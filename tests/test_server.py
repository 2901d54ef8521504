"""Many agents in one process, reload, directory mode, more transports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import trio

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy import config as configmod
from qgaproxy import sim
from qgaproxy.server import Server, scan_directory
from qgaproxy.upstream import State


def agent_toml(name: str, upstream: str, path: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""
        [[agent]]
        name = "{name}"
        upstream = "{upstream}"
        {extra}
          [[agent.listener]]
          path = "{path}"
        """
    )


def load_text(tmp_path, text: str) -> configmod.Config:
    path = tmp_path / "qgaproxy.toml"
    path.write_text(text)
    return configmod.load(str(path))


async def ready(server: Server, *names: str) -> None:
    with trio.fail_after(10):
        for name in names:
            await server.agents[name].proxy.wait_state(State.READY)


async def test_many_agents_one_process_isolated(tmp_path, autojump_clock):
    a, b = sim.SimAgent(), sim.SimAgent(sim.SimConfig(hostname="b", hang={"guest-get-osinfo"}))
    cfg = load_text(
        tmp_path,
        agent_toml("a", "sim", tmp_path / "a.sock") + agent_toml("b", "sim", tmp_path / "b.sock", "request_timeout = 2"),
    )
    server = Server(cfg, sim_agents={"a": a, "b": b})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await ready(server, "a", "b")
        async with await Client.connect(str(tmp_path / "a.sock")) as ca, await Client.connect(
            str(tmp_path / "b.sock")
        ) as cb:
            assert (await ca.call("guest-get-host-name"))["return"] == {"host-name": "qgasim"}
            assert (await cb.call("guest-get-host-name"))["return"] == {"host-name": "b"}
            # b's agent hangs: b's client times out, a's keeps being served
            async with trio.open_nursery() as inner:
                inner.start_soon(cb.call, "guest-get-osinfo")
                for i in range(20):
                    assert await ca.call("guest-ping", id=i) == {"return": {}, "id": i}
                    await trio.sleep(0.5)
            assert server.agents["a"].proxy.upstream.state is State.READY
            assert server.agents["b"].proxy.upstream.state is State.UNAVAILABLE
        text = server.metrics.exposition().decode()
        assert 'qgaproxy_agent_up{agent="a"} 1.0' in text
        assert 'qgaproxy_agent_up{agent="b"} 0.0' in text
        nursery.cancel_scope.cancel()


async def test_reload_adds_removes_restarts_and_leaves_the_rest(tmp_path, autojump_clock):
    path = tmp_path / "qgaproxy.toml"
    keep = agent_toml("keep", "sim", tmp_path / "keep.sock")
    path.write_text(keep + agent_toml("gone", "sim", tmp_path / "gone.sock") + agent_toml("change", "sim", tmp_path / "c.sock"))
    server = Server(configmod.load(str(path)), load=lambda: configmod.load(str(path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        await ready(server, "keep", "gone", "change")
        kept_proxy = server.agents["keep"].proxy
        async with await Client.connect(str(tmp_path / "keep.sock")) as client:
            assert await client.call("guest-ping", id=1) == {"return": {}, "id": 1}
            # a bad file is rejected and nothing changes
            path.write_text(keep + "[[agent]]\nname = 'broken'\n")
            assert not await server.reload()
            assert set(server.agents) == {"keep", "gone", "change"}
            # a good one: one removed, one changed, one added, one untouched
            path.write_text(
                keep
                + agent_toml("change", "sim", tmp_path / "c.sock", "request_timeout = 9")
                + agent_toml("new", "sim", tmp_path / "new.sock")
            )
            assert await server.reload()
            assert set(server.agents) == {"keep", "change", "new"}
            assert not os.path.exists(tmp_path / "gone.sock")
            assert server.agents["change"].proxy.config.request_timeout == 9.0
            assert server.agents["keep"].proxy is kept_proxy
            # the untouched agent's client never noticed
            assert await client.call("guest-ping", id=2) == {"return": {}, "id": 2}
            await ready(server, "new", "change")
            async with await Client.connect(str(tmp_path / "new.sock")) as other:
                assert await other.call("guest-ping", id=3) == {"return": {}, "id": 3}
        text = server.metrics.exposition().decode()
        assert 'agent="gone"' not in text
        nursery.cancel_scope.cancel()


def test_sighup_reload_and_sigterm_as_a_process(tmp_path):
    path = tmp_path / "qgaproxy.toml"
    path.write_text(agent_toml("one", "sim", tmp_path / "one.sock"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgaproxy", "serve", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []

    def wait_for(text):
        for line in proc.stderr:
            lines.append(line)
            if text in line:
                return line
        raise AssertionError("process ended before %r:\n%s" % (text, "".join(lines)))

    try:
        wait_for("qgaproxy ready: 1 agent(s)")
        path.write_text(agent_toml("one", "sim", tmp_path / "one.sock") + agent_toml("two", "sim", tmp_path / "two.sock"))
        proc.send_signal(signal.SIGHUP)
        wait_for("configuration applied: 1 added, 0 removed, 0 restarted, 1 unchanged")
        assert os.path.exists(tmp_path / "two.sock")
        path.write_text("not toml [")
        proc.send_signal(signal.SIGHUP)
        wait_for("reload rejected")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not os.path.exists(tmp_path / "one.sock") and not os.path.exists(tmp_path / "two.sock")


def test_scan_directory_names_agents_after_their_domain(tmp_path):
    for domain in ("domain-1-web", "domain-2-db"):
        (tmp_path / domain).mkdir()
        (tmp_path / domain / "org.qemu.guest_agent.0").write_text("")
    (tmp_path / "domain-3-nochannel").mkdir()
    directory = configmod.DirectoryConfig(
        watch=str(tmp_path), pattern="domain-*/org.qemu.guest_agent.0", listen=str(tmp_path / "{name}.sock")
    )
    agents = scan_directory(directory)
    assert sorted(agents) == ["domain-1-web", "domain-2-db"]
    assert agents["domain-1-web"].listeners[0].path == str(tmp_path / "domain-1-web.sock")
    assert agents["domain-2-db"].upstream.path == str(tmp_path / "domain-2-db" / "org.qemu.guest_agent.0")


async def test_directory_mode_follows_sockets_as_they_come_and_go(tmp_path):
    # Real time (short intervals): the watch polls the file system.
    watch = tmp_path / "target"
    watch.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    cfg = load_text(
        tmp_path,
        f"""
        [directory]
        watch = "{watch}"
        pattern = "domain-*/org.qemu.guest_agent.0"
        listen = "{out}/{{name}}.sock"
        interval = 0.05
        """,
    )
    server = Server(cfg)
    agent = sim.SimAgent()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        # a VM appears: its channel is a socket served by a (simulated) agent
        (watch / "domain-7-app").mkdir()
        channel = str(watch / "domain-7-app" / "org.qemu.guest_agent.0")
        sim_scope = trio.CancelScope()

        async def serve_channel(task_status=trio.TASK_STATUS_IGNORED):
            with sim_scope:
                await sim.serve_unix(agent, channel, task_status=task_status)

        await nursery.start(serve_channel)
        with trio.fail_after(30):
            while "domain-7-app" not in server.agents:
                await server.changed.wait()
        await ready(server, "domain-7-app")
        async with await Client.connect(str(out / "domain-7-app.sock")) as client:
            assert await client.call("guest-ping", id=1) == {"return": {}, "id": 1}
        # the VM goes away: its socket disappears, so does the proxy's
        sim_scope.cancel()
        if os.path.exists(channel):  # QEMU removes its socket when it exits
            os.unlink(channel)
        with trio.fail_after(30):
            while "domain-7-app" in server.agents:
                await server.changed.wait()
        assert not os.path.exists(out / "domain-7-app.sock")
        nursery.cancel_scope.cancel()


async def test_tcp_upstream(autojump_clock):
    agent = sim.SimAgent()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, agent.serve, listeners)
        async with run_proxy("tcp:127.0.0.1:%d" % port) as proxy:
            await wait_ready(proxy)
            async with await Client.connect(proxy.config.listen[0]) as client:
                assert await client.call("guest-ping", id="t") == {"return": {}, "id": "t"}
        nursery.cancel_scope.cancel()


async def test_unix_listen_upstream_accepts_the_channel(tmp_path, autojump_clock):
    # What QEMU does with -chardev socket,path=P,server=off,reconnect=1:
    # connect to us, and again after it restarts.
    agent = sim.SimAgent()
    upstream = str(tmp_path / "upstream.sock")
    async with run_proxy("unix-listen:" + upstream) as proxy:
        assert proxy.upstream.state is State.CONNECTING
        async with await Client.connect(proxy.config.listen[0]) as client:
            reply = await client.call("guest-ping", id=1)
            assert reply["error"]["desc"] == "Guest agent is not available: no connection to its channel"
            for round in range(2):
                async with trio.open_nursery() as nursery:
                    qemu = await trio.open_unix_socket(upstream)
                    nursery.start_soon(agent.serve, qemu)
                    await wait_ready(proxy)
                    assert await client.call("guest-ping", id=round) == {"return": {}, "id": round}
                    await qemu.aclose()
                    nursery.cancel_scope.cancel()
                await proxy.wait_state(State.CONNECTING)
        assert oct(os.stat(upstream).st_mode & 0o777) == oct(0o660)
    assert not os.path.exists(upstream)


async def test_vsock_upstream_fails_cleanly_where_vsock_is_absent(autojump_clock):
    # This machine has no vsock peer to test against (no vhost-vsock, no
    # loopback transport): check only that a failing channel keeps the proxy
    # up and answering.
    async with run_proxy("vsock:1:5000", connect_timeout=0.5) as proxy:
        async with await Client.connect(proxy.config.listen[0]) as client:
            reply = await client.call("guest-ping", id=1)
            assert reply["error"]["desc"].startswith("Guest agent is not available")


def test_tells_systemd_ready_reloading_and_stopping(tmp_path):
    """Type=notify: READY=1 once listening, RELOADING=1 then READY=1 on
    SIGHUP, STOPPING=1 on SIGTERM, over a datagram socket the test owns."""
    notify_path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(20)
    path = tmp_path / "qgaproxy.toml"
    path.write_text(agent_toml("one", "sim", tmp_path / "one.sock"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgaproxy", "serve", "--config", str(path)],
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = receiver.recv(4096).decode()
        assert "READY=1" in ready.split("\n")
        assert os.path.exists(tmp_path / "one.sock")  # listening before READY=1
        proc.send_signal(signal.SIGHUP)
        reloading = receiver.recv(4096).decode().split("\n")
        assert "RELOADING=1" in reloading and any(l.startswith("MONOTONIC_USEC=") for l in reloading)
        assert "READY=1" in receiver.recv(4096).decode().split("\n")
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receiver.recv(4096).decode().split("\n")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        receiver.close()


async def test_unix_listen_refuses_a_peer_that_is_not_qemu(tmp_path):
    # Only the allowed uid may become the channel; anyone else is refused
    # and QEMU's later connection is taken.
    import shutil
    import tempfile

    where = tempfile.mkdtemp(prefix="qgaproxy-peer-")  # reachable by nobody
    os.chmod(where, 0o755)
    upstream = os.path.join(where, "upstream.sock")
    async with run_proxy("unix-listen:" + upstream, upstream_peer_uids=(0,)) as proxy:
        os.chmod(upstream, 0o666)  # let the stranger reach it: the check is SO_PEERCRED
        stranger = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
             "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
             "print(repr(s.recv(100)), flush=True)", upstream],
            stdout=subprocess.PIPE, text=True,
        )
        out = await trio.to_thread.run_sync(lambda: stranger.communicate(timeout=20)[0])
        assert out.strip() == "b''"  # closed, never sent the proxy's sync
        agent = sim.SimAgent()
        async with trio.open_nursery() as nursery:
            qemu = await trio.open_unix_socket(upstream)
            nursery.start_soon(agent.serve, qemu)
            with trio.fail_after(10):
                await wait_ready(proxy)
            nursery.cancel_scope.cancel()
    shutil.rmtree(where, ignore_errors=True)
