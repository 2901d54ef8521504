"""deploy/grafana and deploy/prometheus against a REAL Prometheus.

- promtool checks the rules and the configuration, and runs unit tests of
  every alert (each fires when, and only when, it should);
- the dashboard is a well-formed Grafana dashboard (schemaVersion 38, a
  prometheus `datasource` variable, an `agent` variable, every panel on it);
- then a real qgaproxy process (`python -m qgaproxy serve`) in front of the
  simulated agent (`python -m qgaproxy.sim`, run on its own so that it can be
  made late, and stopped and started again) gets real traffic from several
  clients: ok and error replies, unknown commands, malformed input, a
  timeout with its late reply dropped as stale, a policy denial, a refused
  peer, a freeze whose owner disconnects (the guard thaws), a guest command
  the agent has disabled (one failed poll), the agent going away and coming
  back. A real
  Prometheus scrapes it every second with deploy/prometheus/rules.yml
  loaded, and every PromQL expression of the dashboard must return data,
  the alerts must evaluate cleanly (two are seen pending on the live data),
  and scripts/render_dashboard_preview.py must render from query_range.

QGAPROXY_PREVIEW_OUT=docs/dashboard-preview.png keeps the rendered preview
(QGAPROXY_PREVIEW_SECONDS=N lets the traffic run N seconds longer first).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from realagent import AgentConn

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "qgaproxy.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RENDER = ROOT / "scripts" / "render_dashboard_preview.py"
AGENT = "vm1"
RATE_INTERVAL = "5s"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        reason = "%s not found (apt-get install prometheus; tests/run.sh does)" % tool
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but " + reason, pytrace=False)
        pytest.skip(reason)
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_require("promtool"), *args], capture_output=True, text=True, timeout=60)


# ---------------------------------------------------------------------------
# Static checks


def test_promtool_check_rules():
    run = _promtool("check", "rules", str(RULES))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "SUCCESS: 5 rules found" in run.stdout + run.stderr


def test_promtool_check_config():
    run = _promtool("check", "config", str(PROM_CONFIG))
    assert run.returncode == 0, run.stdout + run.stderr
    config = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "qgaproxy"]
    assert job["scrape_interval"] == "15s"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9310"]
    assert config["rule_files"] == ["rules.yml"]
    assert PROM_CONFIG.read_text().lstrip().startswith("#")  # it explains itself


def _alert_rules() -> dict:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def test_rules_are_the_expected_alerts():
    rules = _alert_rules()
    assert set(rules) == {
        "QgaproxyAgentDown",
        "QgaproxyTimeoutRate",
        "QgaproxyGuestFrozenTooLong",
        "QgaproxyProxyDown",
        "QgaproxyGuestFilesystemFull",
    }
    expected_for = {
        "QgaproxyAgentDown": "2m",
        "QgaproxyTimeoutRate": "5m",
        "QgaproxyGuestFrozenTooLong": "10m",
        "QgaproxyProxyDown": "1m",
        "QgaproxyGuestFilesystemFull": "15m",
    }
    for name, rule in rules.items():
        assert rule.get("for") == expected_for[name], name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name


def _render_annotations(rule: dict, labels: dict) -> dict:
    def fill(text: str) -> str:
        return re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), text)

    return {key: fill(value) for key, value in rule["annotations"].items()}


def test_alert_rules_fire_as_intended(tmp_path):
    """promtool test rules: each alert stays quiet before its `for`, fires
    after it, and not at all on healthy series."""
    rules = _alert_rules()
    base = {"job": "qgaproxy", "instance": "127.0.0.1:9310"}

    def series(name: str, values: str, **labels) -> dict:
        all_labels = {**base, **labels}
        text = ",".join('%s="%s"' % kv for kv in sorted(all_labels.items()))
        return {"series": "%s{%s}" % (name, text), "values": values}

    def fired(alert: str, **labels) -> dict:
        rule = rules[alert]
        all_labels = {**labels, "alertname": alert, **rule["labels"]}
        return {"exp_labels": {k: v for k, v in all_labels.items() if k != "alertname"},
                "exp_annotations": _render_annotations(rule, all_labels)}

    fs = {"agent": "vm1", "mountpoint": "/", "type": "ext4"}
    tests = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    # vm1 goes down at 1m; vm2 stays up.
                    series("qgaproxy_agent_up", "1 0x10", agent="vm1"),
                    series("qgaproxy_agent_up", "1x10", agent="vm2"),
                    # vm1: 100 requests a minute, 10 of them time out (10%);
                    # vm2: 100 a minute, 1 times out (1%).
                    series("qgaproxy_requests_total", "0+100x20", agent="vm1", command="guest-ping", outcome="ok"),
                    series("qgaproxy_request_timeouts_total", "0+10x20", agent="vm1"),
                    series("qgaproxy_requests_total", "0+100x20", agent="vm2", command="guest-ping", outcome="ok"),
                    series("qgaproxy_request_timeouts_total", "0+1x20", agent="vm2"),
                    # vm1 frozen from 1m on; vm2 frozen for 5 minutes only.
                    series("qgaproxy_guest_frozen", "0 1x15", agent="vm1"),
                    series("qgaproxy_guest_frozen", "0 1x5 0x10", agent="vm2"),
                    # the scrape fails from 1m on
                    {"series": 'up{job="qgaproxy",instance="127.0.0.1:9310"}', "values": "1 0x5"},
                    # vm1's / at 95%, vm2's at 50%, and a zero-sized one
                    series("qgaproxy_guest_filesystem_used_bytes", "95x20", **fs),
                    series("qgaproxy_guest_filesystem_size_bytes", "100x20", **fs),
                    series("qgaproxy_guest_filesystem_used_bytes", "50x20", agent="vm2", mountpoint="/", type="ext4"),
                    series("qgaproxy_guest_filesystem_size_bytes", "100x20", agent="vm2", mountpoint="/", type="ext4"),
                    series("qgaproxy_guest_filesystem_used_bytes", "1x20", agent="vm2", mountpoint="/proc", type="proc"),
                    series("qgaproxy_guest_filesystem_size_bytes", "0x20", agent="vm2", mountpoint="/proc", type="proc"),
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "QgaproxyAgentDown", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "QgaproxyAgentDown",
                     "exp_alerts": [fired("QgaproxyAgentDown", **base, agent="vm1")]},
                    {"eval_time": "5m", "alertname": "QgaproxyTimeoutRate", "exp_alerts": []},
                    {"eval_time": "12m", "alertname": "QgaproxyTimeoutRate",
                     "exp_alerts": [fired("QgaproxyTimeoutRate", **base, agent="vm1")]},
                    {"eval_time": "10m", "alertname": "QgaproxyGuestFrozenTooLong", "exp_alerts": []},
                    {"eval_time": "12m", "alertname": "QgaproxyGuestFrozenTooLong",
                     "exp_alerts": [fired("QgaproxyGuestFrozenTooLong", **base, agent="vm1")]},
                    {"eval_time": "1m", "alertname": "QgaproxyProxyDown", "exp_alerts": []},
                    {"eval_time": "3m", "alertname": "QgaproxyProxyDown",
                     "exp_alerts": [fired("QgaproxyProxyDown", **base)]},
                    {"eval_time": "10m", "alertname": "QgaproxyGuestFilesystemFull", "exp_alerts": []},
                    {"eval_time": "16m", "alertname": "QgaproxyGuestFilesystemFull",
                     "exp_alerts": [fired("QgaproxyGuestFilesystemFull", **base, **fs)]},
                ],
            }
        ],
    }
    path = tmp_path / "rules-test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    run = _promtool("test", "rules", str(path))
    assert run.returncode == 0, run.stdout + run.stderr


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", ())


def dashboard_queries(dashboard: dict | None = None) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of the dashboard."""
    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["refId"], target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", ())
    ]


def substitute(expr: str, agent: str = AGENT) -> str:
    return expr.replace("$agent", agent).replace("$__rate_interval", RATE_INTERVAL)


def test_dashboard_structure():
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 39
    assert dashboard["uid"] == "qgaproxy" and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    agent = variables["agent"]
    assert agent["type"] == "query"
    assert agent["query"]["query"] == "label_values(qgaproxy_agent_up, agent)"
    assert agent["definition"] == "label_values(qgaproxy_agent_up, agent)"
    assert agent["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # Panels do not overlap on the 24-column grid.
    cells: dict = {}
    for panel in _panels(dashboard):
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, "%s overlaps %s" % (panel["title"], cells[(x, y)])
                cells[(x, y)] = panel["title"]
    metric_names = set()
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"]
            metric_names.update(re.findall(r"\b(qgaproxy_[a-z_]+|up)\b", expr))
            if "qgaproxy_" in expr:
                # every qgaproxy selector is narrowed to the chosen agents
                for selector in re.findall(r"qgaproxy_[a-z_]+(\{[^}]*\})?", expr):
                    assert 'agent=~"$agent"' in selector, (panel["title"], expr)
            if "rate(" in expr or "increase(" in expr:
                assert "[$__rate_interval]" in expr, (panel["title"], expr)
    # What the brief asks the dashboard to show.
    for name in (
        "qgaproxy_agent_up", "qgaproxy_agent_state", "qgaproxy_requests_total",
        "qgaproxy_request_duration_seconds_bucket", "qgaproxy_request_queue_wait_seconds_bucket",
        "qgaproxy_requests_in_flight", "qgaproxy_request_timeouts_total", "qgaproxy_resyncs_total",
        "qgaproxy_stale_replies_dropped_total", "qgaproxy_clients_connected", "qgaproxy_policy_denials_total",
        "qgaproxy_clients_refused_total", "qgaproxy_guest_frozen", "qgaproxy_freeze_guard_thaws_total",
        "qgaproxy_bytes_total", "qgaproxy_guest_filesystem_used_bytes", "qgaproxy_guest_filesystem_size_bytes",
        "qgaproxy_guest_network_receive_bytes_total", "qgaproxy_guest_network_transmit_bytes_total",
        "qgaproxy_guest_vcpus", "qgaproxy_guest_users", "qgaproxy_guest_time_offset_seconds",
        "qgaproxy_guest_poll_age_seconds",
    ):
        assert name in metric_names, name
    assert any("histogram_quantile(0.99" in e and "request_duration" in e for _, _, e in dashboard_queries(dashboard))
    assert any("histogram_quantile(0.5" in e and "request_duration" in e for _, _, e in dashboard_queries(dashboard))


# ---------------------------------------------------------------------------
# The live stack: sim + qgaproxy + Prometheus, all real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _until(predicate, timeout: float, what: str, describe=lambda: ""):
    """Poll predicate (a state check over HTTP or a file) until it returns
    something truthy, bounded by timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s: not reached within %gs %s" % (what, timeout, describe()))
        time.sleep(0.1)  # polling interval of a state check, not a wait for time to pass


def _parse_metrics(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _sample(metrics: dict, name: str, **labels) -> float | None:
    want = set(labels.items())
    found = [v for (n, ls), v in metrics.items() if n == name and want <= set(ls)]
    return sum(found) if found else None


class Process:
    """A child process of the test with its output in a file."""

    def __init__(self, argv: list[str], log: Path, **kw):
        self.argv = argv
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        status, body = _http(self.url + path + ("?" + query if query else ""))
        value = json.loads(body)
        assert status == 200 and value.get("status") == "success", (path, params, status, value)
        return value["data"]

    def query(self, expr: str) -> list:
        return self.api("/api/v1/query", query=expr)["result"]

    def alert_states(self) -> dict:
        return {a["labels"]["alertname"]: a["state"] for a in self.api("/api/v1/alerts")["alerts"]}


class Traffic(threading.Thread):
    """A client that keeps sending a varying mix of requests (pipelined
    batches) until stopped; every request gets exactly one reply line."""

    def __init__(self, path: Path, kind: str):
        super().__init__(daemon=True, name="traffic-" + kind)
        self.path = path
        self.kind = kind
        self.stop_event = threading.Event()
        self.replies = 0
        self.error: BaseException | None = None

    def batch(self, k: int) -> list[bytes]:
        if self.kind == "admin":
            wave = 1 + int(3 * (1 + math.sin(k / 12.0)))
            out = [b'{"execute": "guest-ping", "id": %d}' % k] * wave
            out += [b'{"execute": "guest-get-host-name"}', b'{"execute": "guest-get-time"}']
            if k % 3 == 0:
                out.append(b'{"execute": "guest-info"}')
            if k % 5 == 0:
                out.append(b'{"execute": "guest-no-such-command"}')  # "other"
            if k % 7 == 0:
                out.append(b'{"exec": "guest-ping"}')  # malformed: "invalid"
            return out
        # monitoring: read-only commands, now and then a denied one
        out = [b'{"execute": "guest-get-fsinfo"}', b'{"execute": "guest-network-get-interfaces"}']
        if k % 4 == 0:
            out.append(b'{"execute": "guest-file-open", "arguments": {"path": "/etc/hostname"}}')
        return out

    def run(self) -> None:
        try:
            k = 0
            while not self.stop_event.is_set():
                # monitoring reconnects every few batches: the clients gauge moves
                with AgentConn(self.path, timeout=10) as conn:
                    for _ in range(8 if self.kind == "monitoring" else 10_000):
                        if self.stop_event.is_set():
                            break
                        batch = self.batch(k)
                        conn.send(b"".join(batch))
                        conn.recv_lines(len(batch))
                        self.replies += len(batch)
                        k += 1
                        self.stop_event.wait(0.1 if self.kind == "admin" else 0.3)
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def stack(tmp_path):
    """sim + qgaproxy + Prometheus; yields a namespace; stops them all."""
    _require("prometheus")
    _require("promtool")
    started: list[Process] = []
    ns = type("Stack", (), {})()
    ns.tmp = tmp_path
    ns.sim_sock = tmp_path / "agent.sock"
    ns.admin = tmp_path / "admin.sock"
    ns.monitoring = tmp_path / "monitoring.sock"
    ns.restricted = tmp_path / "restricted.sock"

    def start_sim() -> Process:
        sim = Process(
            [sys.executable, "-m", "qgaproxy.sim", "--listen", str(ns.sim_sock), "--hostname", "web1",
             "--late", "guest-get-timezone=1.6", "--block", "guest-get-disks"],
            tmp_path / ("sim-%d.log" % len(started)),
        )
        started.append(sim)
        _until(lambda: ns.sim_sock.exists() or sim.proc.poll() is not None, 15, "sim socket")
        assert sim.proc.poll() is None, sim.text()
        return sim

    ns.start_sim = start_sim
    try:
        ns.sim = start_sim()
        config = tmp_path / "qgaproxy.toml"
        config.write_text(
            f"""
[log]
level = "info"

[defaults]
request_timeout = 1.0

[[agent]]
name = "{AGENT}"
upstream = "unix:{ns.sim_sock}"

  [[agent.listener]]
  name = "admin"
  path = "{ns.admin}"

  [[agent.listener]]
  name = "monitoring"
  path = "{ns.monitoring}"
  allow = ["guest-ping", "guest-info", "guest-sync*", "guest-get-*", "guest-network-get-interfaces"]

  [[agent.listener]]
  name = "restricted"
  path = "{ns.restricted}"
  peer_uids = ["nobody"]
"""
        )
        ns.proxy = Process(
            [sys.executable, "-m", "qgaproxy", "serve", "--config", str(config),
             "--metrics", "127.0.0.1:0", "--guest-metrics", "1"],
            tmp_path / "qgaproxy.log",
        )
        started.append(ns.proxy)
        found = _until(
            lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", ns.proxy.text())
            or ns.proxy.proc.poll() is not None,
            15, "the proxy's metrics line", ns.proxy.text,
        )
        assert ns.proxy.proc.poll() is None, ns.proxy.text()
        ns.metrics_port = int(found.group(1))
        ns.metrics_url = "http://127.0.0.1:%d" % ns.metrics_port
        _until(lambda: _http(ns.metrics_url + "/healthz")[0] == 200, 15, "proxy healthy", ns.proxy.text)

        prom_yml = tmp_path / "prometheus.yml"
        prom_yml.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "qgaproxy",
                            "scrape_interval": "1s",
                            "scrape_timeout": "1s",
                            "static_configs": [{"targets": ["127.0.0.1:%d" % ns.metrics_port]}],
                        }
                    ],
                }
            )
        )
        check = _promtool("check", "config", str(prom_yml))
        assert check.returncode == 0, check.stdout + check.stderr
        for attempt in range(3):  # the free port may be taken between probe and bind
            port = _free_port()
            ns.prometheus_proc = Process(
                ["prometheus", "--config.file=%s" % prom_yml, "--storage.tsdb.path=%s" % (tmp_path / "tsdb"),
                 "--web.listen-address=127.0.0.1:%d" % port, "--log.level=warn"],
                tmp_path / ("prometheus-%d.log" % attempt),
            )
            started.append(ns.prometheus_proc)
            url = "http://127.0.0.1:%d" % port

            def ready():
                if ns.prometheus_proc.proc.poll() is not None:
                    return "exited"
                try:
                    return _http(url + "/-/ready", timeout=1)[0] == 200 and "ready"
                except OSError:
                    return False

            if _until(ready, 30, "prometheus ready", ns.prometheus_proc.text) == "ready":
                break
        else:
            raise AssertionError("prometheus did not start:\n" + ns.prometheus_proc.text())
        ns.prom = Prometheus(url)
        yield ns
    finally:
        for process in reversed(started):
            process.stop()


def _proxy_metrics(stack) -> dict:
    status, body = _http(stack.metrics_url + "/metrics")
    assert status == 200
    return _parse_metrics(body.decode())


def test_dashboard_queries_on_real_prometheus(stack):
    t_start = time.time()
    prom = stack.prom

    # Prometheus scrapes the proxy: the target is up and has been scraped a few times.
    def scraped():
        targets = prom.api("/api/v1/targets")["activeTargets"]
        if not targets or targets[0]["health"] != "up":
            return False
        count = prom.query('count_over_time(up{job="qgaproxy"}[1m])')
        return count and float(count[0]["value"][1]) >= 3

    _until(scraped, 30, "target up and scraped 3 times", lambda: json.dumps(prom.api("/api/v1/targets")))

    traffic = [Traffic(stack.admin, "admin"), Traffic(stack.monitoring, "monitoring")]
    for t in traffic:
        t.start()
    try:
        # A timeout: the agent answers guest-get-timezone 1.6 s late, the
        # request deadline is 1 s; the late reply is then dropped as stale.
        with AgentConn(stack.admin, timeout=10) as conn:
            conn.send(b'{"execute": "guest-get-timezone", "id": "tz"}')
            reply = json.loads(conn.recv_lines(1))
            assert reply["error"]["desc"] == "Guest agent command 'guest-get-timezone' timed out after 1 seconds", reply
        _until(lambda: (_sample(_proxy_metrics(stack), "qgaproxy_stale_replies_dropped_total", agent=AGENT) or 0) >= 1,
               10, "the late reply dropped as stale", stack.proxy.text)

        # A refused peer: the restricted listener admits only uid nobody.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(stack.restricted))
            s.settimeout(5)
            assert s.recv(100) == b""  # closed at once
        # A policy denial on the read-only listener.
        with AgentConn(stack.monitoring) as conn:
            conn.send(b'{"execute": "guest-file-open", "arguments": {"path": "/etc/shadow"}}')
            reply = json.loads(conn.recv_lines(1))
            assert reply["error"]["class"] == "CommandNotFound"
            assert "denied by qgaproxy policy of listener 'monitoring'" in reply["error"]["desc"]

        # A freeze whose owner goes away: the guard thaws. While frozen the
        # alert is pending in the real Prometheus.
        freezer = AgentConn(stack.admin, timeout=10)
        try:
            freezer.send(b'{"execute": "guest-fsfreeze-freeze"}')
            assert json.loads(freezer.recv_lines(1)) == {"return": 2}
            _until(lambda: prom.alert_states().get("QgaproxyGuestFrozenTooLong") == "pending", 15,
                   "QgaproxyGuestFrozenTooLong pending", lambda: str(prom.api("/api/v1/alerts")))
        finally:
            freezer.close()
        _until(lambda: _sample(_proxy_metrics(stack), "qgaproxy_freeze_guard_thaws_total", agent=AGENT, reason="owner gone") == 1,
               10, "the freeze guard thawed", stack.proxy.text)
        _until(lambda: _sample(_proxy_metrics(stack), "qgaproxy_guest_frozen", agent=AGENT) == 0, 10, "thawed")

        extra = float(os.environ.get("QGAPROXY_PREVIEW_SECONDS", "0"))
        if extra > 0:  # a longer run for the committed preview: more timeouts now and then
            end = time.monotonic() + extra
            while time.monotonic() < end:
                time.sleep(min(20.0, max(0.0, end - time.monotonic())))
                if time.monotonic() < end - 5:
                    with AgentConn(stack.admin, timeout=10) as conn:
                        conn.send(b'{"execute": "guest-get-timezone"}')
                        conn.recv_lines(1)

        # Every series the dashboard reads exists in Prometheus with a few samples.
        _until(lambda: prom.query('count_over_time(qgaproxy_freeze_guard_thaws_total{agent="%s"}[1m]) >= 3' % AGENT),
               15, "the newest series scraped three times")

        # Every expression of the dashboard returns data.
        empty = []
        queries = dashboard_queries()
        assert len(queries) >= 30
        for title, ref, expr in queries:
            result = prom.query(substitute(expr))
            if not result:
                empty.append("%s [%s]: %s" % (title, ref, substitute(expr)))
        assert not empty, "dashboard queries without data:\n  " + "\n  ".join(empty)
        # The agent variable's query.
        assert prom.api("/api/v1/label/agent/values", **{"match[]": "qgaproxy_agent_up"}) == [AGENT]
        # Some values are what the traffic made them.
        def value(expr):
            result = prom.query(expr)
            assert result, expr
            return float(result[0]["value"][1])

        assert value('qgaproxy_agent_up{agent="%s"}' % AGENT) == 1
        assert value('sum(qgaproxy_request_timeouts_total{agent="%s"})' % AGENT) >= 1
        assert value('sum(qgaproxy_stale_replies_dropped_total{agent="%s"})' % AGENT) >= 1
        assert value('sum(qgaproxy_resyncs_total{agent="%s",reason="timeout"})' % AGENT) >= 1
        assert value('sum(qgaproxy_clients_refused_total{agent="%s",listener="restricted",reason="peer not allowed"})' % AGENT) == 1
        assert value('sum(qgaproxy_policy_denials_total{agent="%s",listener="monitoring"})' % AGENT) >= 1
        assert value('sum(qgaproxy_requests_total{agent="%s",command="other"})' % AGENT) >= 1
        assert value('sum(qgaproxy_requests_total{agent="%s",command="invalid",outcome="invalid"})' % AGENT) >= 1
        assert value('qgaproxy_agent_info{agent="%s",version="7.2.22"}' % AGENT) == 1
        assert value('qgaproxy_guest_filesystem_size_bytes{agent="%s",mountpoint="/boot"}' % AGENT) == 8 << 30
        assert value('qgaproxy_guest_vcpus{agent="%s",state="online"}' % AGENT) == 2
        assert abs(value('qgaproxy_guest_time_offset_seconds{agent="%s"}' % AGENT)) < 1
        assert value('max(qgaproxy_guest_poll_age_seconds{agent="%s"})' % AGENT) < 5
        # guest-get-disks is disabled in the agent: asked once, then skipped
        # (a poll that raced the freeze may have been refused too: "frozen state")
        errors = {e["metric"]["command"]: e["value"][1]
                  for e in prom.query('qgaproxy_guest_poll_errors_total{agent="%s"}' % AGENT)}
        assert errors.pop("guest-get-disks") == "1", errors
        assert all(v == "1" for v in errors.values()), errors
        # The rules evaluate cleanly on real data.
        for group in prom.api("/api/v1/rules")["groups"]:
            for rule in group["rules"]:
                assert rule["health"] == "ok", rule

        # The agent goes away (QEMU stops): agent_up 0, QgaproxyAgentDown pending; it comes back.
        stack.sim.stop()
        _until(lambda: prom.query('qgaproxy_agent_up{agent="%s"} == 0' % AGENT), 15, "agent down in Prometheus")
        _until(lambda: prom.alert_states().get("QgaproxyAgentDown") == "pending", 15, "QgaproxyAgentDown pending")
        assert _http(stack.metrics_url + "/healthz")[0] == 503
        stack.sim = stack.start_sim()
        _until(lambda: prom.query('qgaproxy_agent_up{agent="%s"} == 1' % AGENT), 20, "agent back in Prometheus",
               stack.proxy.text)
        _until(lambda: "QgaproxyAgentDown" not in prom.alert_states(), 15, "QgaproxyAgentDown resolved")
        time.sleep(3)  # three more scrapes of the recovered agent, for the preview's right edge
    finally:
        for t in traffic:
            t.stop_event.set()
        for t in traffic:
            t.join(15)
    for t in traffic:
        assert t.error is None, (t.name, t.error)
        assert t.replies > 20, (t.name, t.replies)

    log = stack.proxy.text()
    assert "refused a client on restricted: peer not allowed" in log
    assert "freeze guard: thawing the guest: the client that froze the guest disconnected" in log
    assert "command guest-get-timezone from client" in log and "timed out after 1s" in log

    # The preview renders from query_range.
    spec = importlib.util.spec_from_file_location("render_dashboard_preview", RENDER)
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    out = stack.tmp / "preview.png"
    drawn = render.render(prom.url, AGENT, t_start, time.time(), str(out), step=1, rate_interval=RATE_INTERVAL)
    assert all(count > 0 for count in drawn.values()), drawn
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    keep = os.environ.get("QGAPROXY_PREVIEW_OUT")
    if keep:
        shutil.copyfile(out, keep)
