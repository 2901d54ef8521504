"""The qgaproxy command line."""

from __future__ import annotations

import argparse
import logging
import sys

import trio

from . import __version__
from .metrics import parse_host_port
from .transport import AddressError, UpstreamAddress

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qgaproxy",
        description="A transparent multiplexing proxy for the QEMU guest agent.",
    )
    parser.add_argument("--version", action="version", version="qgaproxy " + __version__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--upstream",
        required=True,
        metavar="ADDR",
        help="the agent channel: unix:PATH (QEMU's chardev socket), serial:PATH (a tty), or sim",
    )
    serve.add_argument(
        "--listen", action="append", required=True, metavar="PATH", help="a unix socket for clients (repeatable)"
    )
    serve.add_argument("--request-timeout", type=float, default=5.0, metavar="SECONDS", help="per-request deadline (default 5)")
    serve.add_argument("--window", type=int, default=None, metavar="N", help="requests in flight to an agent that echoes ids (default 32)")
    serve.add_argument("--sync-timeout", type=float, default=1.0, metavar="SECONDS", help="unanswered sync before requests fail fast (default 1)")
    serve.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics at http://HOST:PORT/metrics")
    serve.add_argument("--socket-mode", default="0660", metavar="MODE", help="mode of the listening sockets (default 0660)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    demo = sub.add_parser("demo", help="run the proxy on the simulated agent and show clients talking to it")
    demo.add_argument("--listen", default=None, metavar="PATH", help="socket path (default: qgaproxy-demo.sock in the temp dir)")
    demo.add_argument("--exit", action="store_true", help="stop after the demonstration instead of serving on")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "demo":
        return _demo(args)
    return 2


def _serve(args) -> int:
    from .proxy import Proxy, ProxyConfig
    from .router import DEFAULT_WINDOW

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format=LOG_FORMAT, stream=sys.stderr)
    try:
        upstream = UpstreamAddress.parse(args.upstream)
        metrics = parse_host_port(args.metrics) if args.metrics else None
        mode = int(args.socket_mode, 8)
    except (AddressError, ValueError) as exc:
        print("qgaproxy: %s" % exc, file=sys.stderr)
        return 2
    if args.request_timeout <= 0 or args.sync_timeout <= 0:
        print("qgaproxy: timeouts must be positive", file=sys.stderr)
        return 2
    config = ProxyConfig(
        upstream=upstream,
        listen=tuple(args.listen),
        request_timeout=args.request_timeout,
        window=args.window or DEFAULT_WINDOW,
        sync_timeout=args.sync_timeout,
        metrics=metrics,
        socket_mode=mode,
    )
    try:
        trio.run(Proxy(config).run)
    except (OSError, BaseExceptionGroup) as error:
        leaves = list(_leaves(error))
        if not all(isinstance(exc, OSError) for exc in leaves):
            raise
        for exc in leaves:
            print("qgaproxy: %s" % exc, file=sys.stderr)
        return 1
    return 0


def _leaves(error: BaseException):
    if isinstance(error, BaseExceptionGroup):
        for exc in error.exceptions:
            yield from _leaves(exc)
    else:
        yield error


def _demo(args) -> int:
    import os
    import tempfile

    from .proxy import Proxy, ProxyConfig
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
