"""qgaproxy.sdnotify against a datagram socket owned by the test."""

from __future__ import annotations

import os
import socket
import time

import pytest

from qgaproxy import sdnotify


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path, monkeypatch):
    """A bound AF_UNIX datagram socket with $NOTIFY_SOCKET pointing at it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env = path
    else:
        name = "qgaproxy-test-notify-%d-%d" % (os.getpid(), time.monotonic_ns())
        sock.bind("\0" + name)
        env = "@" + name
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", env)
    yield sock
    sock.close()


def received(sock: socket.socket) -> bytes:
    return sock.recv(65536)


def nothing_more(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        sock.recv(65536)
    except (BlockingIOError, TimeoutError, socket.timeout):
        return True
    return False


def test_notify_sends_the_exact_text(receiver):
    assert sdnotify.notify("READY=1\nSTATUS=x") is True
    assert received(receiver) == b"READY=1\nSTATUS=x"
    assert nothing_more(receiver)


def test_ready(receiver):
    assert sdnotify.ready() is True
    assert received(receiver) == b"READY=1"
    assert sdnotify.ready("qgaproxy ready: 2 listeners") is True
    assert received(receiver) == b"READY=1\nSTATUS=qgaproxy ready: 2 listeners"


def test_status_is_one_line_utf8(receiver):
    assert sdnotify.status("agent vm1 is ready ✓") is True
    assert received(receiver) == "STATUS=agent vm1 is ready ✓".encode()
    assert sdnotify.status("two\nlines") is True
    assert received(receiver) == b"STATUS=two lines"


def test_reloading_carries_monotonic_usec(receiver):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    data = received(receiver)
    first, second = data.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert value.isdigit()
    assert before <= int(value) <= after


def test_stopping(receiver):
    assert sdnotify.stopping() is True
    assert received(receiver) == b"STOPPING=1"


def test_watchdog(receiver):
    assert sdnotify.watchdog() is True
    assert received(receiver) == b"WATCHDOG=1"


def test_unset_sends_nothing(receiver, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("x") is False
    assert sdnotify.reloading() is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog() is False
    assert nothing_more(receiver)
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify("READY=1") is False
    assert nothing_more(receiver)


@pytest.mark.parametrize("address", ["/nonexistent/dir/notify.sock", "@qgaproxy-test-no-such-socket", "relative.sock"])
def test_missing_socket_is_false_not_an_exception(monkeypatch, address):
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("x") is False
    assert sdnotify.stopping() is False


def test_a_path_that_is_not_a_socket(tmp_path, monkeypatch):
    path = tmp_path / "plain-file"
    path.write_text("")
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/" + "x" * 200)  # longer than sun_path
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "junk")
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "abc", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
