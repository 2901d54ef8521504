"""Helpers for the tests of the operator's client (`qgaproxy call` and
`qgaproxy shell`): the client, proxies and simulated agents as real
processes on real unix sockets."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from test_cli import AGENT_READY_RE, READY_RE, ProxyProcess

STEP = 10.0
QGAPROXY = [sys.executable, "-m", "qgaproxy"]


def client_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "QGAPROXY_SOCKET"}
    env.update(extra)
    return env


def call(socket_path: str | None, *args: str, env: dict | None = None, timeout: float = STEP,
         stdin=subprocess.DEVNULL, input: bytes | None = None) -> subprocess.CompletedProcess:
    """`qgaproxy call [--socket PATH] ARGS...`, stdout and stderr as bytes."""
    argv = QGAPROXY + ["call"] + (["--socket", socket_path] if socket_path else []) + list(args)
    return subprocess.run(
        argv,
        env=env or client_env(),
        stdin=None if input is not None else stdin,
        input=input,
        capture_output=True,
        timeout=timeout,
    )


def short_tmpdir() -> str:
    """A directory for sockets (pytest's tmp_path can be too long for one)."""
    return tempfile.mkdtemp(prefix="qgaop-")


def wait_connectable(path: str, proc: subprocess.Popen, timeout: float = STEP) -> None:
    """Until a unix socket accepts a connection (the simulated agent only:
    it minds no probe)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError("%s exited with %s" % (proc.args, proc.returncode))
        with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
            try:
                s.connect(path)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError("%s not accepting connections after %gs" % (path, timeout))
        time.sleep(0.02)  # poll interval while waiting for the socket


@contextlib.contextmanager
def sim_agent(*options: str):
    """`python -m qgaproxy.sim` as a raw agent socket: yields its path."""
    tmp = short_tmpdir()
    path = os.path.join(tmp, "sim.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qgaproxy.sim", "--listen", path] + list(options),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_connectable(path, proc)
        yield path
    finally:
        proc.terminate()
        proc.wait(STEP)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.rmdir(tmp)


@contextlib.contextmanager
def _serving(tmp: str, args: list[str], what):
    """`qgaproxy serve ARGS`, once its agent is ready: yields `what`; the
    folder tmp is removed after."""
    process = ProxyProcess(QGAPROXY + ["serve"] + args)
    try:
        process.wait_line(READY_RE)
        process.find_line(AGENT_READY_RE)
        yield what
    finally:
        if process.proc.poll() is None:
            assert process.stop() == 0, process.rest_of_log()
        process.kill()
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def proxy(upstream: str):
    """`qgaproxy serve` in front of `upstream`, once its agent is ready:
    yields the listening socket's path."""
    tmp = short_tmpdir()
    path = os.path.join(tmp, "proxy.sock")
    with _serving(tmp, ["--upstream", upstream, "--listen", path], path) as path:
        yield path


@contextlib.contextmanager
def qmp_proxy(upstream: str):
    """`qgaproxy serve` with a qga and a qmp listener in front of
    `upstream`: yields {"qga": path, "qmp": path} once the agent is ready."""
    tmp = short_tmpdir()
    paths = {kind: os.path.join(tmp, kind + ".sock") for kind in ("qga", "qmp")}
    config = os.path.join(tmp, "proxy.toml")
    with open(config, "w") as f:
        f.write('[[agent]]\nname = "vm"\nupstream = "%s"\n' % upstream)
        for kind, path in paths.items():
            f.write('[[agent.listener]]\npath = "%s"\nprotocol = "%s"\n' % (path, kind))
    with _serving(tmp, ["--config", config], paths) as paths:
        yield paths


def shell_lines(path: str, lines: list[str], *args: str) -> subprocess.CompletedProcess:
    """`qgaproxy shell` with its input from a pipe."""
    return subprocess.run(
        QGAPROXY + ["shell", "--socket", path] + list(args),
        input="".join(line + "\n" for line in lines).encode(),
        capture_output=True,
        env=client_env(),
        timeout=STEP,
    )
