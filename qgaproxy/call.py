"""`qgaproxy call`: one command to an agent socket, from the command line.

Owns the command line of `call`, the KEY=VALUE rule (shared with the
shell) and the exit statuses. The protocol is client.py's; the
convenience forms are shortcuts.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import shortcuts
from .client import AgentClient, AgentError, ClientError, ClientTimeout

EXIT_OK = 0
EXIT_AGENT_ERROR = 1
# 2: a usage error (as for every command: cli.py)
EXIT_CONNECTION = 3
EXIT_INTERRUPTED = 130

SOCKET_ENV = "QGAPROXY_SOCKET"
DEFAULT_TIMEOUT = 5.0

ARGUMENT_RULE = """\
arguments:
  KEY=VALUE    VALUE is taken as JSON when it is a JSON number, true, false,
               null, an array or an object; otherwise it is the string as
               written (path=/etc/hostname, count=4096, arg=["-l","/"]).
  KEY:=JSON    VALUE is JSON, always (name:='"123"' for the string "123").
  --json OBJ   the whole arguments object; KEY=VALUE pairs add members."""

EXIT_STATUSES = """\
exit status:
  0    the command succeeded
  1    the agent (or the proxy for it) answered with an error;
       class and text on stderr
  2    usage: bad options, a bad KEY=VALUE, no socket
  3    connection problem or timeout: the socket cannot be reached, it
       closed, or no reply came within --timeout
  130  interrupted (Ctrl-C)
  141  stdout was closed early (| head): as a program SIGPIPE ends
  exec exits with the guest program's status instead (128+N for signal N);
  0 to 3 still mean the above when the program could not be run or waited
  for, with a message on stderr."""


class UsageError(Exception):
    pass


def _forced_json(key: str, text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise UsageError("%s:=%s: not JSON (%s)" % (key, text, exc)) from None


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def _auto_value(text: str) -> Any:
    """JSON when it is a number, boolean, null, array or object, else the
    text itself (a JSON string literal stays as written, quotes and all)."""
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        return text
    return text if isinstance(value, str) else value


def parse_pairs(words: list[str], base: dict | None = None) -> dict:
    """An arguments object from KEY=VALUE and KEY:=JSON words."""
    arguments = dict(base or {})
    for word in words:
        eq = word.find("=")
        if eq <= 0 or (eq == 1 and word[0] == ":"):
            raise UsageError("expected KEY=VALUE or KEY:=JSON, got %r" % word)
        if word[eq - 1] == ":":
            key, value = word[: eq - 1], _forced_json(word[: eq - 1], word[eq + 1 :])
        else:
            key, value = word[:eq], _auto_value(word[eq + 1 :])
        if key in arguments:
            raise UsageError("argument %r given twice" % key)
        arguments[key] = value
    return arguments


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise UsageError("--json: not JSON (%s)" % exc) from None
    if not isinstance(value, dict):
        raise UsageError("--json: the arguments must be a JSON object")
    return value


def add_parser(sub) -> None:
    """Register `call` with the top-level subparsers."""
    forms = "\n".join("  %-16s %s" % (name, text) for name, text in shortcuts.SUMMARY.items())
    parser = sub.add_parser(
        "call",
        help="send one command to an agent or proxy socket",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send one command to a qgaproxy socket, or straight to a qemu-ga socket, and print "
        "the reply's return value (indented JSON on a terminal, one compact line otherwise).",
        epilog="convenience forms (any other COMMAND is sent as an agent command):\n"
        + forms
        + "\n\n"
        + ARGUMENT_RULE
        + "\n\n"
        + EXIT_STATUSES
        + "\n\nexamples:\n"
        "  qgaproxy call --socket /run/qgaproxy/vm.sock guest-get-host-name\n"
        "  qgaproxy call guest-file-open path=/etc/hostname mode=r\n"
        "  qgaproxy call fsinfo\n"
        "  qgaproxy call --timeout 60 exec -- /bin/sh -c 'uptime'\n",
    )
    add_socket_options(parser)
    parser.add_argument(
        "--json",
        nargs="?",
        const=True,
        default=None,
        metavar="OBJECT",
        help="with an agent command: its whole arguments object; "
        "with a convenience form and no value: print the agent's reply as JSON",
    )
    parser.add_argument("agent_command", metavar="COMMAND", help="an agent command name or a convenience form")
    # The words after COMMAND are scanned by split_options(): argparse
    # cannot take positionals on both sides of an option here.
    parser.add_argument(
        "words", nargs=argparse.REMAINDER, metavar="ARG", help="KEY=VALUE pairs, or the form's own arguments"
    )
    parser.set_defaults(run=run, parser=parser)


def split_options(args) -> list[str]:
    """The options among the words after COMMAND (they may come anywhere
    before a `--`; for exec, only before the program), set on `args`; the
    other words are returned. --json takes a value after an agent command
    and none after a convenience form."""
    words, positional = args.words, []
    form = args.agent_command in shortcuts.FORMS
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--" or (args.agent_command == "exec" and positional):
            positional.extend(words[i:] if word == "--" else words[i - 1 :])
            break
        name, eq, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if name in ("-h", "--help"):
            args.parser.print_help()
            args.parser.exit(0)
        if name not in ("--socket", "--timeout", "--json"):
            positional.append(word)
            continue
        if name == "--json" and form:
            if eq:
                raise UsageError("--json takes no value with the convenience form %s" % args.agent_command)
            args.json = True
            continue
        if not eq:
            if i >= len(words):
                raise UsageError("%s needs a value" % name)
            value, i = words[i], i + 1
        if name == "--timeout":
            try:
                args.timeout = float(value)
            except ValueError:
                raise UsageError("--timeout: not a number: %r" % value) from None
        else:
            setattr(args, name[2:], value)
    return positional


def add_socket_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get(SOCKET_ENV) or None,
        help="the proxy's (or an agent's) unix socket (default: $%s)" % SOCKET_ENV,
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="wait this long for each reply; for exec, for the whole run (default %g)" % DEFAULT_TIMEOUT,
    )


def check_socket_options(args) -> None:
    if not args.socket:
        args.parser.error("no socket: give --socket PATH or set %s" % SOCKET_ENV)
    if not args.timeout > 0:
        args.parser.error("--timeout must be positive")


def run(args) -> int:
    try:
        args.words = split_options(args)
    except UsageError as exc:
        args.parser.error(str(exc))
    check_socket_options(args)
    name = args.agent_command
    form = shortcuts.FORMS.get(name)
    try:
        if form is not None:
            if args.json not in (None, True):
                raise UsageError("--json takes no value with the convenience form %s" % name)
        else:
            base = parse_json_object(args.json) if isinstance(args.json, str) else None
            arguments = parse_pairs(args.words, base)
    except UsageError as exc:
        args.parser.error(str(exc))
    out = shortcuts.Output(
        raw=args.json is True,
        pretty=sys.stdout.isatty(),
        # A progress line would garble a file shown on the same terminal.
        progress=sys.stderr.isatty() and not sys.stdout.isatty(),
    )
    client = AgentClient(args.socket, timeout=args.timeout)
    try:
        with client:
            if form is not None:
                return form(client, args.words, out)
            out.json(client.execute(name, arguments))
            return EXIT_OK
    except shortcuts.UsageError as exc:
        args.parser.error(str(exc))
    except AgentError as exc:
        print("qgaproxy: %s: %s" % (exc.error_class, exc.desc), file=sys.stderr)
        return EXIT_AGENT_ERROR
    except ClientTimeout as exc:
        print("qgaproxy: timeout: %s" % exc, file=sys.stderr)
        return EXIT_CONNECTION
    except ClientError as exc:
        print("qgaproxy: %s" % exc, file=sys.stderr)
        return EXIT_CONNECTION
    except KeyboardInterrupt:
        print("qgaproxy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    # BrokenPipeError (stdout closed early) is cli.main's.
    return EXIT_OK
