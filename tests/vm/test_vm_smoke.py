"""Smoke tests of the test VM itself (tests/vm): the real qemu-ga inside a
QEMU TCG guest, talked to directly on QEMU's chardev socket (no proxy), the
serial-console control channel, and QMP.

`pytest tests/vm -s` prints boot-to-first-reply, the direct guest-ping round
trip and QEMU's RSS.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from realagent import STRAY_FF, AgentConn
from vm import VM, boot_to_first_reply, build_info, direct_round_trip, percentile

# Generous bounds: they only turn a hang into a failure.
STEP = 20.0
#: How long silence must last to count as "no reply".
SILENCE = 2.0


def sync_request(sid: int) -> bytes:
    return b'\xff{"execute": "guest-sync-delimited", "arguments": {"id": %d}}\n' % sid


def request(conn: AgentConn, obj: dict) -> dict:
    raw = conn.request(json.dumps(obj).encode() + b"\n", timeout=STEP)
    return json.loads(raw)


def test_boot_to_first_reply_and_round_trip(vm_image):
    machine = VM(cache=vm_image)
    try:
        boot = boot_to_first_reply(machine)
        rt = direct_round_trip(machine.agent_sock, 300)
        rss = machine.rss_bytes()
    finally:
        machine.close()
    p50, p99 = percentile(rt, 50), percentile(rt, 99)
    print(f"\nVM: boot to first synced reply {boot:.2f} s; direct guest-ping round trip "
          f"p50 {p50 * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms (n={len(rt)}); "
          f"QEMU RSS {rss / 2**20:.0f} MiB")
    assert boot < 60
    assert p50 < 0.1


def test_sync_ping_info(vm_module):
    info = build_info(vm_module.cache)
    with AgentConn(vm_module.agent_sock, timeout=STEP) as conn:
        before = conn.sync()
        assert before.endswith(STRAY_FF)
        assert request(conn, {"execute": "guest-ping", "id": 7}) == {"return": {}, "id": 7}
        gi = request(conn, {"execute": "guest-info"})["return"]
        conn.close(drain=True)
    assert gi["version"] == info["qemu_ga"]  # the host's binary, copied in
    assert re.fullmatch(r"7\.2\.\d+", gi["version"]), gi["version"]
    enabled = {c["name"]: c["enabled"] for c in gi["supported_commands"]}
    assert enabled["guest-shutdown"] is True
    assert enabled["guest-file-read"] is True
    assert enabled["guest-ping"] is True
    for name in ("guest-exec", "guest-exec-status", "guest-set-time", "guest-file-write",
                 "guest-fsfreeze-freeze", "guest-suspend-ram", "guest-set-user-password"):
        assert enabled[name] is False, name
    for name in info["blocked"].split(","):
        assert enabled[name] is False, name


def test_control_channel(vm_module):
    assert vm_module.control("ping") == "pong"
    assert re.fullmatch(r"agent running pid=\d+ port=open", vm_module.control("status"))
    assert vm_module.control("run echo hello; uname -r").splitlines()[0] == "hello"
    assert vm_module.control("no-such-command", check=False).startswith("unknown command")
    assert vm_module.last_rc == 127


def test_agent_kill_restart_loop(vm_module):
    old = vm_module.wait_agent()
    with AgentConn(vm_module.agent_sock, timeout=STEP) as conn:
        conn.sync()
        pos = vm_module.console_pos()
        assert vm_module.control("agent-kill") == f"killed pid={old} sig=KILL"
        vm_module.wait_console(rf"^QGAVM EVENT agent-exit pid={old} rc=137$", STEP, since=pos)
        new = vm_module.wait_agent(STEP, not_pid=old)
        assert new != old
        # The host connection survives the agent's restart: the same socket
        # talks to the new agent (after a sync).
        conn.sync()
        assert request(conn, {"execute": "guest-ping", "id": "after"}) == {
            "return": {}, "id": "after"}
        conn.close(drain=True)


def test_agent_stop_start(vm_module):
    assert vm_module.control("agent-stop") == "agent stopped"
    try:
        with AgentConn(vm_module.agent_sock, timeout=STEP) as conn:
            conn.send(sync_request(4242))
            # Nobody reads the port: QEMU holds the bytes, nothing comes back.
            with pytest.raises(TimeoutError):
                conn.recv_until_delimited(4242, timeout=SILENCE)
            assert bytes(conn.buf) == b""
            out = vm_module.control("agent-start")
            assert re.fullmatch(r"agent running pid=\d+ port=(open|closed)", out), out
            # What piled up is delivered once the new agent opens the port.
            got = conn.recv_until_delimited(4242, timeout=STEP)
            assert got == STRAY_FF + b'\xff{"return": 4242}\n'
            conn.close(drain=True)
    finally:
        vm_module.control("agent-start")
    vm_module.wait_agent(STEP)


def test_qmp_stop_cont(vm_module):
    assert vm_module.qmp("query-status")["status"] == "running"
    with AgentConn(vm_module.agent_sock, timeout=STEP) as conn:
        conn.sync()
        vm_module.qmp("stop")
        try:
            assert vm_module.qmp("query-status")["status"] == "paused"
            conn.send(sync_request(99))
            with pytest.raises(TimeoutError):
                conn.recv_until_delimited(99, timeout=SILENCE)
        finally:
            vm_module.qmp("cont")
        assert vm_module.qmp("query-status")["status"] == "running"
        assert conn.recv_until_delimited(99, timeout=STEP) == STRAY_FF + b'\xff{"return": 99}\n'
        conn.close(drain=True)
    assert vm_module.control("ping") == "pong"


def test_guest_shutdown_exits_qemu(vm):
    with AgentConn(vm.agent_sock, timeout=STEP) as conn:
        conn.sync()
        conn.send(b'{"execute": "guest-shutdown"}\n')  # success-response: false
        assert vm.wait_exit(STEP * 3) == 0
        vm.wait_console(r"^QGAVM EVENT shutdown mode=poweroff$", 0)
        # QEMU is gone: the agent socket reads EOF and nothing answered.
        with pytest.raises(EOFError):
            conn.recv_lines(1, timeout=STEP)
        assert bytes(conn.buf) == b""
    assert not vm.alive()
    # the fixture's teardown copes with a VM that is already gone


def test_restart_same_agent_socket(vm):
    path = vm.agent_sock
    with AgentConn(path, timeout=STEP) as conn:
        conn.sync()
        vm.kill()
        with pytest.raises((EOFError, ConnectionError)):
            conn.recv_lines(1, timeout=STEP)
    vm.restart()
    assert vm.agent_sock == path
    with AgentConn(path, timeout=STEP) as conn:
        conn.sync()
        assert request(conn, {"execute": "guest-ping"}) == {"return": {}}
        conn.close(drain=True)
    # Two launches on one console log, each boot printed READY.
    assert vm.console_log.count("QGAVM READY") == 2


def test_system_reset_exits_with_no_reboot(vm):
    """-no-reboot turns QMP system_reset into an exit (QEMU 7.2 runstate.c)."""
    vm.qmp("system_reset")
    assert vm.wait_exit(STEP) == 0
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        socket.socket(socket.AF_UNIX).connect(str(vm.agent_sock))


def test_system_reset_reboots_without_no_reboot(vm_image):
    """With VM(no_reboot=False) a reset reboots the guest; the host's agent
    connection survives it and talks to the new agent after a sync."""
    machine = VM(cache=vm_image, no_reboot=False).start()
    try:
        with AgentConn(machine.agent_sock, timeout=STEP) as conn:
            conn.sync()
            pos = machine.console_pos()
            machine.qmp("system_reset")
            machine.wait_console(r"^QGAVM READY", STEP * 3, since=pos)
            machine.wait_agent(STEP)
            assert machine.alive()
            conn.sync()
            assert request(conn, {"execute": "guest-ping"}) == {"return": {}}
            conn.close(drain=True)
    finally:
        machine.close()
