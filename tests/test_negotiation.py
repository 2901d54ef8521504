"""Capability negotiation: qga listeners (optional request-negotiation) and
qmp listeners (QMP proper), with real QMP clients and the real agent."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest
import trio

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy import negotiation, sim
from qgaproxy.config import ListenerConfig
from qgaproxy.upstream import State


def listeners(tmp_path):
    qga = str(tmp_path / "qga.sock")
    qmp = str(tmp_path / "qmp.sock")
    return qga, qmp, (ListenerConfig(qga), ListenerConfig(qmp, protocol="qmp"))


async def test_old_and_negotiating_clients_share_a_qga_listener(real_agent, tmp_path):
    qga, qmp, configs = listeners(tmp_path)
    async with run_proxy("unix:%s" % real_agent.path, [qga, qmp], listeners=configs) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(qga) as old, await Client.connect(qga) as new:
            # the old client never negotiates: today's behaviour
            assert await old.call("guest-ping", id=1) == {"return": {}, "id": 1}
            reply = await new.call("request-negotiation", id="n")
            assert reply["id"] == "n"
            greeting = reply["return"]["QMP"]
            assert greeting["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 22}
            assert "qemu-ga 7.2.22" in greeting["version"]["package"] and "qgaproxy" in greeting["version"]["package"]
            assert greeting["capabilities"] == ["agent-events"]
            # a wrong selection is an error naming it; the client may try again
            bad = await new.call("qmp_capabilities", {"enable": ["bogus"]}, id=2)
            assert bad["error"]["class"] == "GenericError" and "'bogus'" in bad["error"]["desc"]
            assert await new.call("qmp_capabilities", {"enable": ["agent-events"]}, id=3) == {"return": {}, "id": 3}
            again = await new.call("qmp_capabilities", id=4)
            assert again["error"] == {"class": "CommandNotFound", "desc": negotiation.ALREADY}
            status = (await new.call("query-agent"))["return"]
            assert status["state"] == "ready" and status["version"] == "7.2.22"
            assert any(c["name"] == "guest-ping" for c in status["commands"])
            # agent commands work the same for both
            assert await new.call("guest-ping", id=5) == {"return": {}, "id": 5}
            assert await old.call("guest-ping", id=6) == {"return": {}, "id": 6}
            # an old client asking for qmp_capabilities or query-agent reaches the agent, as before
            reply = await old.call("query-agent")
            assert reply["error"]["desc"] == "The command query-agent has not been found"


async def test_qmp_listener_greets_and_requires_qmp_capabilities(real_agent, tmp_path):
    qga, qmp, configs = listeners(tmp_path)
    async with run_proxy("unix:%s" % real_agent.path, [qga, qmp], listeners=configs) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(qmp) as c:
            greeting = await c.reply()
            assert greeting["QMP"]["version"]["qemu"]["major"] == 7
            early = await c.call("guest-ping", id=1)
            assert early == {
                "id": 1,
                "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
            }
            assert await c.call("qmp_capabilities", id=2) == {"return": {}, "id": 2}
            assert await c.call("guest-ping", id=3) == {"return": {}, "id": 3}
            again = await c.call("qmp_capabilities", id=4)
            assert again["error"]["class"] == "CommandNotFound"


def _qemu_qmp_session(path: str) -> list:
    from qemu.qmp import QMPClient

    async def main():
        client = QMPClient("qgaproxy-test")  # negotiation on: greeting, qmp_capabilities
        await client.connect(path)
        try:
            results = [await client.execute("guest-ping")]
            info = await client.execute("guest-info")
            results.append(info["version"])
            results.extend(await asyncio.gather(*(client.execute("guest-get-host-name") for _ in range(4))))
            return results
        finally:
            await client.disconnect()

    return asyncio.run(main())


async def test_qemu_qmp_client_with_negotiation_on_a_qmp_listener(real_agent, tmp_path):
    qga, qmp, configs = listeners(tmp_path)
    async with run_proxy("unix:%s" % real_agent.path, [qga, qmp], listeners=configs) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        with trio.fail_after(30):
            results = await trio.to_thread.run_sync(_qemu_qmp_session, qmp)
    assert results[0] == {} and results[1] == "7.2.22"
    assert all("host-name" in r for r in results[2:])


async def test_qmp_shell_without_n_on_a_qmp_listener(real_agent, tmp_path):
    shell = shutil.which("qmp-shell")
    if shell is None:
        pytest.skip("qmp-shell (PyPI qemu.qmp) is not installed")
    qga, qmp, configs = listeners(tmp_path)
    async with run_proxy("unix:%s" % real_agent.path, [qga, qmp], listeners=configs) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)

        def run():
            return subprocess.run(
                [shell, qmp], input="guest-ping\nguest-info\n", capture_output=True, text=True, timeout=30
            )

        result = await trio.to_thread.run_sync(run)
    assert "Welcome to the QMP low-level shell" in result.stdout, result
    assert '"return": {}' in result.stdout.replace("'", '"')  # the guest-ping reply
    assert "7.2.22" in result.stdout


async def test_agent_events_go_only_to_clients_that_selected_them(tmp_path, autojump_clock):
    agent = sim.SimAgent(sim.SimConfig(late={"guest-fstrim": 2.5}))
    qga, qmp, configs = listeners(tmp_path)
    async with run_proxy("sim", [qga, qmp], sim_agent=agent, listeners=configs, request_timeout=2) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(qga) as plain, await Client.connect(qga) as fan, await Client.connect(
            qmp
        ) as quiet:
            await fan.call("request-negotiation")
            assert await fan.call("qmp_capabilities", {"enable": ["agent-events"]}) == {"return": {}}
            await quiet.reply()  # greeting
            assert await quiet.call("qmp_capabilities") == {"return": {}}  # negotiated, no events
            # a timeout: the channel resyncs
            agent.config.hang = frozenset({"guest-get-osinfo"})
            reply = await plain.call("guest-get-osinfo", id=1)
            assert "timed out" in reply["error"]["desc"]
            # the agent goes away (stays hung): unavailable
            await proxy.wait_state(State.UNAVAILABLE)
            event = await fan.reply()
            assert event["event"] == "AGENT_UNAVAILABLE" and event["data"] == {"state": "unavailable"}
            assert set(event["timestamp"]) == {"seconds", "microseconds"}
            agent.config.hang = frozenset()
            agent.release()
            await proxy.wait_state(State.READY)
            event = await fan.reply()
            assert event["event"] == "AGENT_AVAILABLE" and event["data"]["version"] == "7.2.22"
            # a resync after a timeout, while available
            reply = await plain.call("guest-fstrim", id=2)
            assert "timed out" in reply["error"]["desc"]
            await proxy.wait_state(State.READY)
            event = await fan.reply()
            while event["event"] != "AGENT_RESYNCED":
                event = await fan.reply()
            assert event["data"]["reason"] == "timeout"
            # neither the old client nor the one that did not select got any
            assert await plain.call("guest-ping", id=3) == {"return": {}, "id": 3}
            assert await quiet.call("guest-ping", id=4) == {"return": {}, "id": 4}
            assert plain.buf == b"" and quiet.buf == b""
