"""Metrics, health endpoints, the guest exporter and the logs, observed from
outside: real HTTP scrapes of /metrics, /healthz and /readyz during real
traffic against the real qemu-ga (and the simulated agent where a fault or
a guest command the real one cannot serve as nobody is needed), and the log
lines the proxy writes.

The last tests pin fixes of bugs this file found (polls counted as client
requests, guest metrics lost after a resync while frozen, exporter lines
without the agent's name, untraced local replies, disconnect lines without
the peer).
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import trio

from proxyutil import Client, run_proxy, wait_ready
from qgaproxy import exporter
from qgaproxy.sim import SimAgent, SimConfig
from qgaproxy.upstream import State

POLLED = tuple(c for c in exporter.COMMANDS if c != "guest-get-load")  # 7.2 has no guest-get-load


# ---------------------------------------------------------------------------
# HTTP and exposition helpers


async def http(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % (method.encode(), path.encode()))
        data = b""
        while True:
            chunk = await stream.receive_some(1 << 16)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


def parse(text: str) -> dict:
    """(sample name, frozenset of labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def scrape(port: int) -> dict:
    status, headers, body = await http(port, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return parse(body.decode())


def samples(metrics: dict, name: str, **labels) -> dict:
    """{frozenset(labels): value} of one sample name, filtered by labels."""
    want = set(labels.items())
    return {ls: v for (n, ls), v in metrics.items() if n == name and want <= ls}


def value(metrics: dict, name: str, **labels) -> float | None:
    found = samples(metrics, name, **labels)
    return sum(found.values()) if found else None


def by_label(metrics: dict, name: str, key: str, **labels) -> dict:
    return {dict(ls)[key]: v for ls, v in samples(metrics, name, **labels).items()}


async def until(predicate, timeout: float, what: str):
    """Re-check an (async) condition until it holds, bounded."""
    try:
        with trio.fail_after(timeout):
            while True:
                result = await predicate()
                if result:
                    return result
                await trio.sleep(0.02)  # re-check interval of an HTTP/state condition
    except trio.TooSlowError:
        raise AssertionError("%s: not reached within %gs" % (what, timeout)) from None


def metrics_port(proxy) -> int:
    return proxy.metrics_listeners[0].socket.getsockname()[1]


def count_updates(proxy) -> collections.Counter:
    """Counts the exporter's completed polls per command."""
    state = proxy.metrics.guest_state
    counts: collections.Counter = collections.Counter()
    original = state.update

    def update(command, value):
        counts[command] += 1
        return original(command, value)

    state.update = update
    return counts


class Counted(Client):
    """A client that counts the bytes it sends and receives."""

    sent = 0
    received = 0

    async def send(self, data):
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.sent += len(data)
        await super().send(data)

    async def read_line(self):
        line = await super().read_line()
        self.received += len(line)
        return line


# ---------------------------------------------------------------------------
# /metrics during real traffic against the real qemu-ga


async def test_metrics_follow_real_traffic(real_agent):
    async with run_proxy("unix:%s" % real_agent.path, metrics=("127.0.0.1", 0)) as proxy:
        with trio.fail_after(15):
            await wait_ready(proxy)
        port = metrics_port(proxy)
        listen = proxy.config.listen[0]
        before = await scrape(port)
        assert value(before, "qgaproxy_agent_up", agent="default") == 1
        assert by_label(before, "qgaproxy_agent_state", "state", agent="default") == {
            "connecting": 0, "syncing": 0, "ready": 1, "resyncing": 0, "unavailable": 0}
        assert value(before, "qgaproxy_upstream_connects_total", agent="default") == 1
        assert value(before, "qgaproxy_clients_connected", listener="proxy") in (None, 0)
        assert samples(before, "qgaproxy_requests_total") == {}

        async def clients_now(n):
            return value(await scrape(port), "qgaproxy_clients_connected", agent="default", listener="proxy") == n

        c1 = Counted(await trio.open_unix_socket(listen))
        await until(lambda: clients_now(1), 5, "one client")
        c2 = Counted(await trio.open_unix_socket(listen))
        await until(lambda: clients_now(2), 5, "two clients")

        # c1 pipelines everything at once; ids that must never become labels.
        batch = [{"execute": "guest-ping", "id": "secret-client-id-%d" % k} for k in range(5)]
        batch += [{"execute": "guest-get-host-name", "id": 17}] * 2
        batch += [{"execute": "guest-info", "id": "info"}]
        batch += [{"execute": "guest-no-such-command", "id": "x"}] * 2
        raw = b"".join(json.dumps(m).encode() for m in batch) + b'{"execute": 42}[1, 2]'
        await c1.send(raw)
        replies = [await c1.reply() for _ in range(len(batch) + 2)]
        assert [r.get("id") for r in replies[:10]] == [m["id"] for m in batch]
        assert all("return" in r for r in replies[:8]), replies
        assert replies[8]["error"]["class"] == replies[9]["error"]["class"] == "CommandNotFound"
        assert replies[10]["error"]["desc"] == "QMP input member 'execute' must be a string"
        assert replies[11]["error"]["desc"] == "QMP input must be a JSON object"
        agent_commands = {c["name"] for c in replies[7]["return"]["supported_commands"]}

        # c2: a local answer (guest-sync), the agent's own errors, a disabled command twice.
        assert (await c2.call("guest-get-time"))["return"] > 0
        assert (await c2.call("guest-sync", {"id": 7}))["return"] == 7
        assert "error" in await c2.call("guest-file-open", {"path": "/nonexistent/qgaproxy-test"})
        for _ in range(2):
            reply = await c2.call("guest-exec", {"path": "/bin/true"})
            assert reply["error"]["class"] == "CommandNotFound" and "disabled" in reply["error"]["desc"]

        async def idle():
            m = await scrape(port)
            return value(m, "qgaproxy_requests_in_flight", agent="default") == 0 and m

        after = await until(idle, 5, "nothing in flight")
        assert value(after, "qgaproxy_requests_queued", agent="default") == 0

        got = {(dict(ls)["command"], dict(ls)["outcome"]): v for ls, v in samples(after, "qgaproxy_requests_total").items()}
        assert got == {
            ("guest-ping", "ok"): 5,
            ("guest-get-host-name", "ok"): 2,
            ("guest-info", "ok"): 1,
            ("other", "error"): 2,
            ("invalid", "invalid"): 2,
            ("guest-get-time", "ok"): 1,
            ("guest-sync", "ok"): 1,
            ("guest-file-open", "error"): 1,
            ("guest-exec", "error"): 2,
        }
        # Durations and queue waits of what went to the agent (the local
        # answers took no round trip).
        went = {"guest-ping": 5, "guest-get-host-name": 2, "guest-info": 1, "guest-get-time": 1,
                "guest-file-open": 1, "guest-exec": 1}
        for family in ("qgaproxy_request_duration_seconds", "qgaproxy_request_queue_wait_seconds"):
            counts = by_label(after, family + "_count", "command")
            assert counts == went, (family, counts)
            for command in went:
                buckets = sorted(
                    ((float(dict(ls)["le"]), v) for ls, v in samples(after, family + "_bucket", command=command).items())
                )
                assert buckets[-1] == (float("inf"), went[command])
                assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
                assert 0 < value(after, family + "_sum", command=command) < 5
        assert value(after, "qgaproxy_request_duration_seconds_bucket", command="guest-ping", le="5.0") == 5

        # Bytes: the client side exactly what the clients sent and read.
        await c1.aclose()
        await until(lambda: clients_now(1), 5, "back to one client")
        await c2.aclose()
        await until(lambda: clients_now(0), 5, "no client")
        final = await scrape(port)
        bytes_ = {(dict(ls)["side"], dict(ls)["direction"]): v for ls, v in samples(final, "qgaproxy_bytes_total").items()}
        assert bytes_[("client", "in")] == c1.sent + c2.sent
        assert bytes_[("client", "out")] == c1.received + c2.received
        for direction in ("in", "out"):
            assert bytes_[("agent", direction)] > value(before, "qgaproxy_bytes_total", side="agent", direction=direction)
        assert samples(final, "qgaproxy_agent_info") == {
            frozenset({"agent": "default", "version": "7.2.22", "echoes_id": "true"}.items()): 1.0
        }
        assert value(final, "qgaproxy_requests_in_flight") == 0
        assert value(final, "qgaproxy_request_timeouts_total") == 0
        assert value(final, "qgaproxy_stale_replies_dropped_total") == 0

        # Labels: small fixed sets; never a path, a pid or a client's id.
        label_names = set()
        forbidden = [str(real_agent.path), listen, os.path.dirname(listen), "secret-client-id", "qga-real-"]
        for name, labels in final:
            for key, val in labels:
                label_names.add(key)
                if key == "command":
                    assert val in agent_commands | {"other", "invalid"}, (name, val)
                assert val not in (str(os.getpid()), "17", "info", "x"), (name, key, val)
                assert not any(f in val for f in forbidden), (name, key, val)
                assert "/" not in val, (name, key, val)
        assert label_names <= {"agent", "state", "command", "outcome", "listener", "reason", "side", "direction",
                               "le", "version", "echoes_id"}, label_names
        assert by_label(final, "qgaproxy_clients_connected", "listener") == {"proxy": 0}


async def test_state_gauges_and_health_without_an_agent(tmp_path):
    """An upstream that does not exist: not ready, 503 with the state, and
    requests fail fast (counted as unavailable)."""
    async with run_proxy("unix:%s" % (tmp_path / "no-such-agent.sock"), metrics=("127.0.0.1", 0)) as proxy:
        port = metrics_port(proxy)

        async def connecting():
            return proxy.upstream.state is State.CONNECTING and proxy.upstream.reconnect_at > 0

        await until(connecting, 5, "a failed connect")
        m = await scrape(port)
        assert value(m, "qgaproxy_agent_up", agent="default") == 0
        assert by_label(m, "qgaproxy_agent_state", "state") == {
            "connecting": 1, "syncing": 0, "ready": 0, "resyncing": 0, "unavailable": 0}
        assert samples(m, "qgaproxy_agent_info") == {}
        status, headers, body = await http(port, "/healthz")
        assert (status, json.loads(body)) == (503, {"status": "unavailable", "agents": {"default": "connecting"}})
        assert headers["Content-Type"] == "application/json"
        status, _, body = await http(port, "/healthz?agent=default")
        assert (status, json.loads(body)) == (503, {"status": "unavailable", "agents": {"default": "connecting"}})
        status, _, body = await http(port, "/healthz?agent=vm9")
        assert (status, json.loads(body)) == (404, {"status": "unknown agent", "agent": "vm9"})
        # The process itself is serving: ready for traffic, even without an agent.
        status, _, body = await http(port, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        async with await Client.connect(proxy.config.listen[0]) as client:
            reply = await client.call("guest-ping")
            assert reply["error"]["desc"].startswith("Guest agent is not available: ")
        m = await scrape(port)
        # No agent was ever seen, so no command is known: "other".
        assert by_label(m, "qgaproxy_requests_total", "outcome", command="other") == {"unavailable": 1}


async def test_health_endpoints_ready(real_agent):
    async with run_proxy("unix:%s" % real_agent.path, metrics=("127.0.0.1", 0)) as proxy:
        with trio.fail_after(15):
            await wait_ready(proxy)
        port = metrics_port(proxy)
        status, headers, body = await http(port, "/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok", "agents": {"default": "ready"}})
        assert headers["Content-Type"] == "application/json"
        status, _, body = await http(port, "/healthz?agent=default")
        assert (status, json.loads(body)) == (200, {"status": "ok", "agents": {"default": "ready"}})
        status, _, body = await http(port, "/healthz?agent=nope")
        assert (status, json.loads(body)) == (404, {"status": "unknown agent", "agent": "nope"})
        status, _, body = await http(port, "/readyz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, headers, body = await http(port, "/healthz", "HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
        assert (await http(port, "/healthz", "POST"))[0] == 405
        assert (await http(port, "/nope"))[0] == 404


async def test_health_of_several_agents(tmp_path):
    """One process, two agents (config file): one ready, one without its
    agent. /healthz tells them apart; ?agent= picks one."""
    from qgaproxy import config as configmod
    from qgaproxy.server import Server

    path = tmp_path / "qgaproxy.toml"
    path.write_text(
        f"""
[metrics]
listen = "127.0.0.1:0"

[[agent]]
name = "vm1"
upstream = "sim"
  [[agent.listener]]
  path = "{tmp_path / 'vm1.sock'}"

[[agent]]
name = "vm2"
upstream = "unix:{tmp_path / 'missing.sock'}"
  [[agent.listener]]
  path = "{tmp_path / 'vm2.sock'}"
"""
    )
    server = Server(configmod.load(str(path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        port = server.metrics_listeners[0].socket.getsockname()[1]

        async def vm1_ready():
            status, _, body = await http(port, "/healthz?agent=vm1")
            return status == 200 and json.loads(body)

        assert await until(vm1_ready, 10, "vm1 ready") == {"status": "ok", "agents": {"vm1": "ready"}}
        status, _, body = await http(port, "/healthz")
        assert (status, json.loads(body)) == (
            503, {"status": "unavailable", "agents": {"vm1": "ready", "vm2": "connecting"}})
        status, _, body = await http(port, "/healthz?agent=vm2")
        assert (status, json.loads(body)) == (503, {"status": "unavailable", "agents": {"vm2": "connecting"}})
        assert (await http(port, "/healthz?agent=vm3"))[0] == 404
        assert (await http(port, "/readyz"))[0] == 200
        m = await scrape(port)
        assert by_label(m, "qgaproxy_agent_up", "agent") == {"vm1": 1, "vm2": 0}
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# The guest exporter


async def test_guest_metrics_from_the_real_agent(real_agent, caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    async with run_proxy("unix:%s" % real_agent.path, metrics=("127.0.0.1", 0), guest_metrics_interval=0.2) as proxy:
        polls = count_updates(proxy)
        with trio.fail_after(15):
            await wait_ready(proxy)
        port = metrics_port(proxy)

        async def three_rounds():
            return all(polls[c] >= 3 for c in POLLED)

        await until(three_rounds, 15, "three rounds of guest polls")
        m = await scrape(port)
        # Polls are the proxy's own: no client request is counted.
        assert samples(m, "qgaproxy_requests_total") == {}
        assert value(m, "qgaproxy_request_timeouts_total") == 0

        async with await Client.connect(proxy.config.listen[0]) as client:
            direct = {c: await client.call(c) for c in POLLED if c != "guest-get-time"}
            host_before = time.time_ns()
            guest_now = (await client.call("guest-get-time"))["return"]
            host_after = time.time_ns()
        assert abs(guest_now - (host_before + host_after) / 2) < 1e9  # the same machine's clock
        ages = by_label(m, "qgaproxy_guest_poll_age_seconds", "command")
        errors = by_label(m, "qgaproxy_guest_poll_errors_total", "command")
        served = {c for c, r in direct.items() if "return" in r} | {"guest-get-time"}
        assert set(ages) == served, (ages, direct)
        assert all(0 <= age < 3 for age in ages.values()), ages
        assert set(errors) == set(POLLED) - served, errors

        fs = direct["guest-get-fsinfo"]
        if "return" in fs:
            sizes = samples(m, "qgaproxy_guest_filesystem_size_bytes")
            used = samples(m, "qgaproxy_guest_filesystem_used_bytes")
            expected = {(f["mountpoint"], f["type"]): f for f in fs["return"] if "total-bytes" in f}
            assert expected, fs
            assert {(dict(ls)["mountpoint"], dict(ls)["type"]) for ls in sizes} == set(expected)
            for ls, v in sizes.items():
                f = expected[(dict(ls)["mountpoint"], dict(ls)["type"])]
                assert v == f["total-bytes"]
                assert abs(used[ls] - f["used-bytes"]) <= 0.01 * f["total-bytes"]  # the disk is live
        # else: the sim test covers filesystems (not allowed as nobody here)

        nics = {n["name"]: n for n in direct["guest-network-get-interfaces"]["return"]}
        rx = by_label(m, "qgaproxy_guest_network_receive_bytes_total", "interface")
        tx = by_label(m, "qgaproxy_guest_network_transmit_bytes_total", "interface")
        assert set(rx) == set(tx) == {name for name, n in nics.items() if "statistics" in n}
        for name in rx:  # counters: the direct call came after the poll
            assert rx[name] <= nics[name]["statistics"]["rx-bytes"]
            assert tx[name] <= nics[name]["statistics"]["tx-bytes"]
        addresses = {(dict(ls)["interface"], dict(ls)["address"]) for ls in samples(m, "qgaproxy_guest_network_address_info")}
        assert addresses == {(n["name"], ip["ip-address"]) for n in nics.values() for ip in n.get("ip-addresses", ())}

        cpus = direct["guest-get-vcpus"]["return"]
        online = sum(1 for c in cpus if c["online"])
        assert by_label(m, "qgaproxy_guest_vcpus", "state") == {"online": online, "offline": len(cpus) - online}
        assert value(m, "qgaproxy_guest_users") == len(direct["guest-get-users"]["return"])
        osinfo = direct["guest-get-osinfo"]["return"]
        (os_labels,) = samples(m, "qgaproxy_guest_os_info")
        assert dict(os_labels) == {
            "agent": "default", "id": osinfo["id"], "name": osinfo["name"], "version": osinfo["version"],
            "kernel_release": osinfo["kernel-release"], "machine": osinfo["machine"]}
        assert abs(value(m, "qgaproxy_guest_time_offset_seconds")) < 0.5
        disks = {dict(ls)["name"] for ls in samples(m, "qgaproxy_guest_disk_info")}
        assert disks == {d["name"] for d in direct["guest-get-disks"]["return"]}
        assert samples(m, "qgaproxy_guest_load") == {}
    skipped = [r.getMessage() for r in caplog.records if r.name == "qgaproxy.exporter"]
    assert skipped == ["guest exporter: skipping guest-get-load (the agent does not have it)"], skipped


async def test_guest_metrics_from_the_sim(caplog):
    """Everything the exporter renders, against the simulated agent (which
    serves every 7.2 command); a command the agent disabled is asked once
    (its CommandNotFound is one poll error), then skipped, logged once."""
    caplog.set_level(logging.INFO, logger="qgaproxy")
    sim = SimAgent(SimConfig(vcpus=3, blocked={"guest-get-users"}, mountpoints=("/", "/boot", "/srv")))
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), guest_metrics_interval=0.05) as proxy:
        polls = count_updates(proxy)
        with trio.fail_after(10):
            await wait_ready(proxy)

        async def rounds():
            return all(polls[c] >= 3 for c in POLLED if c != "guest-get-users")

        await until(rounds, 10, "three rounds of polls")
        m = await scrape(metrics_port(proxy))
    assert sum(1 for r in sim.received if isinstance(r.value, dict) and r.value.get("execute") == "guest-get-users") == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "qgaproxy.exporter"]
    assert sorted(messages) == [
        "guest exporter: skipping guest-get-load (the agent does not have it)",
        "guest exporter: skipping guest-get-users (disabled in the agent)",
    ]
    gib = 1 << 30
    for mp in ("/", "/boot", "/srv"):
        assert value(m, "qgaproxy_guest_filesystem_size_bytes", mountpoint=mp, type="ext4") == 8 * gib
        assert value(m, "qgaproxy_guest_filesystem_used_bytes", mountpoint=mp, type="ext4") == 1 * gib
    assert len(samples(m, "qgaproxy_guest_filesystem_size_bytes")) == 3
    for family in ("receive_bytes", "transmit_bytes", "receive_packets", "transmit_packets",
                   "receive_errors", "transmit_errors", "receive_drops", "transmit_drops"):
        assert set(by_label(m, "qgaproxy_guest_network_%s_total" % family, "interface")) == {"lo", "eth0"}
    assert ("eth0", "10.0.2.15", "24", "ipv4") in {
        (d["interface"], d["address"], d["prefix"], d["family"])
        for d in map(dict, samples(m, "qgaproxy_guest_network_address_info"))}
    assert by_label(m, "qgaproxy_guest_vcpus", "state") == {"online": 3, "offline": 0}
    assert samples(m, "qgaproxy_guest_users") == {}  # disabled: skipped, not zero
    (os_labels,) = samples(m, "qgaproxy_guest_os_info")
    assert dict(os_labels)["id"] == "debian" and dict(os_labels)["machine"] == "x86_64"
    assert abs(value(m, "qgaproxy_guest_time_offset_seconds")) < 0.5
    assert [dict(ls) for ls in samples(m, "qgaproxy_guest_disk_info")] == [
        {"agent": "default", "name": "/dev/vda", "partition": "false", "alias": ""}]
    ages = by_label(m, "qgaproxy_guest_poll_age_seconds", "command")
    assert set(ages) == set(POLLED) - {"guest-get-users"}
    assert all(0 <= a < 2 for a in ages.values())
    assert by_label(m, "qgaproxy_guest_poll_errors_total", "command") == {"guest-get-users": 1}


async def test_fifty_scrapes_cause_at_most_one_poll():
    sim = SimAgent()
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), guest_metrics_interval=10) as proxy:
        polls = count_updates(proxy)
        with trio.fail_after(10):
            await wait_ready(proxy)

        async def first_round():
            return all(polls[c] >= 1 for c in POLLED)

        await until(first_round, 10, "the first round of polls")
        port = metrics_port(proxy)

        def polled() -> collections.Counter:
            return collections.Counter(
                r.value["execute"] for r in sim.received
                if isinstance(r.value, dict) and r.value.get("execute") in exporter.COMMANDS)

        before = polled()
        bodies = []
        started = trio.current_time()

        async def one():
            bodies.append(await scrape(port))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one)
        elapsed = trio.current_time() - started
        after = polled()
    assert elapsed < 1.0, elapsed
    assert len(bodies) == 50
    assert all(value(b, "qgaproxy_guest_filesystem_size_bytes", mountpoint="/") == 8 << 30 for b in bodies)
    new = after - before
    assert all(n <= 1 for n in new.values()), new  # at most one poll of each command
    assert before == collections.Counter({c: 1 for c in POLLED})


async def test_polls_never_go_ahead_of_client_requests():
    """An eager exporter (polls every 20 ms) and a slow agent: a client's
    pipelined burst is never split by a poll; polls fit between bursts."""
    sim = SimAgent(SimConfig(latency=0.01))
    burst = 6
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), guest_metrics_interval=0.02) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            for b in range(12):
                await client.send(b"".join(b'{"execute": "guest-ping", "id": "b%d-%d"}' % (b, k) for k in range(burst)))
                for k in range(burst):
                    assert (await client.reply())["id"] == "b%d-%d" % (b, k)
                await trio.sleep(0.015 * (b % 4))  # gaps of varying length between bursts
        m = await scrape(metrics_port(proxy))
    order = [r.value.get("execute") for r in sim.received if isinstance(r.value, dict)]
    order = [c for c in order if c in ("guest-ping",) + exporter.COMMANDS]
    runs, current = [], 0
    for command in order:
        if command == "guest-ping":
            current += 1
        elif current:
            runs.append(current)
            current = 0
    runs.append(current)
    assert sum(runs) == 12 * burst
    assert all(r % burst == 0 for r in runs if r), runs  # a poll only ever between whole bursts
    assert len([r for r in runs if r]) >= 3, "polls should have fitted between bursts: %s" % runs
    assert sum(1 for c in order if c != "guest-ping") >= 7
    # queue_wait: the bursts never waited for a poll to finish before being sent
    assert value(m, "qgaproxy_request_queue_wait_seconds_count", command="guest-ping") == 12 * burst


async def test_in_flight_and_queued_gauges():
    sim = SimAgent(SimConfig(hang={"guest-get-host-name"}))
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), window=2) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        port = metrics_port(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            await client.send(b'{"execute": "guest-get-host-name"}' + b'{"execute": "guest-ping"}' * 3)

            async def stuck():
                m = await scrape(port)
                return value(m, "qgaproxy_requests_in_flight") == 2 and value(m, "qgaproxy_requests_queued") == 2

            await until(stuck, 5, "2 in flight (window 2), 2 queued")
            sim.release()
            for _ in range(4):
                assert "return" in await client.reply()

            async def drained():
                m = await scrape(port)
                return value(m, "qgaproxy_requests_in_flight") == 0 and value(m, "qgaproxy_requests_queued") == 0

            await until(drained, 5, "in flight and queued back to 0")


# ---------------------------------------------------------------------------
# Logs


def _messages(caplog, logger="qgaproxy"):
    return [r.getMessage() for r in caplog.records if r.name == logger]


async def test_log_lines_for_clients_states_timeouts_and_resyncs(caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    sim = SimAgent(SimConfig(drop={"guest-get-host-name"}))
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), request_timeout=0.3) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as first:
            assert "return" in await first.call("guest-ping")
            reply = await first.call("guest-get-host-name")
            assert reply["error"]["desc"] == "Guest agent command 'guest-get-host-name' timed out after 0.3 seconds"
            with trio.fail_after(5):
                await wait_ready(proxy)  # resynced
            async with await Client.connect(proxy.config.listen[0]) as second:
                assert "return" in await second.call("guest-ping")
        m = await scrape(metrics_port(proxy))

        async def both_gone():
            return sum(1 for t in _messages(caplog) if " disconnected " in t) == 2

        await until(both_gone, 5, "two disconnect lines")
        lines = _messages(caplog)
    pid, uid = os.getpid(), os.getuid()
    assert lines.count("client 1 connected on proxy (pid %d, uid %d)" % (pid, uid)) == 1
    assert lines.count("client 2 connected on proxy (pid %d, uid %d)" % (pid, uid)) == 1
    assert lines.count("client 2 disconnected (pid %d, uid %d; 1 requests)" % (pid, uid)) == 1
    assert lines.count("client 1 disconnected (pid %d, uid %d; 2 requests)" % (pid, uid)) == 1
    assert sum(" connected on " in t for t in lines) == 2
    timeouts = [t for t in lines if "timed out" in t]
    assert timeouts == ["command guest-get-host-name from client 1 timed out after 0.3s"]
    assert [t for t in lines if t.startswith("resyncing")] == ["resyncing the agent channel (timeout)"]
    assert value(m, "qgaproxy_request_timeouts_total") == len(timeouts)
    assert value(m, "qgaproxy_resyncs_total", reason="timeout") == 1
    states = [t for t in lines if t.startswith("agent ")]
    assert states[:4] == [
        "agent connecting -> syncing after connect",
        "agent syncing -> ready (agent 7.2.22, 42 commands, echoes ids)",
        "agent ready -> resyncing after timeout",
        "agent resyncing -> ready (agent 7.2.22, 42 commands, echoes ids)",
    ], states


def _serve(tmp_path, *extra, config_text=None):
    """Start `python -m qgaproxy serve` (sim upstream, agent vm1); returns
    (process, stderr path, listen path)."""
    listen = tmp_path / "vm1.sock"
    config = tmp_path / "qgaproxy.toml"
    config.write_text(config_text or f"""
[[agent]]
name = "vm1"
upstream = "sim"
guest_metrics_interval = 0.2
  [[agent.listener]]
  name = "admin"
  path = "{listen}"
""")
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "qgaproxy", "serve", "--config", str(config), *extra],
                                stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL)
    return proc, err, listen


async def _wait_for_text(path, pattern: str, proc, timeout=15.0):
    async def found():
        if proc.poll() is not None:
            raise AssertionError("qgaproxy exited: %s" % path.read_text())
        return pattern in path.read_text()

    await until(found, timeout, "log line %r" % pattern)


def _secrets() -> dict:
    tag = uuid.uuid4().hex[:12]
    raw = {name: ("%s-%s-S3CR3T" % (name, tag)) for name in ("password", "filedata", "stdin", "env")}
    return raw


def _secret_requests(secrets: dict) -> list[tuple[str, dict]]:
    b64 = {k: base64.b64encode(v.encode()).decode() for k, v in secrets.items()}
    return [
        ("guest-set-user-password", {"username": "root", "password": b64["password"], "crypted": False}),
        ("guest-exec", {"path": "/bin/cat", "input-data": b64["stdin"], "env": ["TOKEN=" + secrets["env"]],
                        "capture-output": True}),
    ], b64


def _assert_no_secret(text: str, secrets: dict) -> None:
    for name, raw in secrets.items():
        forms = {raw, base64.b64encode(raw.encode()).decode()}
        for form in forms:
            assert form not in text, "the %s secret (%s) is in the log" % (name, form)
    assert "S3CR3T" not in text


async def _exercise_secrets(client: Client, secrets: dict) -> None:
    """Every secret-carrying request, with replies that carry them back."""
    requests, b64 = _secret_requests(secrets)
    assert (await client.call(*requests[0]))["return"] == {}
    pid = (await client.call(*requests[1]))["return"]["pid"]
    status = (await client.call("guest-exec-status", {"pid": pid}))["return"]
    assert status["exited"] and status["out-data"] == b64["stdin"]
    handle = (await client.call("guest-file-open", {"path": "/tmp/secret.txt", "mode": "w+"}))["return"]
    written = await client.call("guest-file-write", {"handle": handle, "buf-b64": b64["filedata"]})
    assert written["return"]["count"] == len(secrets["filedata"])
    await client.call("guest-file-seek", {"handle": handle, "offset": 0, "whence": "set"})
    read = await client.call("guest-file-read", {"handle": handle})
    assert read["return"]["buf-b64"] == b64["filedata"]
    await client.call("guest-file-close", {"handle": handle})


async def test_secrets_never_in_the_log_in_process(caplog):
    """Debug level (the most verbose): every message is traced, no secret is."""
    caplog.set_level(logging.DEBUG)
    secrets = _secrets()
    async with run_proxy("sim", metrics=("127.0.0.1", 0)) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            await _exercise_secrets(client, secrets)
    text = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "client 1 -> guest-set-user-password" in text  # it was traced ...
    assert 'arguments={"username": "root", "password": "<redacted ' in text
    assert '"input-data": "<redacted ' in text and '"env": "<redacted 1 items>"' in text
    assert '"buf-b64": "<redacted ' in text  # file-write's argument and file-read's result
    assert '"out-data": "<redacted ' in text
    _assert_no_secret(text, secrets)  # ... without the secrets


async def test_json_logs_debug_traces_and_secrets_of_the_process(tmp_path):
    """`qgaproxy serve --log-format json --log-level debug`: one JSON object
    per line, the agent's lines carry its name, every client message is
    traced with its direction and connection id, no secret is written."""
    secrets = _secrets()
    proc, err, listen = _serve(tmp_path, "--log-format", "json", "--log-level", "debug")
    try:
        await _wait_for_text(err, "qgaproxy ready: 1 agent(s)", proc)
        await _wait_for_text(err, "syncing -> ready", proc)
        async with await Client.connect(str(listen)) as client:
            assert (await client.call("guest-ping", id="p1"))["id"] == "p1"
            await _exercise_secrets(client, secrets)
        async with await Client.connect(str(listen)) as other:
            assert "return" in await other.call("guest-get-host-name", id=5)
        await _wait_for_text(err, "client 2 disconnected", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
    text = err.read_text()
    _assert_no_secret(text, secrets)
    entries = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert entries and all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    agent_lines = [e for e in entries if e["message"].startswith("[vm1] ")]
    assert agent_lines and all(e.get("agent") == "vm1" for e in agent_lines)
    mine = {e["message"][len("[vm1] "):] for e in agent_lines}
    assert "client 1 connected on admin (pid %d, uid %d)" % (os.getpid(), os.getuid()) in mine
    assert "client 2 disconnected (pid %d, uid %d; 1 requests)" % (os.getpid(), os.getuid()) in mine
    exporter_lines = [e for e in entries if e["logger"] == "qgaproxy.exporter"]
    assert exporter_lines and all(e.get("agent") == "vm1" for e in exporter_lines), exporter_lines
    assert "agent syncing -> ready (agent 7.2.22, 42 commands, echoes ids)" in mine
    traces = [e["message"][len("[vm1] "):] for e in agent_lines if e["level"] == "debug"]
    assert 'client 1 -> guest-ping id="p1"' in traces
    assert any(re.fullmatch(r'client 1 <- guest-ping \{"return": \{\}, "id": \d+\}', t) for t in traces), traces
    assert "client 2 -> guest-get-host-name id=5" in traces
    assert any(t.startswith("client 2 <- guest-get-host-name ") for t in traces)
    # each of client 1's agent-bound requests has its request and reply traced
    sent = [t.split(" ")[3] for t in traces if t.startswith("client 1 -> ")]
    answered = [t.split(" ")[3] for t in traces if t.startswith("client 1 <- ")]
    assert sent == answered == ["guest-ping", "guest-set-user-password", "guest-exec", "guest-exec-status",
                                "guest-file-open", "guest-file-write", "guest-file-seek", "guest-file-read",
                                "guest-file-close"]


async def test_plain_logs_at_every_level_have_no_secret(tmp_path):
    for level in ("debug", "info", "warning", "error"):
        secrets = _secrets()
        proc, err, listen = _serve(tmp_path, "--log-level", level)
        try:
            async def up():
                return listen.exists()

            await until(up, 15, "listening")
            with trio.fail_after(10):
                while True:
                    async with await Client.connect(str(listen)) as probe:
                        if "return" in await probe.call("guest-ping"):
                            break
                    await trio.sleep(0.05)  # the agent is still syncing
            async with await Client.connect(str(listen)) as client:
                await _exercise_secrets(client, secrets)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        text = err.read_text()
        if level == "debug":
            assert "guest-set-user-password" in text
        _assert_no_secret(text, secrets)


# ---------------------------------------------------------------------------
# Regressions: bugs found here, fixed in f9049d5


async def test_guest_poll_timeouts_are_not_client_requests(caplog):
    """A poll that times out is a poll error (and resyncs the channel), not
    a client request: not in requests_total or request_timeouts_total (the
    timeout-rate alert divides one by the other), not logged as 'client -1'."""
    caplog.set_level(logging.INFO, logger="qgaproxy")
    sim = SimAgent(SimConfig(drop={"guest-get-disks"}))
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), guest_metrics_interval=0.05,
                         request_timeout=0.2) as proxy:
        port = metrics_port(proxy)

        async def poll_failed():
            return value(await scrape(port), "qgaproxy_guest_poll_errors_total", command="guest-get-disks")

        await until(poll_failed, 10, "a failed poll")
        m = await scrape(port)
    assert "client -1" not in caplog.text and "from client" not in caplog.text
    assert samples(m, "qgaproxy_requests_total") == {}
    assert value(m, "qgaproxy_request_timeouts_total") == 0
    assert value(m, "qgaproxy_resyncs_total", reason="timeout") >= 1


async def test_guest_metrics_resume_after_a_thaw_that_follows_a_resync():
    """A resync while frozen relearns guest-info with every guest-get-*
    disabled (by the freeze); after the thaw the exporter polls again."""
    sim = SimAgent(SimConfig(drop={"guest-ping"}))
    async with run_proxy("sim", sim_agent=sim, metrics=("127.0.0.1", 0), guest_metrics_interval=0.1,
                         command_timeouts=(("guest-ping", 0.2),)) as proxy:
        polls = count_updates(proxy)
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            assert (await client.call("guest-fsfreeze-freeze"))["return"] == 2
            assert "timed out" in (await client.call("guest-ping"))["error"]["desc"]  # -> resync while frozen
            with trio.fail_after(5):
                await wait_ready(proxy)
            assert (await client.call("guest-fsfreeze-thaw"))["return"] == 2
            done = polls["guest-get-fsinfo"]
            # The agent serves it again (a client gets it) ...
            assert "return" in await client.call("guest-get-fsinfo")

            async def polled_again():
                return polls["guest-get-fsinfo"] > done

            # ... so the exporter must poll it again within a few intervals.
            await until(polled_again, 3, "guest-get-fsinfo polled after the thaw")


async def test_exporter_log_lines_name_the_agent(caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    async with run_proxy("sim", metrics=("127.0.0.1", 0), guest_metrics_interval=0.1, name="vm7") as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)

        async def skipped():
            return any(r.name == "qgaproxy.exporter" for r in caplog.records)

        await until(skipped, 5, "the exporter's skip line")
    for record in caplog.records:
        if record.name == "qgaproxy.exporter":
            assert getattr(record, "agent", None) == "vm7" or "vm7" in record.getMessage(), record.getMessage()


async def test_debug_traces_every_reply(caplog, tmp_path):
    """Replies the proxy makes itself are traced too (guest-sync, unknown
    command, malformed input, policy denial, frozen refusal, timeout), each
    on the connection it belongs to."""
    from qgaproxy.config import ListenerConfig

    caplog.set_level(logging.DEBUG)
    sim = SimAgent(SimConfig(drop={"guest-get-host-name"}))
    admin, ro = str(tmp_path / "admin.sock"), str(tmp_path / "ro.sock")
    listeners = (ListenerConfig(admin, name="admin"), ListenerConfig(ro, name="ro", allow=("guest-ping",)))
    async with run_proxy("sim", [admin, ro], sim_agent=sim, listeners=listeners, request_timeout=0.3) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(admin) as client, await Client.connect(ro) as reader:
            await client.call("guest-sync", {"id": 1})
            await client.call("guest-no-such-command")
            await client.send(b'{"exec": "x"}')
            await client.reply()
            assert (await client.call("guest-fsfreeze-freeze"))["return"] == 2
            assert "frozen state" in (await client.call("guest-get-time"))["error"]["desc"]
            assert (await client.call("guest-fsfreeze-thaw"))["return"] == 2
            assert "timed out" in (await client.call("guest-get-host-name"))["error"]["desc"]
            assert "denied by qgaproxy policy" in (await reader.call("guest-get-time"))["error"]["desc"]
    lines = _messages(caplog)
    replies = [t for t in lines if re.match(r"client \d+ <- ", t)]
    local = [t.split(" ")[3] for t in replies if t.endswith("(from the proxy)")]
    agent = [t.split(" ")[3] for t in replies if not t.endswith("(from the proxy)")]
    assert [t.split(" ")[1] for t in replies].count("2") == 1  # the denial, on the reader's connection
    assert local == ["guest-sync", "guest-no-such-command", "(invalid)", "guest-get-time", "guest-get-host-name",
                     "guest-get-time"], replies
    assert agent == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"], replies
    requests = [t.split(" ")[3] for t in lines if re.match(r"client \d+ -> ", t)]
    assert requests == ["guest-sync", "guest-no-such-command", "guest-fsfreeze-freeze", "guest-get-time",
                        "guest-fsfreeze-thaw", "guest-get-host-name", "guest-get-time"], requests


async def test_disconnect_line_has_pid_and_uid(caplog):
    caplog.set_level(logging.INFO, logger="qgaproxy")
    async with run_proxy("sim", metrics=("127.0.0.1", 0)) as proxy:
        with trio.fail_after(10):
            await wait_ready(proxy)
        async with await Client.connect(proxy.config.listen[0]) as client:
            await client.call("guest-ping")

        async def gone():
            return any(" disconnected" in t for t in _messages(caplog))

        await until(gone, 5, "disconnect line")
    (line,) = [t for t in _messages(caplog) if " disconnected" in t]
    assert "pid %d" % os.getpid() in line and "uid %d" % os.getuid() in line, line


def test_request_histograms_expose_what_prometheus_histograms_do():
    """The request metrics are kept as plain counts (RequestCollector):
    their exposition must be what prometheus_client's own Counter and
    Histogram would write for the same observations, boundaries included."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from qgaproxy.metrics import _BUCKETS, MetricsRegistry
    from qgaproxy.upstream import Timings, Upstream

    ours = MetricsRegistry()
    metrics = ours.for_agent("vm1", Upstream(Timings()))
    theirs = CollectorRegistry()
    requests = Counter("qgaproxy_requests", "", ["agent", "command", "outcome"], registry=theirs)
    duration = Histogram("qgaproxy_request_duration_seconds", "", ["agent", "command"], buckets=_BUCKETS, registry=theirs)
    wait = Histogram("qgaproxy_request_queue_wait_seconds", "", ["agent", "command"], buckets=_BUCKETS, registry=theirs)
    values = list(_BUCKETS) + [b * 0.999 for b in _BUCKETS] + [b * 1.001 for b in _BUCKETS] + [1e-7, 61.0, 3600.0]
    for i, value in enumerate(values):
        outcome = ("ok", "error", "timeout")[i % 3]
        metrics.request_done("guest-ping", outcome, value, value / 3)
        requests.labels("vm1", "other", outcome).inc()
        if outcome != "timeout":
            duration.labels("vm1", "other").observe(value)
        wait.labels("vm1", "other").observe(value / 3)

    def samples(text: bytes) -> dict:
        out = {}
        for line in text.decode().splitlines():
            if line.startswith("qgaproxy_request"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    want = samples(generate_latest(theirs))
    got = {k: v for k, v in samples(ours.exposition()).items() if k.split("{")[0] in {n.split("{")[0] for n in want}}
    assert len(want) == 2 * (len(_BUCKETS) + 4) + 6
    assert got.keys() == want.keys()
    for key in want:
        if "_created" in key:  # when the series began: both within this test
            assert abs(got[key] - want[key]) < 60, key
        else:
            assert got[key] == pytest.approx(want[key]), key
    # The same TYPE lines too.
    def types(text: bytes) -> set:
        return {line for line in text.decode().splitlines() if line.startswith("# TYPE qgaproxy_request")}

    assert types(generate_latest(theirs)) <= types(ours.exposition())
