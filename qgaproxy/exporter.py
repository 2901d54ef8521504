"""The guest exporter: what the guest agent knows, as Prometheus metrics.

Many scrapers must not mean many agent calls: the proxy polls the agent
at a fixed interval, at the lowest priority (a poll is sent only when no
client request is queued or in flight), and scrapes read the cache. Each
value carries the age of its last successful poll. Commands the agent
lacks or has disabled are skipped and reported once.

GuestState (no I/O) turns replies into a cache; GuestCollector renders
every agent's cache at scrape time; poll() is the small trio loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

log = logging.getLogger("qgaproxy.exporter")

COMMANDS = (
    "guest-get-fsinfo",
    "guest-network-get-interfaces",
    "guest-get-vcpus",
    "guest-get-users",
    "guest-get-osinfo",
    "guest-get-time",
    "guest-get-load",
    "guest-get-disks",
)

_NET_STATS = {
    "rx-bytes": ("receive_bytes", "Bytes received"),
    "rx-packets": ("receive_packets", "Packets received"),
    "rx-errs": ("receive_errors", "Receive errors"),
    "rx-dropped": ("receive_drops", "Received packets dropped"),
    "tx-bytes": ("transmit_bytes", "Bytes sent"),
    "tx-packets": ("transmit_packets", "Packets sent"),
    "tx-errs": ("transmit_errors", "Transmit errors"),
    "tx-dropped": ("transmit_drops", "Sent packets dropped"),
}


class GuestState:
    """The last good reply per command, and when it came."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.values: dict[str, Any] = {}
        self.at: dict[str, float] = {}  # wall time of the last success
        self.host_time_ns: int | None = None  # host clock when guest-get-time answered
        self.skipped: set[str] = set()
        self.errors: dict[str, int] = {}

    def update(self, command: str, value: dict) -> bool:
        if "return" in value:
            self.values[command] = value["return"]
            self.at[command] = self.clock()
            if command == "guest-get-time":
                self.host_time_ns = time.time_ns()
            return True
        self.errors[command] = self.errors.get(command, 0) + 1
        return False

    def skip(self, command: str, why: str, logger=log) -> None:
        if command not in self.skipped:
            self.skipped.add(command)
            logger.info("guest exporter: skipping %s (%s)", command, why)


class GuestCollector:
    """Renders every agent's GuestState (a prometheus-client collector)."""

    def __init__(self) -> None:
        self.agents: dict[str, GuestState] = {}

    def describe(self):
        return []

    def collect(self):
        now = time.time()
        age = GaugeMetricFamily(
            "qgaproxy_guest_poll_age_seconds", "Seconds since the last successful poll of a command", labels=["agent", "command"]
        )
        errors = CounterMetricFamily("qgaproxy_guest_poll_errors", "Failed polls of the guest", labels=["agent", "command"])
        fs_size = GaugeMetricFamily("qgaproxy_guest_filesystem_size_bytes", "Filesystem size", labels=["agent", "mountpoint", "type"])
        fs_used = GaugeMetricFamily("qgaproxy_guest_filesystem_used_bytes", "Filesystem space used", labels=["agent", "mountpoint", "type"])
        net = {
            key: CounterMetricFamily("qgaproxy_guest_network_" + name, help_, labels=["agent", "interface"])
            for key, (name, help_) in _NET_STATS.items()
        }
        addr = InfoMetricFamily("qgaproxy_guest_network_address", "An address of a guest interface", labels=["agent", "interface", "address", "prefix", "family"])
        vcpus = GaugeMetricFamily("qgaproxy_guest_vcpus", "Virtual CPUs of the guest", labels=["agent", "state"])
        users = GaugeMetricFamily("qgaproxy_guest_users", "Users logged in to the guest", labels=["agent"])
        osinfo = InfoMetricFamily("qgaproxy_guest_os", "The guest's operating system", labels=["agent", "id", "name", "version", "kernel_release", "machine"])
        offset = GaugeMetricFamily("qgaproxy_guest_time_offset_seconds", "Guest clock minus host clock", labels=["agent"])
        load = GaugeMetricFamily("qgaproxy_guest_load", "Guest load average", labels=["agent", "period"])
        disk = InfoMetricFamily("qgaproxy_guest_disk", "A disk of the guest", labels=["agent", "name", "partition", "alias"])
        for agent, state in sorted(self.agents.items()):
            for command, at in sorted(state.at.items()):
                age.add_metric([agent, command], max(0.0, now - at))
            for command, count in sorted(state.errors.items()):
                errors.add_metric([agent, command], count)
            v = state.values
            for fs in v.get("guest-get-fsinfo") or ():
                if not isinstance(fs, dict):
                    continue
                labels = [agent, str(fs.get("mountpoint", "")), str(fs.get("type", ""))]
                if isinstance(fs.get("total-bytes"), (int, float)):
                    fs_size.add_metric(labels, fs["total-bytes"])
                if isinstance(fs.get("used-bytes"), (int, float)):
                    fs_used.add_metric(labels, fs["used-bytes"])
            for nic in v.get("guest-network-get-interfaces") or ():
                if not isinstance(nic, dict):
                    continue
                name = str(nic.get("name", ""))
                stats = nic.get("statistics") or {}
                for key, family in net.items():
                    if isinstance(stats.get(key), (int, float)):
                        family.add_metric([agent, name], stats[key])
                for ip in nic.get("ip-addresses") or ():
                    if isinstance(ip, dict):
                        addr.add_metric(
                            [agent, name, str(ip.get("ip-address", "")), str(ip.get("prefix", "")), str(ip.get("ip-address-type", ""))],
                            {},
                        )
            cpus = v.get("guest-get-vcpus")
            if isinstance(cpus, list):
                online = sum(1 for c in cpus if isinstance(c, dict) and c.get("online"))
                vcpus.add_metric([agent, "online"], online)
                vcpus.add_metric([agent, "offline"], len(cpus) - online)
            if isinstance(v.get("guest-get-users"), list):
                users.add_metric([agent], len(v["guest-get-users"]))
            os_ = v.get("guest-get-osinfo")
            if isinstance(os_, dict):
                osinfo.add_metric(
                    [agent] + [str(os_.get(k, "")) for k in ("id", "name", "version", "kernel-release", "machine")], {}
                )
            guest_ns = v.get("guest-get-time")
            if isinstance(guest_ns, int) and state.host_time_ns is not None:
                offset.add_metric([agent], (guest_ns - state.host_time_ns) / 1e9)
            avg = v.get("guest-get-load")
            if isinstance(avg, dict):
                for period in ("load1", "load5", "load15"):
                    if isinstance(avg.get(period), (int, float)):
                        load.add_metric([agent, period[4:]], avg[period])
            for d in v.get("guest-get-disks") or ():
                if isinstance(d, dict):
                    disk.add_metric([agent, str(d.get("name", "")), str(bool(d.get("partition"))).lower(), str(d.get("alias", ""))], {})
        yield from (age, errors, fs_size, fs_used, *net.values(), addr, vcpus, users, osinfo, offset, load, disk)


async def poll(proxy, state: GuestState, interval: float, commands=COMMANDS) -> None:
    """Poll the agent every interval seconds, one command at a time, each
    only when the channel is idle (router.background_call)."""
    from .proxy import _AgentLog
    from .upstream import State

    agent_log = _AgentLog(log, proxy.config.name)
    disabled: set[str] = set()  # by the agent's own block list: for good
    while True:
        await proxy.wait_state(State.READY)
        info = proxy.upstream.info
        for command in commands:
            known = info.commands.get(command) if info is not None else None
            if known is None:
                state.skip(command, "the agent does not have it", agent_log)
                continue
            if command in disabled:
                continue
            if proxy.router.freeze.frozen:
                continue  # refused while frozen; try again after the thaw
            done = trio.Event()
            reply: dict = {}

            def on_reply(value, reply=reply, done=done):
                reply.update(value)
                done.set()

            if not proxy.router.background_call(command, None, on_reply, trio.current_time()):
                break  # not ready any more: start over
            proxy._after()
            await done.wait()  # the request's own deadline bounds this
            state.update(command, reply)
            error = reply.get("error")
            if isinstance(error, dict) and error.get("class") == "CommandNotFound":
                desc = str(error.get("desc", ""))
                if "frozen state" not in desc:
                    disabled.add(command)
                    state.skip(command, "disabled in the agent", agent_log)
        await trio.sleep(interval)
