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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
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
    except OSError as exc:
        print("qgaproxy: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
