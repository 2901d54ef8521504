"""Prometheus metrics of the proxy, and the small HTTP server for them.

A registry of our own (never the global one), names ``qgaproxy_*`` with
unit suffixes, and labels only from small fixed sets: the command label
is a command the agent lists in guest-info, or "other"; malformed input
is "invalid". Never client ids, pids or paths.

The HTTP server is deliberately tiny (GET /metrics, /healthz, /readyz,
/status (status.py: client pids, so loopback matters), bounded request
size, short deadlines): it runs in the proxy's own trio loop and binds
to loopback unless told otherwise.
"""

from __future__ import annotations

import bisect
import logging
import time

import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from .exporter import GuestCollector, GuestState

from typing import Callable

from .router import Observer
from .upstream import State, Upstream

log = logging.getLogger("qgaproxy.metrics")

_STATES = [s.value for s in State]
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class MetricsRegistry:
    """The metric families of one process; every series carries the
    ``agent`` label (the agent's configured name)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._tallies: list[Tally] = []
        r = self.registry
        self.agent_up = Gauge("qgaproxy_agent_up", "1 when the guest agent is synced and ready", ["agent"], registry=r)
        self.agent_state = Gauge(
            "qgaproxy_agent_state", "1 for the upstream channel's current state", ["agent", "state"], registry=r
        )
        # qgaproxy_requests_total, qgaproxy_request_duration_seconds and
        # qgaproxy_request_queue_wait_seconds (see RequestCollector).
        self.requests = RequestCollector()
        r.register(self.requests)
        self.clients = Gauge(
            "qgaproxy_clients_connected", "Client connections open", ["agent", "listener"], registry=r
        )
        self.resyncs = Counter(
            "qgaproxy_resyncs", "Resyncs of the agent channel, by reason", ["agent", "reason"], registry=r
        )
        self.stale = Counter(
            "qgaproxy_stale_replies_dropped", "Agent replies that matched no request", ["agent"], registry=r
        )
        self.garbage_bytes = Counter(
            "qgaproxy_upstream_garbage_bytes", "Bytes from the agent that were not a reply", ["agent"], registry=r
        )
        self.timeouts = Counter("qgaproxy_request_timeouts", "Requests that timed out", ["agent"], registry=r)
        self.connects = Counter(
            "qgaproxy_upstream_connects", "Connections made to the agent channel", ["agent"], registry=r
        )
        self.refused = Counter(
            "qgaproxy_clients_refused", "Connections refused at accept, by reason", ["agent", "listener", "reason"], registry=r
        )
        self.denied = Counter(
            "qgaproxy_policy_denials", "Requests refused by a listener's policy", ["agent", "listener"], registry=r
        )
        self.freeze_thaws = Counter(
            "qgaproxy_freeze_guard_thaws", "Thaws the freeze guard asked for, by reason", ["agent", "reason"], registry=r
        )
        self.frozen = Gauge("qgaproxy_guest_frozen", "1 while the guest's filesystems are frozen", ["agent"], registry=r)
        self.in_flight = Gauge("qgaproxy_requests_in_flight", "Requests sent to the agent, not yet answered", ["agent"], registry=r)
        self.queued = Gauge("qgaproxy_requests_queued", "Requests waiting in the proxy", ["agent"], registry=r)
        self.agent_info = Info("qgaproxy_agent", "The guest agent behind the channel", ["agent"], registry=r)
        self.bytes = Counter(
            "qgaproxy_bytes", "Bytes moved, by side and direction", ["agent", "side", "direction"], registry=r
        )
        self.guest = GuestCollector()
        r.register(self.guest)
        # name -> state, for /healthz; set by whoever runs the agents
        self.health: Callable[[], dict] = lambda: {}
        # name -> status.build() of the agent, for /status
        self.status: Callable[[], dict] = lambda: {}
        self.serving = False  # /readyz: every listener of the process is up
        self.memory_refusals = Counter(
            "qgaproxy_memory_limit_refusals", "Clients refused for the total buffer limit", ["agent"], registry=r
        )

    def for_agent(self, name: str, upstream: Upstream) -> "Metrics":
        return Metrics(self, name, upstream)

    def tally(self, counter) -> "Tally":
        tally = Tally(counter)
        self._tallies.append(tally)
        return tally

    def exposition(self) -> bytes:
        for tally in self._tallies:
            tally.flush()
        return prometheus_client.generate_latest(self.registry)


class RequestHistogram:
    """A histogram kept as plain counts, one per bucket of _BUCKETS and one
    for +Inf (not cumulative until collected)."""

    __slots__ = ("counts", "total", "created")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0
        self.created = time.time()  # (the _created series, as prometheus_client writes it)

    def observe(self, amount: float) -> None:
        self.counts[bisect.bisect_left(_BUCKETS, amount)] += 1
        self.total += amount

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip(list(_BUCKETS) + [float("inf")], self.counts):
            running += count
            out.append((floatToGoString(bound), running))
        return out


class RequestCollector:
    """The request metrics, collected from counts each agent's Metrics
    keeps in plain dicts: request_done runs for every request, and a
    prometheus Counter plus two Histograms cost about 2.6 us there (a lock
    per increment, a scan of the buckets); this costs a dict lookup and a
    bisect. Series appear with their first request."""

    _FAMILIES = (
        ("qgaproxy_request_duration_seconds", "Time from sending a request to the agent to its reply", "_durations"),
        ("qgaproxy_request_queue_wait_seconds", "Time a request waited in the proxy before going to the agent", "_waits"),
    )

    def __init__(self) -> None:
        self.agents: dict[str, "Metrics"] = {}

    def describe(self):
        requests, histograms = self._families()
        return [requests] + [family for family, _ in histograms]

    def _families(self):
        requests = CounterMetricFamily(
            "qgaproxy_requests", "Requests from clients, by command and outcome", labels=["agent", "command", "outcome"]
        )
        histograms = [(HistogramMetricFamily(name, doc, labels=["agent", "command"]), attr) for name, doc, attr in self._FAMILIES]
        return requests, histograms

    def collect(self):
        requests, histograms = self._families()
        for name, metrics in list(self.agents.items()):
            created = metrics._requests_created
            for (command, outcome), count in list(metrics._requests.items()):
                requests.add_metric([name, command, outcome], count, created=created.get((command, outcome)))
            for family, attr in histograms:
                for command, histogram in list(getattr(metrics, attr).items()):
                    family.add_metric([name, command], histogram.buckets(), histogram.total)
                    family.samples.append(
                        Sample(family.name + "_created", {"agent": name, "command": command}, histogram.created)
                    )
        yield requests
        for family, _ in histograms:
            yield family


class Tally:
    """A counter bumped on every message: a plain int until the next
    scrape (a prometheus counter takes a lock per increment)."""

    __slots__ = ("counter", "pending")

    def __init__(self, counter):
        self.counter = counter
        self.pending = 0

    def inc(self, amount: int = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            self.counter.inc(self.pending)
            self.pending = 0


class Metrics(Observer):
    """One agent's view of the registry: the label bound, Observer hooks."""

    def __init__(self, family: MetricsRegistry, name: str, upstream: Upstream):
        self.family = family
        self.name = name
        self.upstream = upstream
        f = family
        self.agent_up = f.agent_up.labels(name)
        self.stale = f.stale.labels(name)
        self.garbage_bytes = f.garbage_bytes.labels(name)
        self.timeouts = f.timeouts.labels(name)
        self.connects = f.connects.labels(name)
        # Read by RequestCollector at scrape time.
        self._requests: dict[tuple[str, str], int] = {}  # (command label, outcome) -> count
        self._requests_created: dict[tuple[str, str], float] = {}  # when each count started
        self._durations: dict[str, RequestHistogram] = {}  # command label -> its histogram
        self._waits: dict[str, RequestHistogram] = {}
        self._listeners: set[str] = set()
        previous = f.requests.agents.get(name)
        if previous is not None:  # the same agent again (a reload): its counts go on
            self._requests, self._durations, self._waits = previous._requests, previous._durations, previous._waits
            self._requests_created = previous._requests_created
        f.requests.agents[name] = self
        self.bytes_client_in = f.tally(f.bytes.labels(name, "client", "in"))
        self.bytes_client_out = f.tally(f.bytes.labels(name, "client", "out"))
        self.bytes_agent_in = f.tally(f.bytes.labels(name, "agent", "in"))
        self.bytes_agent_out = f.tally(f.bytes.labels(name, "agent", "out"))
        self.guest_state = GuestState()
        f.guest.agents[name] = self.guest_state
        self.agent_up.set(0)
        for state in _STATES:
            f.agent_state.labels(name, state).set(1 if state == upstream.state.value else 0)
        for reason in ("connect", "timeout", "no-reply command"):
            f.resyncs.labels(name, reason)

    def _command_label(self, command: str | None) -> str:
        if command is None:
            return "invalid"
        info = self.upstream.info
        if info is not None and info.has_command(command):
            return command
        return "other"

    def remove(self) -> None:
        """Forget this agent's series (it was removed from the configuration)."""
        f = self.family
        name = self.name
        for metric in (f.agent_up, f.stale, f.garbage_bytes, f.timeouts, f.connects):
            _quiet_remove(metric, name)
        for state in _STATES:
            _quiet_remove(f.agent_state, name, state)
        for reason in ("connect", "timeout", "no-reply command"):
            _quiet_remove(f.resyncs, name, reason)
        if f.requests.agents.get(name) is self:
            del f.requests.agents[name]
        for listener in self._listeners:
            _quiet_remove(f.clients, name, listener)
        for metric in (f.in_flight, f.queued, f.agent_info):
            _quiet_remove(metric, name)
        for side in ("client", "agent"):
            for direction in ("in", "out"):
                _quiet_remove(f.bytes, name, side, direction)
        mine = {self.bytes_client_in, self.bytes_client_out, self.bytes_agent_in, self.bytes_agent_out}
        f._tallies[:] = [tally for tally in f._tallies if tally not in mine]
        f.guest.agents.pop(name, None)

    def watch_router(self, router) -> None:
        """Gauges read from the router at scrape time."""
        self.family.in_flight.labels(self.name).set_function(router.in_flight)
        self.family.queued.labels(self.name).set_function(router.queued)

    # -- Observer --------------------------------------------------------------
    def request_done(self, command, outcome, duration, queued):
        label = self._command_label(command)
        key = (label, outcome)
        requests = self._requests
        count = requests.get(key)
        if count is None:
            count = 0
            self._requests_created[key] = time.time()
        requests[key] = count + 1
        if duration > 0 and (outcome == "ok" or outcome == "error"):
            histogram = self._durations.get(label)
            if histogram is None:
                histogram = self._durations[label] = RequestHistogram()
            histogram.observe(duration)
        if queued > 0:
            wait = self._waits.get(label)
            if wait is None:
                wait = self._waits[label] = RequestHistogram()
            wait.observe(queued)

    def stale_reply(self, why):
        self.stale.inc()

    def garbage(self, nbytes):
        self.garbage_bytes.inc(nbytes)

    def resync(self, reason):
        self.family.resyncs.labels(self.name, reason).inc()

    def state_changed(self, old, new, reason):
        self.agent_up.set(1 if new is State.READY else 0)
        info = self.upstream.info
        if new is State.READY and info is not None:
            self.family.agent_info.labels(self.name).info(
                {"version": info.version or "", "echoes_id": "true" if info.echoes_id else "false"}
            )
        for state in _STATES:
            self.family.agent_state.labels(self.name, state).set(1 if state == new.value else 0)

    def timeout(self, command, after, client):
        self.timeouts.inc()

    def connected(self):
        self.connects.inc()

    def refused(self, listener: str, reason: str):
        self.family.refused.labels(self.name, listener, reason).inc()

    def denied(self, client, command):
        self.family.denied.labels(self.name, client.listener).inc()

    def freeze_guard(self, why: str):
        reason = "owner gone" if "disconnected" in why else "too long" if "longer" in why else "no owner"
        self.family.freeze_thaws.labels(self.name, reason).inc()

    def frozen_changed(self, frozen: bool):
        self.family.frozen.labels(self.name).set(1 if frozen else 0)

    def memory_limit(self, client, total):
        self.family.memory_refusals.labels(self.name).inc()

    def client_opened(self, listener: str):
        self._listeners.add(listener)
        self.family.clients.labels(self.name, listener).inc()

    def client_closed(self, listener: str):
        self.family.clients.labels(self.name, listener).dec()


def _quiet_remove(metric, *labels) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("expected HOST:PORT, got %r" % text)
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


_MAX_REQUEST = 8192


async def serve_metrics(metrics: MetricsRegistry, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED):
    listeners = await trio.open_tcp_listeners(port, host=host)
    log.info("metrics on http://%s:%d/metrics", host, listeners[0].socket.getsockname()[1])
    task_status.started(listeners)
    await trio.serve_listeners(lambda stream: _handle_http(metrics, stream), listeners)


async def _handle_http(metrics: MetricsRegistry, stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(10):
            data = b""
            while b"\r\n\r\n" not in data and len(data) < _MAX_REQUEST:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            line = data.split(b"\r\n", 1)[0].split()
            if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
                await _respond(stream, 405, b"method not allowed\n")
                return
            path, _, query = line[1].partition(b"?")
            if path in (b"/healthz", b"/readyz"):
                status, body = _health(metrics, path, query)
                await _respond(stream, status, body, b"application/json", head=line[0] == b"HEAD")
            elif path == b"/status":
                status, body = _status(metrics, query)
                await _respond(stream, status, body, b"application/json", head=line[0] == b"HEAD")
            elif path == b"/metrics":
                body = metrics.exposition()
                await _respond(stream, 200, body, prometheus_client.CONTENT_TYPE_LATEST.encode(), head=line[0] == b"HEAD")
            else:
                await _respond(stream, 404, b"not found\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


def _json_body(value, sort_keys: bool = False) -> bytes:
    import json

    return json.dumps(value, sort_keys=sort_keys).encode() + b"\n"


def _for_agent(by_agent: dict, query: bytes) -> tuple[dict | None, tuple[int, bytes] | None]:
    """(by_agent, None), or (only its entry, None) for the agent ?agent=NAME
    names, or (None, the 404 response) when NAME is not there."""
    from urllib.parse import parse_qs

    wanted = parse_qs(query.decode("ascii", "replace")).get("agent")
    if not wanted:
        return by_agent, None
    if wanted[0] not in by_agent:
        return None, (404, _json_body({"status": "unknown agent", "agent": wanted[0]}))
    return {wanted[0]: by_agent[wanted[0]]}, None


def _health(metrics: MetricsRegistry, path: bytes, query: bytes) -> tuple[int, bytes]:
    if path == b"/readyz":
        ok = metrics.serving
        return (200 if ok else 503), _json_body({"status": "ok" if ok else "starting"})
    states, unknown = _for_agent(metrics.health(), query)
    if unknown:
        return unknown
    ok = bool(states) and all(state == "ready" for state in states.values())
    return (200 if ok else 503), _json_body({"status": "ok" if ok else "unavailable", "agents": states}, True)


def _status(metrics: MetricsRegistry, query: bytes) -> tuple[int, bytes]:
    """{"agents": {name: status}} (status.py), or one agent's with ?agent=NAME."""
    statuses, unknown = _for_agent(metrics.status(), query)
    if unknown:
        return unknown
    return 200, _json_body({"agents": statuses}, True)


async def _respond(stream, status: int, body: bytes, ctype: bytes = b"text/plain; charset=utf-8", head=False):
    reason = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Service Unavailable"}[status]
    header = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status,
        reason,
        ctype,
        len(body),
    )
    await stream.send_all(header + (b"" if head else body))
