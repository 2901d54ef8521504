"""The benchmark suite's smoke run: every section runs end to end against
the real agent, the simulated agent and (when it boots here) the VM, and
writes its table, plot and figures. No timing is asserted: the figures of a
run this short mean nothing; bench/suite.py without --quick measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.real_agent


def test_benchmark_suite_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for agent in ("host", "sim"):
        a = results[agent]
        for kind in ("direct", "relay", "proxy"):
            assert a[kind]["p50_us"] > 0 and a[kind]["n"] > 0
        assert set(a["proxy_clients_rps"]) >= {"1", "4", "16"}
        assert a["proxmox_style_16_rps"] > 0 and a["libvirt_style_16_rps"] > 0
    host = results["host"]
    # The CPU accounting behind (b): every part was counted.
    assert set(host["proxy_16_cpu_us"]) == {"proxy", "clients", "agent"}
    assert all(v > 0 for v in host["proxy_16_cpu_us"].values())
    assert host["floor_16_cpu_us"]["clients"] > 0 and host["direct_pipelining_cpu_us"]["agent"] > 0
    assert host["floor_16_rps"] > 0 and host["floor_tasks_16_rps"] > 0  # every floor answered
    for floor in ("floor_mux_16", "floor_router_16"):  # (through the agent)
        assert host[floor + "_rps"] > 0 and host[floor + "_cpu_us"]["agent"] > 0
    assert host["least_proxy_us"] > host["router_core_us"]
    assert 0 < host["bound_16_rps"] < host["bound_16_no_server_rps"]
    assert host["router_core_us"] > 0
    assert "proxy" in results["vm"] or results["vm"].get("skipped")
    if "proxy" in results["vm"]:
        assert results["vm"]["direct_after_work"]["n"] > 0
    big = results["big_read"]
    assert big["reply_line_bytes"] > big["bytes"]  # base64 of 48 MiB came through whole
    assert results["idle_clients"]["per_client_kib_1000"] > 0
    assert results["timeout_recovery"]["after_timeout"]["n"] == 3
    assert {t["target"][:3] for t in results["targets"]} >= {"(a)", "(b)", "(c)", "(d)", "(e)", "(f)"}
    table = (tmp_path / "results.md").read_text()
    assert "## Targets" in table and "| (f)" in table
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --render measures nothing and writes the same table again.
    (tmp_path / "results.md").unlink()
    subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--render", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "results.md").read_text() == table
    # --repeat's range table, from an earlier run's targets kept in the results.
    results["earlier_runs"] = [{"measured_at": "earlier", "targets": results["targets"]}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--render", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=120)
    ranges = (tmp_path / "results.md").read_text().split("## Targets over 2 runs")[1]
    first = results["targets"][0]
    assert "| %s | %s | %s | %s | %s |" % (first["target"], first["value"], first["value"], first["value"], first["limit"]) in ranges


def test_profile_smoke(tmp_path):
    """bench/profile_proxy.py profiles a real proxy under both loads: its
    cProfile tables cover the parts of the proxy, and perf's (where this
    kernel lets perf sample) the processes of the machine."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_proxy.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "profile.md").read_text()
    for load in ("## 16 clients", "## 1 client, sequential"):
        section = text.split(load)[1].split("\n## ")[0]
        assert "| core (sans-IO: router, codecs, messages) |" in section and "| trio |" in section
        assert "`router.py:" in section  # the router's functions are among the costly ones
        assert "| proxy |" in section or "perf: not available here" in text
