"""The configuration file: examples load, problems are reported by key
path, unknown keys are errors, flags override the file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qgaproxy import cli, config
from qgaproxy.transport import UpstreamAddress

ROOT = os.path.dirname(os.path.dirname(__file__))
EXAMPLES = sorted(
    os.path.join(ROOT, "config", name) for name in os.listdir(os.path.join(ROOT, "config")) if name.endswith(".toml")
)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_loads(path):
    cfg = config.load(path)
    assert cfg.agents
    for agent in cfg.agents:
        assert agent.listeners


def test_reference_sets_what_it_documents():
    cfg = config.load(os.path.join(ROOT, "config", "reference.toml"))
    (agent,) = cfg.agents
    assert cfg.metrics == ("127.0.0.1", 9310)
    assert agent.settings.request_timeout == 10.0  # the agent's override
    assert cfg.defaults.request_timeout == 5.0
    timeouts = dict(agent.settings.command_timeouts)
    assert timeouts["guest-fsfreeze-freeze"] == 3600.0
    assert timeouts["guest-get-fsinfo"] == 30.0  # added by the agent
    assert agent.listeners[0].mode == 0o660


def write(tmp_path, text: str) -> str:
    path = tmp_path / "qgaproxy.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path, text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, text))
    return err.value.problems


def test_every_problem_is_reported_with_its_key_path(tmp_path):
    got = problems(
        tmp_path,
        """
        colour = "blue"
        [log]
        level = "loud"
        [metrics]
        listen = "localhost"
        [defaults]
        window = 0
        request_timeout = "5"
        backoff_min = 10
        [defaults.command_timeouts]
        guest-ping = -1
        [[agent]]
        name = "a b"
        upstream = "carrier-pigeon:1"
        requst_timeout = 3
          [[agent.listener]]
          path = "/tmp/x.sock"
          mode = "0666"
          group = "no-such-group-here"
        [[agent]]
        upstream = "sim"
        """,
    )
    expected_prefixes = [
        "colour: unknown key",
        "log.level: must be debug, info, warning or error",
        "metrics.listen: must be HOST:PORT",
        "defaults.window: must be at least 1",
        "defaults.request_timeout: must be an integer or a number",
        "defaults.command_timeouts.guest-ping: must be a positive number",
        "defaults.backoff_min: must not exceed backoff_max",
        "agent[0].requst_timeout: unknown key",
        "agent[0].name: must be 1-64 letters",
        "agent[0].upstream: upstream 'carrier-pigeon:1'",
        "agent[0].listener[0].mode: must not be world-writable",
        "agent[0].listener[0].group: no such group",
        "agent[1].name: is required",
        "agent[1].listener: needs at least one",
    ]
    for prefix in expected_prefixes:
        assert any(p.startswith(prefix) for p in got), (prefix, got)
    assert len(got) == len(expected_prefixes), got


def test_duplicate_names_and_paths(tmp_path):
    got = problems(
        tmp_path,
        """
        [[agent]]
        name = "a"
        upstream = "sim"
          [[agent.listener]]
          path = "/tmp/same.sock"
        [[agent]]
        name = "a"
        upstream = "unix:/tmp/same.sock"
          [[agent.listener]]
          path = "/tmp/same.sock"
        """,
    )
    assert any("'a' is already the name of agent[0]" in p for p in got)
    assert any("/tmp/same.sock is already used by agent a" in p for p in got)
    assert any("agent[1].upstream: unix:/tmp/same.sock is also a listener" in p for p in got)


def test_not_toml_and_missing_file(tmp_path):
    with pytest.raises(config.ConfigError) as err:
        config.load(write(tmp_path, "[[agent]\nname ="))
    assert "not valid TOML" in str(err.value)
    with pytest.raises(config.ConfigError) as err:
        config.load(str(tmp_path / "absent.toml"))
    assert "No such file" in str(err.value)


def test_no_agents(tmp_path):
    assert problems(tmp_path, "[log]\nlevel = 'info'\n") == [
        "agent: no agents: add an [[agent]] (or a [directory] to watch)"
    ]


def test_upstream_forms():
    assert UpstreamAddress.parse("tcp:127.0.0.1:4444") == UpstreamAddress("tcp", host="127.0.0.1", port=4444)
    assert UpstreamAddress.parse("tcp:[::1]:4444") == UpstreamAddress("tcp", host="::1", port=4444)
    assert str(UpstreamAddress.parse("tcp:[::1]:4444")) == "tcp:[::1]:4444"
    assert UpstreamAddress.parse("vsock:3:1234") == UpstreamAddress("vsock", cid=3, port=1234)
    assert UpstreamAddress.parse("unix-listen:/run/x") == UpstreamAddress("unix-listen", path="/run/x")
    for bad in ("tcp:host", "tcp:host:0", "tcp:host:99999", "vsock:a:1", "vsock:1", "unix:", "ftp:x"):
        with pytest.raises(ValueError):
            UpstreamAddress.parse(bad)


def test_flags_override_the_file(tmp_path):
    path = write(
        tmp_path,
        """
        [log]
        level = "warning"
        [[agent]]
        name = "only"
        upstream = "sim"
        request_timeout = 9
          [[agent.listener]]
          path = "/tmp/a.sock"
        """,
    )
    args = cli.build_parser().parse_args(
        ["serve", "--config", path, "--request-timeout", "2", "--log-level", "debug", "--metrics", "127.0.0.1:0",
         "--listen", "/tmp/b.sock"]
    )
    cfg = cli.build_config(args)
    (agent,) = cfg.agents
    assert agent.settings.request_timeout == 2.0
    assert cfg.log_level == "debug"
    assert cfg.metrics == ("127.0.0.1", 0)
    assert [l.path for l in agent.listeners] == ["/tmp/b.sock"]
    assert agent.name == "only"


def test_check_config_command(tmp_path):
    good = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "check-config", os.path.join(ROOT, "config", "minimal.toml")],
        capture_output=True, text=True, timeout=30,
    )
    assert good.returncode == 0 and "OK: 1 agent(s)" in good.stdout
    bad = write(tmp_path, "[[agent]]\nname = 'x'\nupstream = 'sim'\nextra = 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "qgaproxy", "check-config", bad], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "agent[0].extra: unknown key" in result.stderr
    assert "agent[0].listener: needs at least one" in result.stderr
    assert "2 problem(s)" in result.stderr
    assert "Traceback" not in result.stderr
