"""Live status: the qgaproxy-status command, GET /status and `qgaproxy
status`, with figures that match what each test did.

The proxy runs in-process (trio) on the simulated agent, for what the real
agent cannot do on demand (a request that stays in flight, a freeze, a
timeout); clients are real unix-socket connections, one of them a separate
process (socat) so that its pid and executable are known to the test.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
import trio

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy import sim, status
from qgaproxy.config import ListenerConfig
from qgaproxy.policy import READ_ONLY
from qgaproxy.upstream import State
from test_observability import http

STEP = 10.0


def listeners(tmp_path) -> tuple[list[str], tuple]:
    admin = str(tmp_path / "admin.sock")
    monitoring = str(tmp_path / "mon.sock")
    configs = (
        ListenerConfig(admin, name="admin"),
        ListenerConfig(monitoring, name="monitoring", allow=READ_ONLY),
    )
    return [admin, monitoring], configs


def by_listener(st: dict) -> dict:
    return {listener["name"]: listener["clients"] for listener in st["listeners"]}


async def until(predicate, what: str, timeout: float = STEP):
    """Poll a condition (every 10 ms), bounded."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(0.01)
    raise AssertionError("not within %gs: %s" % (timeout, what))


async def cli(*args: str) -> subprocess.CompletedProcess:
    with trio.fail_after(STEP):
        return await trio.run_process(
            [sys.executable, "-m", "qgaproxy", "status", *args], capture_stdout=True, capture_stderr=True, check=False
        )


async def test_status_clients_in_flight_frozen_denied_http_and_cli(tmp_path):
    # guest-ping takes a minute in this guest: it stays in flight.
    agent = sim.SimAgent(sim.SimConfig(command_latency={"guest-ping": 60.0}))
    paths, configs = listeners(tmp_path)
    admin, monitoring = paths
    async with run_proxy(
        "sim", paths, sim_agent=agent, listeners=configs, request_timeout=120.0, metrics=("127.0.0.1", 0)
    ) as proxy:
        port = proxy.metrics_listeners[0].socket.getsockname()[1]
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        freezer = await Client.connect(admin)
        watcher1 = await Client.connect(monitoring)
        watcher2 = await Client.connect(monitoring)
        socat = None
        try:
            with trio.fail_after(STEP):
                # transparent: the agent's own command list, without ours
                info = await freezer.call("guest-info")
                assert "qgaproxy-status" not in {c["name"] for c in info["return"]["supported_commands"]}
                assert (await freezer.call("guest-fsfreeze-freeze"))["return"] == 2
            socat = subprocess.Popen(
                ["socat", "-", "UNIX-CONNECT:" + admin], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL
            )
            socat.stdin.write(b'{"execute":"guest-ping","id":7}\n')
            socat.stdin.flush()

            def socat_waiting():
                st = proxy.status()
                for c in by_listener(st)["admin"]:
                    if c["pid"] == socat.pid and c["in_flight"]:
                        return st
                return None

            await until(socat_waiting, "socat's guest-ping in flight")

            # Asked on the admin listener, by a client of its own.
            async with await Client.connect(admin) as asker:
                with trio.fail_after(STEP):
                    reply = await asker.call("qgaproxy-status", id="s")
                assert reply["id"] == "s"
                st = reply["return"]
                clients = by_listener(st)
                assert len(clients["admin"]) == 3  # the freezer, socat, the asker
                assert len(clients["monitoring"]) == 2
                for c in clients["monitoring"]:
                    assert c["pid"] == os.getpid() and c["uid"] == os.getuid() and c["gid"] == os.getgid()
                    assert c["in_flight"] == []
                (from_socat,) = [c for c in clients["admin"] if c["pid"] == socat.pid]
                assert from_socat["exe"] == "socat"
                assert from_socat["requests"] == 1
                (waiting,) = from_socat["in_flight"]
                assert waiting["command"] == "guest-ping" and waiting["state"] == "sent"
                assert waiting["waiting_seconds"] < 60  # seconds, and the agent holds it for 60
                assert st["in_flight"] == 1 and st["queued"] == 0
                freeze = st["freeze"]
                assert freeze["frozen"] is True
                assert freeze["by"]["pid"] == os.getpid()
                assert freeze["by"]["listener"] == "admin"
                freezer_number = freeze["by"]["client"]
                assert freezer_number in {c["client"] for c in clients["admin"]}
                assert freezer_number != from_socat["client"]
                assert st["state"] == "ready" and st["agent"] == "default"
                assert st["version"] == sim.VERSION
                assert st["timeouts"] == 0

            # A restricted listener refuses it like any command it does not allow.
            with trio.fail_after(STEP):
                denied = await watcher1.call("qgaproxy-status", id=1)
            assert denied == {
                "id": 1,
                "error": {
                    "class": "CommandNotFound",
                    "desc": "Command qgaproxy-status has been disabled: denied by qgaproxy policy of listener 'monitoring'",
                },
            }

            # The same over HTTP, keyed by agent name.
            with trio.fail_after(STEP):
                code, headers, body = await http(port, "/status")
            assert code == 200 and headers["Content-Type"] == "application/json"
            over_http = json.loads(body)["agents"]["default"]
            assert over_http["freeze"]["by"]["client"] == freezer_number
            assert len(by_listener(over_http)["monitoring"]) == 2
            with trio.fail_after(STEP):
                code, _, _ = await http(port, "/status?agent=nosuch")
            assert code == 404

            # The command line: text for people...
            done = await cli("--socket", admin)
            assert done.returncode == 0, done.stderr
            text = done.stdout.decode()
            assert "agent default: ready (qemu-ga %s) since " % sim.VERSION in text
            assert "listener admin: 3 clients" in text  # freezer, socat, the CLI itself
            assert "listener monitoring: 2 clients" in text
            assert "client %d: pid %d socat, uid %d" % (from_socat["client"], socat.pid, os.getuid()) in text
            assert "      guest-ping sent for " in text
            assert "  FROZEN since " in text and "by client %d (pid %d " % (freezer_number, os.getpid()) in text
            # ...JSON for scripts, from the socket or the metrics server
            done = await cli("--socket", admin, "--json")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["freeze"]["by"]["client"] == freezer_number
            done = await cli("--metrics", "127.0.0.1:%d" % port, "--json")
            assert done.returncode == 0, done.stderr
            doc = json.loads(done.stdout)
            assert set(doc["agents"]) == {"default"}
            assert len(by_listener(doc["agents"]["default"])["monitoring"]) == 2
            done = await cli("--metrics", "127.0.0.1:%d" % port)
            assert "listener monitoring: 2 clients" in done.stdout.decode()
            # and the refusal, as an error
            done = await cli("--socket", monitoring)
            assert done.returncode == 1
            assert b"CommandNotFound: Command qgaproxy-status has been disabled" in done.stderr

        finally:
            if socat is not None:
                socat.kill()
                socat.wait(STEP)
            for c in (freezer, watcher1, watcher2):
                await c.aclose()


async def test_timeouts_and_resyncs_counted(autojump_clock):
    agent = sim.SimAgent(sim.SimConfig(late={"guest-get-osinfo": 8.0}))
    async with run_proxy("sim", sim_agent=agent, request_timeout=5.0) as proxy:
        await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as c:
            before = (await c.call("qgaproxy-status"))["return"]
            assert (before["timeouts"], before["resyncs"], before["connects"]) == (0, 0, 1)
            reply = await c.call("guest-get-osinfo")
            assert reply["error"]["desc"] == "Guest agent command 'guest-get-osinfo' timed out after 5 seconds"
            await proxy.wait_state(State.READY)
            after = (await c.call("qgaproxy-status"))["return"]
            assert (after["timeouts"], after["resyncs"], after["stale_replies"]) == (1, 1, 1)
            assert after["state"] == "ready"
            (me,) = by_listener(after)["proxy"]
            assert me["in_flight"] == [] and me["requests"] == 3
            # The time of the last change (ready again after the resync) is
            # a wall-clock time, and how long ago it was.
            since = datetime.datetime.strptime(after["since"], "%Y-%m-%dT%H:%M:%S.%fZ")
            now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
            assert abs((now - since).total_seconds()) < 60  # UTC, just now
            assert after["state_seconds"] < 60
            assert after["since"] != before["since"]


async def test_status_answers_while_the_agent_is_away(tmp_path):
    async with run_proxy("unix:%s" % (tmp_path / "nothing.sock")) as proxy:
        async with await Client.connect(proxy.config.listen[0]) as c:
            with trio.fail_after(STEP):
                st = (await c.call("qgaproxy-status"))["return"]
                assert st["state"] == "connecting"
                assert st["version"] is None
                # and an agent command fails fast, as before
                assert "not available" in (await c.call("guest-ping"))["error"]["desc"]


async def test_status_on_a_qmp_listener(tmp_path):
    path = str(tmp_path / "qmp.sock")
    async with run_proxy("sim", [path], listeners=(ListenerConfig(path, name="qmp", protocol="qmp"),)) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        done = await cli("--socket", path, "--json")
        assert done.returncode == 0, done.stderr
        (me,) = by_listener(json.loads(done.stdout))["qmp"]
        assert me["requests"] == 3  # the status (refused: not negotiated), qmp_capabilities, the status


def test_render_of_a_built_status():
    text = status.render(
        {
            "vm1": {
                "agent": "vm1",
                "state": "unavailable",
                "since": "2026-01-01T00:00:00.000Z",
                "state_seconds": 3725.0,
                "version": None,
                "echoes_id": None,
                "connects": 2,
                "resyncs": 3,
                "timeouts": 4,
                "stale_replies": 5,
                "in_flight": 0,
                "queued": 1,
                "freeze": {"frozen": True, "by": None, "since": "2026-01-01T00:00:00.000Z", "seconds": 61.0},
                "listeners": [
                    {
                        "name": "admin",
                        "clients": [
                            {
                                "client": 9,
                                "pid": None,
                                "uid": None,
                                "gid": None,
                                "exe": None,
                                "requests": 1,
                                "in_flight": [{"command": "guest-ping", "state": "queued", "waiting_seconds": 0.25}],
                            }
                        ],
                    }
                ],
            }
        }
    )
    assert text == (
        "agent vm1: unavailable since 2026-01-01T00:00:00.000Z (1h02m05s)\n"
        "  connects 2, resyncs 3, timeouts 4, stale replies 5; in flight 0, queued 1\n"
        "  FROZEN since 2026-01-01T00:00:00.000Z (1m01s), by no client of this proxy\n"
        "  listener admin: 1 client\n"
        "    client 9: pid ? ?, uid ?, gid ?; 1 request\n"
        "      guest-ping queued for 0.2s\n"
    )


@pytest.mark.parametrize("wall", [0.0, 1763771401.1234])
def test_iso_times(wall):
    text = status.iso(wall)
    assert text.endswith("Z") and len(text) == len("2026-01-01T00:00:00.000Z")
    parsed = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc)
    assert abs(parsed.timestamp() - wall) < 0.001
