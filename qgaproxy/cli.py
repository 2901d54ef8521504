"""The qgaproxy command line.

Only argparse and the standard library at import: the operator's tools
(call, shell, status) start without trio, prometheus-client or the
router; each command imports what it serves with.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgaproxy",
        description="A transparent multiplexing proxy for the QEMU guest agent.",
    )
    parser.add_argument("--version", action="version", version="qgaproxy " + __version__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", metavar="FILE", help="a TOML configuration file (see config/reference.toml)")
    serve.add_argument(
        "--upstream",
        metavar="ADDR",
        help="the agent channel: unix:PATH (QEMU's chardev socket), unix-listen:PATH (QEMU connects to us), "
        "serial:PATH, tcp:HOST:PORT, vsock:CID:PORT, or sim",
    )
    serve.add_argument("--listen", action="append", metavar="PATH", help="a unix socket for clients (repeatable)")
    serve.add_argument("--request-timeout", type=float, metavar="SECONDS", help="per-request deadline (default 5)")
    serve.add_argument("--window", type=int, metavar="N", help="requests in flight to an agent that echoes ids (default 32)")
    serve.add_argument("--sync-timeout", type=float, metavar="SECONDS", help="unanswered sync before requests fail fast (default 1)")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    serve.add_argument("--socket-mode", metavar="MODE", help="mode of the listening sockets (default 0660)")
    serve.add_argument("--guest-metrics", type=float, metavar="SECONDS", help="poll the guest every SECONDS for guest metrics (default: off)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["plain", "json"])
    serve.add_argument("--audit", metavar="PATH|stderr", help="write the audit trail (JSON lines) to PATH or stderr")
    serve.add_argument(
        "--audit-mode",
        choices=["off", "commands", "full"],
        help="what the audit trail records: commands (no arguments) or full (redacted arguments; the default with --audit)",
    )

    check = sub.add_parser("check-config", help="validate a configuration file and report every problem")
    check.add_argument("file")

    _add_status_parser(sub)

    demo = sub.add_parser("demo", help="run the proxy on the simulated agent and show clients talking to it")
    demo.add_argument("--listen", default=None, metavar="PATH", help="socket path (default: qgaproxy-demo.sock in the temp dir)")
    demo.add_argument("--exit", action="store_true", help="stop after the demonstration instead of serving on")

    # The operator's client: each registers itself and sets `run`.
    from . import call, shell

    call.add_parser(sub)
    shell.add_parser(sub)
    return parser


#: stdout was closed before everything was written (`qgaproxy status | head
#: -1`): end quietly with the status of a program that SIGPIPE ends, as
#: cat or grep would.
EXIT_BROKEN_PIPE = 128 + 13


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            # Here, not at interpreter exit, so that a closed pipe is seen.
            sys.stdout.flush()
    except BrokenPipeError:
        # Sockets' errors are the commands' own: only stdout gets here.
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    """So that the interpreter's own flush at exit has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        return args.run(args)
    if args.command == "serve":
        try:
            return _serve(args)
        except _UsageError as exc:
            parser.error(str(exc))
    if args.command == "demo":
        return _demo(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "status":
        return _status(args)
    return 2


def _check_config(args) -> int:
    from . import config as configmod

    try:
        cfg = configmod.load(args.file)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print("%s: %s" % (args.file, problem), file=sys.stderr)
        print("%s: %d problem(s)" % (args.file, len(exc.problems)), file=sys.stderr)
        return 1
    print("%s: OK: %d agent(s)%s" % (args.file, len(cfg.agents), ", directory watch" if cfg.directory else ""))
    for agent in cfg.agents:
        print("  %s: %s -> %s" % (agent.name, agent.upstream, ", ".join(l.path for l in agent.listeners)))
    if cfg.audit is not None and cfg.audit.mode != "off":
        print("  audit trail: %s (%s)" % (cfg.audit.path, cfg.audit.mode))
    return 0


class _UsageError(Exception):
    pass


def build_config(args):
    """The configuration from --config and the flags (flags win)."""
    import attrs

    from . import config as configmod
    from .metrics import parse_host_port
    from .transport import UpstreamAddress

    if args.config:
        cfg = configmod.load(args.config)
    else:
        if not args.upstream or not args.listen:
            raise _UsageError("serve needs --config FILE, or --upstream and --listen")
        cfg = configmod.Config(agents=(configmod.from_arguments(args.upstream, args.listen),))
    agents = list(cfg.agents)
    if args.config and (args.upstream or args.listen):
        if len(agents) != 1:
            raise _UsageError("--upstream/--listen override the agent of a file that has exactly one")
        agent = agents[0]
        if args.upstream:
            agent = attrs.evolve(agent, upstream=UpstreamAddress.parse(args.upstream))
        if args.listen:
            agent = attrs.evolve(agent, listeners=tuple(configmod.ListenerConfig(p) for p in args.listen))
        agents[0] = agent
    overrides = {}
    # flag, setting, the values allowed, what is said of the others
    for flag, setting, allowed, complaint in (
        ("request_timeout", "request_timeout", lambda v: v > 0, "must be positive"),
        ("window", "window", lambda v: v >= 1, "must be at least 1"),
        ("sync_timeout", "sync_timeout", lambda v: v > 0, "must be positive"),
        ("guest_metrics", "guest_metrics_interval", lambda v: v >= 0, "must not be negative"),
    ):
        value = getattr(args, flag)
        if value is None:
            continue
        if not allowed(value):
            raise _UsageError("--%s %s" % (flag.replace("_", "-"), complaint))
        overrides[setting] = value
    if overrides:
        agents = [attrs.evolve(a, settings=attrs.evolve(a.settings, **overrides)) for a in agents]
    if args.socket_mode is not None:
        mode = int(args.socket_mode, 8)
        agents = [
            attrs.evolve(a, listeners=tuple(attrs.evolve(l, mode=mode) for l in a.listeners)) for a in agents
        ]
    changes = {"agents": tuple(agents)}
    if args.metrics:
        changes["metrics"] = parse_host_port(args.metrics)
    if args.log_level:
        changes["log_level"] = args.log_level
    if args.log_format:
        changes["log_format"] = args.log_format
    if args.audit is not None or args.audit_mode is not None:
        changes["audit"] = _audit_override(cfg.audit, args.audit, args.audit_mode)
    return attrs.evolve(cfg, **changes)


def _audit_override(current, path, mode):
    import attrs

    from .audit import AuditConfig

    audit = current or AuditConfig()
    if path is not None:
        audit = attrs.evolve(audit, path=path, mode=mode or (audit.mode if current and current.mode != "off" else "full"))
    elif mode is not None:
        if mode != "off" and current is None:
            raise _UsageError("--audit-mode %s needs --audit PATH|stderr (or [audit] path in the file)" % mode)
        audit = attrs.evolve(audit, mode=mode)
    return audit


def _serve(args) -> int:
    import trio

    from . import config as configmod
    from .server import Server
    from .transport import AddressError

    try:
        cfg = build_config(args)
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            print("qgaproxy: %s: %s" % (args.config, problem), file=sys.stderr)
        return 2
    except _UsageError:
        raise
    except (AddressError, ValueError) as exc:
        print("qgaproxy: %s" % exc, file=sys.stderr)
        return 2
    _setup_logging(cfg.log_level, cfg.log_format)

    def reload():
        # Flags given at start keep overriding the file on every reload.
        return build_config(args)

    server = Server(cfg, load=reload if args.config else None)
    try:
        trio.run(server.run)
    except (OSError, BaseExceptionGroup) as error:
        leaves = list(_leaves(error))
        if not all(isinstance(exc, OSError) for exc in leaves):
            raise
        for exc in leaves:
            print("qgaproxy: %s" % exc, file=sys.stderr)
        return 1
    return 0


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        agent = getattr(record, "agent", None)
        if agent is not None:
            entry["agent"] = agent
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))


def _leaves(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for exc in error.exceptions:
            yield from _leaves(exc)
    else:
        yield error


def _demo(args) -> int:
    import os
    import tempfile

    import trio

    from .proxy import Proxy, ProxyConfig
    from .transport import UpstreamAddress
    from .upstream import State

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    path = args.listen or os.path.join(tempfile.gettempdir(), "qgaproxy-demo.sock")
    config = ProxyConfig(upstream=UpstreamAddress("sim"), listen=(path,))

    async def talk(label: str, request: bytes) -> None:
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(request)
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                reply += chunk
        shown = reply.decode("utf-8", "replace").replace("\xff", "\\xff").rstrip("\n")
        if len(shown) > 160:
            shown = shown[:157] + "..."
        print("  %s -> %s" % (label, request.decode().strip()))
        print("  %s <- %s" % (" " * len(label), shown))

    async def main() -> None:
        proxy = Proxy(config)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy.run)
            with trio.fail_after(10):
                await proxy.ready.wait()
                await proxy.wait_state(State.READY)
            print("qgaproxy %s is serving the simulated agent on %s" % (__version__, path))
            print("Three clients at once, the same ids on purpose; each gets its own reply:")
            async with trio.open_nursery() as clients:
                clients.start_soon(talk, "libvirt-like", b'{"execute":"guest-sync","arguments":{"id":1234}}\n')
                clients.start_soon(talk, "monitoring  ", b'{"execute":"guest-get-host-name","id":1}')
                clients.start_soon(talk, "backup job  ", b'{"execute":"guest-fsfreeze-status","id":1}')
            await talk("someone     ", b'{"execute":"guest-nonsense","id":"x"}')
            if args.exit:
                nursery.cancel_scope.cancel()
                return
            print()
            print("Try it yourself (Ctrl-C stops the proxy):")
            print("  printf '{\"execute\":\"guest-info\"}' | socat -t2 - UNIX-CONNECT:%s" % path)
            print("  qmp-shell -N %s" % path)

    trio.run(main)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- qgaproxy status ---------------------------------------------------------------


def _add_status_parser(sub) -> None:
    status = sub.add_parser(
        "status",
        help="show a running proxy's live status: agent state, clients, requests in flight, freeze",
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="ask on a listener socket (its policy must allow qgaproxy-status)")
    where.add_argument("--metrics", metavar="HOST:PORT", help="ask the metrics server (GET /status: every agent)")
    status.add_argument("--agent", metavar="NAME", help="with --metrics: only this agent")
    status.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after (default 5)")


class _StatusError(Exception):
    pass


def _status(args) -> int:
    import json

    from . import status

    try:
        if args.socket:
            one = _status_from_socket(args.socket, args.timeout)
            statuses = {one.get("agent", "default"): one}
        else:
            statuses = _status_from_http(args.metrics, args.agent, args.timeout)
    except _StatusError as exc:
        print("qgaproxy status: %s" % exc, file=sys.stderr)
        return 1
    if args.json:
        if args.socket:
            print(json.dumps(next(iter(statuses.values())), indent=2, sort_keys=True))
        else:
            print(json.dumps({"agents": statuses}, indent=2, sort_keys=True))
    else:
        sys.stdout.write(status.render(statuses))
    return 0


def _status_from_socket(path: str, timeout: float) -> dict:
    """Send qgaproxy-status on a listener socket; on a qmp listener,
    negotiate first."""
    import json
    import socket
    import time

    from .negotiation import EXPECTING
    from .status import STATUS_COMMAND

    deadline = time.monotonic() + timeout
    request = json.dumps({"execute": STATUS_COMMAND, "id": "qgaproxy-status"}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise _StatusError("%s: %s" % (path, exc.strerror or exc)) from None
        _status_send(sock, path, request)
        buf = b""
        negotiated = False
        while True:
            while b"\n" not in buf:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(1 << 20)
                except socket.timeout:
                    raise _StatusError("%s: no answer within %gs" % (path, timeout)) from None
                except OSError as exc:
                    raise _StatusError("%s: %s" % (path, exc.strerror or exc)) from None
                if not chunk:
                    raise _StatusError("%s: connection closed without an answer" % path)
                buf += chunk
            line, _, buf = buf.partition(b"\n")
            try:
                reply = json.loads(line.lstrip(b"\xff"))
            except ValueError:
                raise _StatusError("%s: not a JSON reply: %r" % (path, line[:200])) from None
            if not isinstance(reply, dict) or "QMP" in reply or "event" in reply:
                continue  # a qmp listener's greeting, or an event
            if reply.get("id") == "qgaproxy-caps":
                continue
            error = reply.get("error")
            if isinstance(error, dict):
                if error.get("desc") == EXPECTING and not negotiated:
                    negotiated = True
                    caps = json.dumps({"execute": "qmp_capabilities", "id": "qgaproxy-caps"}).encode() + b"\n"
                    _status_send(sock, path, caps + request)
                    continue
                raise _StatusError("%s: %s" % (error.get("class", "error"), error.get("desc", "")))
            value = reply.get("return")
            if not isinstance(value, dict):
                raise _StatusError("%s: unexpected reply %r" % (path, reply))
            return value
    finally:
        sock.close()


def _status_send(sock, path: str, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        raise _StatusError("%s: %s" % (path, exc.strerror or exc)) from None


def _status_from_http(where: str, agent: str | None, timeout: float) -> dict:
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    from .metrics import parse_host_port

    try:
        host, port = parse_host_port(where)
    except ValueError as exc:
        raise _StatusError(str(exc)) from None
    if ":" in host:
        host = "[%s]" % host
    url = "http://%s:%d/status" % (host, port)
    if agent:
        url += "?agent=" + urllib.parse.quote(agent)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise _StatusError("%s: HTTP %d %s" % (url, exc.code, exc.read().decode("utf-8", "replace").strip())) from None
    except (OSError, ValueError) as exc:
        raise _StatusError("%s: %s" % (url, exc)) from None
    statuses = body.get("agents") if isinstance(body, dict) else None
    if not isinstance(statuses, dict):
        raise _StatusError("%s: unexpected answer" % url)
    return statuses
