"""`qgaproxy shell`: an interactive agent client.

Each input line is an agent command with KEY=VALUE arguments (the rule of
`call`), a convenience form (ping, cat PATH, exec PROGRAM ARG...), or a raw
JSON request object. Each agent reply is printed as one JSON line; local
problems (a bad line, a timeout, a lost connection) are printed plainly on
stderr and the shell goes on. `quit`, `exit` or end of input leave.

On a terminal: a prompt, line editing and history (readline, kept in
$XDG_STATE_HOME/qgaproxy/history, bounded) and tab completion of the
command names the agent lists in guest-info plus the convenience forms.
Without a terminal it reads lines silently, for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from . import call, shortcuts
from .redact import SECRET_ARGUMENTS
from .client import AgentClient, AgentError, ClientError, ClientTimeout

PROMPT = "qga> "
HISTORY_LENGTH = 1000
#: Longest input line taken (the agent's own message bound).
MAX_LINE = 64 * 1024 * 1024
LOCAL_WORDS = ("help", "quit", "exit")


def history_path() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "qgaproxy", "history")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "shell",
        help="an interactive agent client with history and completion",
        description="Talk to a qgaproxy socket, or straight to a qemu-ga socket, line by line. "
        "A line is an agent command with KEY=VALUE arguments, a convenience form of `call`, "
        "or a raw JSON request; `quit` or Ctrl-D leaves.",
        epilog=call.ARGUMENT_RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_socket_options(parser)
    parser.set_defaults(run=run, parser=parser)


class Shell:
    def __init__(self, client: AgentClient, stdout=None, stderr=None):
        self.client = client
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.commands: list[str] = []

    def learn_commands(self) -> None:
        """The names to complete: what the agent lists, and the forms."""
        try:
            info = self.client.execute("guest-info")
            self.commands = sorted(c["name"] for c in info.get("supported_commands", []))
        except ClientError as exc:
            self.error("guest-info: %s" % exc)

    def names(self) -> list[str]:
        return sorted(set(self.commands) | set(shortcuts.FORMS) | set(LOCAL_WORDS))

    def error(self, text: str) -> None:
        self.stdout.flush()
        self.stderr.write("error: %s\n" % text)
        self.stderr.flush()

    def print_reply(self, reply: dict) -> None:
        self.stdout.write(shortcuts.format_json(reply, pretty=False) + "\n")
        self.stdout.flush()

    def handle(self, line: str) -> bool:
        """Run one input line; False when the shell should end."""
        line = line.strip()
        if not line or line.startswith("#"):
            return True
        try:
            if line[0] in "{[\"":  # JSON: a request, or a mistaken one
                self._raw(line)
                return True
            words = shlex.split(line)
            name, rest = words[0], words[1:]
            if name in ("quit", "exit") and not rest:
                return False
            if name == "help" and not rest:
                self._help()
            elif name in shortcuts.FORMS:
                self._form(name, rest)
            else:
                self._command(name, rest)
        except (call.UsageError, shortcuts.UsageError) as exc:
            self.error(str(exc))
        except ValueError as exc:  # shlex: an unclosed quote
            self.error("cannot read the line: %s" % exc)
        except ClientTimeout as exc:
            self.error("timeout: %s" % exc)
        except ClientError as exc:
            self.error(str(exc))
        except KeyboardInterrupt:
            self.error("interrupted")
        return True

    def _raw(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise call.UsageError("not JSON: %s" % exc) from None
        if not isinstance(message, dict):
            raise call.UsageError("a request is a JSON object")
        reply = self.client.request(message)
        if "id" in message:
            reply["id"] = message["id"]
        self.print_reply(reply)

    def _command(self, name: str, words: list[str]) -> None:
        arguments = call.parse_pairs(words)
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.print_reply(self.client.request(message))

    def _form(self, name: str, words: list[str]) -> None:
        if name == "exec" and words[:1] == ["--"]:
            words = words[1:]
        out = shortcuts.Output(stdout=self.stdout, stderr=self.stderr)
        try:
            status = shortcuts.FORMS[name](self.client, words, out)
        except AgentError as exc:
            self.error("%s: %s" % (exc.error_class, exc.desc))
            return
        finally:
            if out.mid_line:  # the prompt starts on a line of its own
                self.stdout.write("\n")
            self.stdout.flush()
        if name == "exec":
            self.stdout.write("[exit status %d]\n" % status)
            self.stdout.flush()

    def _help(self) -> None:
        self.stdout.write(
            "  COMMAND [KEY=VALUE ...]   an agent command (Tab completes names)\n"
            "  {\"execute\": ...}          a raw JSON request\n"
        )
        for name, text in shortcuts.SUMMARY.items():
            self.stdout.write("  %-25s %s\n" % (name, text))
        self.stdout.write("  %-25s %s\n" % ("quit", "leave (or Ctrl-D)"))
        self.stdout.write("\n" + call.ARGUMENT_RULE + "\n")
        self.stdout.flush()


def _setup_readline(shell: Shell):
    """Line editing, history and completion; None without readline."""
    try:
        import readline
    except ImportError:
        return None
    path = history_path()
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(path)
    except OSError:
        pass

    def complete(text: str, state: int):
        if readline.get_line_buffer()[: readline.get_begidx()].strip():
            return None  # only the command name is completed
        matches = [n for n in shell.names() if n.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    return readline


def command_name(line: str) -> str | None:
    """The command a line runs, as far as it can be told."""
    line = line.strip()
    if line.startswith("{"):
        try:
            name = json.loads(line).get("execute")
        except (ValueError, AttributeError):
            return None
        return name if isinstance(name, str) else None
    words = line.split(None, 1)
    return words[0] if words else None


def secret(line: str) -> bool:
    """Lines that may hold a password, file data, keys or a process's
    input stay out of the history file, as they stay out of logs."""
    name = command_name(line)
    return name is None and "execute" in line or name in SECRET_ARGUMENTS


def _save_history(readline) -> None:
    path = history_path()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        readline.write_history_file(path)
        os.chmod(path, 0o600)
    except OSError as exc:
        print("qgaproxy: cannot save the history to %s: %s" % (path, exc), file=sys.stderr)


def run(args) -> int:
    call.check_socket_options(args)
    client = AgentClient(args.socket, timeout=args.timeout)
    try:
        client.connect()
    except ClientError as exc:
        print("qgaproxy: %s" % exc, file=sys.stderr)
        return call.EXIT_CONNECTION
    shell = Shell(client)
    shell.learn_commands()
    interactive = sys.stdin.isatty()
    try:
        if interactive:
            return _interactive(shell, args.socket)
        for line in _lines(sys.stdin):
            if not shell.handle(line):
                break
        return call.EXIT_OK
    finally:
        client.close()


def _lines(stream):
    """Input lines, each bounded (a longer one is cut there)."""
    while True:
        line = stream.readline(MAX_LINE)
        if not line:
            return
        yield line


def _interactive(shell: Shell, path: str) -> int:
    readline = _setup_readline(shell)
    print("qgaproxy shell on %s: %d agent commands; Tab completes, `help` lists the forms, "
          "`quit` or Ctrl-D leaves." % (path, len(shell.commands)))
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return call.EXIT_OK
            except KeyboardInterrupt:
                print()
                continue
            if readline is not None and secret(line):
                readline.remove_history_item(readline.get_current_history_length() - 1)
            if not shell.handle(line):
                return call.EXIT_OK
    finally:
        if readline is not None:
            _save_history(readline)
