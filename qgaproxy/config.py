"""The configuration file: TOML, validated whole, every problem reported.

This module owns the schema (every key, its type, its default, why),
the rule that unknown keys are errors, and turning a file plus
command-line overrides into frozen values. It never opens sockets and
never starts anything.

Shape::

    [log]             level, format
    [metrics]         listen
    [defaults]        per-agent settings every agent inherits
    [defaults.command_timeouts]   command = seconds
    [[agent]]         name, upstream, any per-agent setting
      [[agent.listener]]  path, mode, owner, group
      [agent.command_timeouts]
    [directory]       watch a directory of agent sockets (optional)
    [audit]           mode, path, max_bytes, backups (see audit.py)

Problems are reported as ``key.path: what is wrong``, all at once.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import tomllib
from typing import Any, Callable

import attrs

from . import codec
from .audit import MODES as AUDIT_MODES
from .audit import AuditConfig
from .transport import AddressError, UpstreamAddress

# Per-command deadlines that fit the commands: a freeze waits for every
# filesystem to flush (Proxmox allows an hour), fstrim walks whole disks,
# a ping that takes seconds is already a failure.
DEFAULT_COMMAND_TIMEOUTS = {
    "guest-fsfreeze-freeze": 3600.0,
    "guest-fsfreeze-freeze-list": 3600.0,
    "guest-fsfreeze-thaw": 600.0,
    "guest-fstrim": 3600.0,
    "guest-ping": 5.0,
}


class ConfigError(Exception):
    """One or more problems; str() lists them, one per line."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@attrs.frozen
class ListenerConfig:
    path: str
    mode: int = 0o660
    owner: int | None = None  # uid
    group: int | None = None  # gid
    name: str | None = None  # the `listener` label in metrics
    allow: tuple[str, ...] = ("*",)
    deny: tuple[str, ...] = ()
    peer_uids: tuple[int, ...] = ()
    peer_gids: tuple[int, ...] = ()
    max_clients: int = 1024
    protocol: str = "qga"  # "qga" (negotiation optional) or "qmp" (QMP proper)

    def policy(self):
        from .policy import Policy

        return Policy(self.allow, self.deny, self.peer_uids, self.peer_gids, self.max_clients, self.label)

    @property
    def label(self) -> str:
        """A short, bounded name for metrics and logs (never the path)."""
        if self.name:
            return self.name
        base = os.path.basename(self.path)
        return base[:-5] if base.endswith(".sock") else base


@attrs.frozen
class AgentSettings:
    """What every agent can set (and [defaults] sets for all)."""

    request_timeout: float = 5.0
    sync_timeout: float = 1.0
    window: int = 32
    backoff_min: float = 0.1
    backoff_max: float = 5.0
    max_message_size: int = codec.MAX_TOKEN_SIZE
    client_backlog: int = 64
    client_write_timeout: float = 30.0
    shutdown_grace: float = 2.0
    connect_timeout: float = 5.0
    freeze_max: float = 600.0
    guest_metrics_interval: float = 0.0
    busy_poll_us: int = 200
    command_timeouts: tuple = tuple(sorted(DEFAULT_COMMAND_TIMEOUTS.items()))


@attrs.frozen
class AgentConfig:
    name: str
    upstream: UpstreamAddress
    listeners: tuple[ListenerConfig, ...]
    settings: AgentSettings = AgentSettings()
    # unix-listen only: the peers (QEMU's uid) allowed to be the channel.
    upstream_peer_uids: tuple[int, ...] = ()


@attrs.frozen
class DirectoryConfig:
    watch: str
    pattern: str = "*/org.qemu.guest_agent.0"
    listen: str = "/run/qgaproxy/{name}.sock"
    mode: int = 0o660
    interval: float = 2.0


@attrs.frozen
class Config:
    agents: tuple[AgentConfig, ...]
    log_level: str = "info"
    log_format: str = "plain"
    metrics: tuple[str, int] | None = None
    directory: DirectoryConfig | None = None
    defaults: AgentSettings = AgentSettings()
    # Bytes buffered for all clients of all agents together (partial
    # messages, queued requests, unwritten replies); past it, the client
    # that would cross it is refused. 1 GiB: sixteen 64 MiB messages.
    max_buffered_bytes: int = 1 << 30
    audit: AuditConfig | None = None  # None: no audit trail

    def agent(self, name: str) -> AgentConfig | None:
        for agent in self.agents:
            if agent.name == name:
                return agent
        return None


# -- the schema ------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def _positive(value) -> str | None:
    return None if value > 0 else "must be positive"


def _at_least(n):
    return lambda value: None if value >= n else "must be at least %s" % n


# key -> (types, check) for the per-agent settings
_SETTINGS: dict[str, tuple[tuple[type, ...], Callable | None]] = {
    "request_timeout": ((int, float), _positive),
    "sync_timeout": ((int, float), _positive),
    "window": ((int,), _at_least(1)),
    "backoff_min": ((int, float), _positive),
    "backoff_max": ((int, float), _positive),
    "max_message_size": ((int,), _at_least(1024)),
    "client_backlog": ((int,), _at_least(1)),
    "client_write_timeout": ((int, float), _positive),
    "shutdown_grace": ((int, float), _at_least(0)),
    "connect_timeout": ((int, float), _positive),
    "freeze_max": ((int, float), _positive),
    "guest_metrics_interval": ((int, float), _at_least(0)),
    "busy_poll_us": ((int,), _at_least(0)),
}
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a table", list: "an array"}


class _Checker:
    def __init__(self):
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append("%s: %s" % (path, message))

    def table(self, value: Any, path: str, allowed: set[str]) -> dict:
        if not isinstance(value, dict):
            self.problem(path, "must be a table")
            return {}
        for key in value:
            if key not in allowed:
                self.problem(_join(path, key), "unknown key (known: %s)" % ", ".join(sorted(allowed)))
        return value

    def typed(self, table: dict, key: str, path: str, types: tuple, check: Callable | None = None, default=None):
        if key not in table:
            return default
        value = table[key]
        where = _join(path, key)
        if isinstance(value, bool) and bool not in types:
            self.problem(where, "must be %s, not a boolean" % " or ".join(_TYPE_NAMES[t] for t in types))
            return default
        if not isinstance(value, types):
            self.problem(where, "must be %s, got %r" % (" or ".join(_TYPE_NAMES[t] for t in types), value))
            return default
        if check is not None:
            message = check(value)
            if message:
                self.problem(where, message)
                return default
        return value


def _join(path: str, key: str) -> str:
    return "%s.%s" % (path, key) if path else key


def _mode(value: Any) -> int | str:
    """A socket mode: an integer (0o660) or an octal string ("0660")."""
    if isinstance(value, bool):
        return "must be an octal string like \"0660\" or an integer"
    if isinstance(value, str):
        if not re.fullmatch(r"0?[0-7]{3}", value):
            return "must be an octal mode like \"0660\", got %r" % value
        value = int(value, 8)
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        return "must be an octal mode like \"0660\""
    if value & 0o002:
        return "must not be world-writable (%04o): anyone could reach the guest" % value
    return value


def _uid(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            return "no such user %r" % value
    return "must be a user name or uid"


def _gid(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            return "no such group %r" % value
    return "must be a group name or gid"


def _host_port(text: str) -> tuple[str, int] | str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return "must be HOST:PORT, got %r" % text
    return (host.strip("[]") or "127.0.0.1", int(port))


def _settings(checker: _Checker, table: dict, path: str, base: AgentSettings) -> AgentSettings:
    values = {}
    for key, (types, check) in _SETTINGS.items():
        value = checker.typed(table, key, path, types, check)
        if value is not None:
            values[key] = float(value) if float in types else value
    timeouts = dict(base.command_timeouts)
    if "command_timeouts" in table:
        where = _join(path, "command_timeouts")
        raw = table["command_timeouts"]
        if not isinstance(raw, dict):
            checker.problem(where, "must be a table of command = seconds")
        else:
            for command, seconds in raw.items():
                if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
                    checker.problem(_join(where, command), "must be a positive number of seconds")
                else:
                    timeouts[command] = float(seconds)
    values["command_timeouts"] = tuple(sorted(timeouts.items()))
    settings = attrs.evolve(base, **values)
    if ("backoff_min" in table or "backoff_max" in table) and settings.backoff_min > settings.backoff_max:
        checker.problem(_join(path, "backoff_min"), "must not exceed backoff_max (%g)" % settings.backoff_max)
    return settings


_SETTING_KEYS = set(_SETTINGS) | {"command_timeouts"}
_LISTENER_KEYS = {
    "path", "mode", "owner", "group", "name", "allow", "deny", "peer_uids", "peer_gids", "max_clients", "protocol",
}


def _patterns(checker: "_Checker", table: dict, key: str, path: str) -> tuple[str, ...] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        checker.problem(_join(path, key), "must be an array of command name patterns (globs like \"guest-get-*\")")
        return None
    return tuple(value)


def _ids(checker: "_Checker", table: dict, key: str, path: str, convert) -> tuple[int, ...] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list):
        checker.problem(_join(path, key), "must be an array of names or numbers")
        return None
    out = []
    for i, item in enumerate(value):
        result = convert(item)
        if isinstance(result, str):
            checker.problem("%s[%d]" % (_join(path, key), i), result)
        else:
            out.append(result)
    return tuple(out)


def _listener(checker: _Checker, value: Any, path: str) -> ListenerConfig | None:
    table = checker.table(value, path, _LISTENER_KEYS)
    if not table:
        return None
    ok = True
    listen_path = checker.typed(table, "path", path, (str,))
    if not listen_path:
        checker.problem(_join(path, "path"), "is required (the socket file clients connect to)")
        ok = False
    fields: dict[str, Any] = {}
    name = checker.typed(table, "name", path, (str,))
    if name is not None:
        if not _NAME.match(name):
            checker.problem(_join(path, "name"), "must be 1-64 letters, digits, '_', '.', ':' or '-'")
            ok = False
        fields["name"] = name
    for key in ("allow", "deny"):
        patterns = _patterns(checker, table, key, path)
        if patterns is not None:
            fields[key] = patterns
    for key, convert in (("peer_uids", _uid), ("peer_gids", _gid)):
        ids = _ids(checker, table, key, path, convert)
        if ids is not None:
            fields[key] = ids
    protocol = checker.typed(table, "protocol", path, (str,))
    if protocol is not None:
        if protocol not in ("qga", "qmp"):
            checker.problem(_join(path, "protocol"), "must be qga or qmp, got %r" % protocol)
            ok = False
        else:
            fields["protocol"] = protocol
    max_clients = checker.typed(table, "max_clients", path, (int,), _at_least(1))
    if max_clients is not None:
        fields["max_clients"] = max_clients
    for key, convert in (("mode", _mode), ("owner", _uid), ("group", _gid)):
        if key in table:
            result = convert(table[key])
            if isinstance(result, str):
                checker.problem(_join(path, key), result)
                ok = False
            else:
                fields[key] = result
    return ListenerConfig(listen_path, **fields) if ok else None


def _agent(checker: _Checker, value: Any, path: str, defaults: AgentSettings) -> AgentConfig | None:
    table = checker.table(value, path, {"name", "upstream", "listener", "upstream_peer_uids"} | _SETTING_KEYS)
    if not table:
        return None
    ok = True
    name = checker.typed(table, "name", path, (str,))
    if name is None:
        checker.problem(_join(path, "name"), "is required (it labels the agent's metrics and logs)")
        ok = False
    elif not _NAME.match(name):
        checker.problem(_join(path, "name"), "must be 1-64 letters, digits, '_', '.', ':' or '-'")
        ok = False
    upstream_text = checker.typed(table, "upstream", path, (str,))
    upstream = None
    if upstream_text is None:
        checker.problem(_join(path, "upstream"), "is required (unix:PATH, unix-listen:PATH, serial:PATH, tcp:HOST:PORT, vsock:CID:PORT or sim)")
        ok = False
    else:
        try:
            upstream = UpstreamAddress.parse(upstream_text)
        except AddressError as exc:
            checker.problem(_join(path, "upstream"), str(exc))
            ok = False
    listeners = []
    raw_listeners = table.get("listener", [])
    if not isinstance(raw_listeners, list) or not raw_listeners:
        checker.problem(_join(path, "listener"), "needs at least one [[...listener]] with a path")
        ok = False
    else:
        for i, item in enumerate(raw_listeners):
            listener = _listener(checker, item, "%s.listener[%d]" % (path, i))
            if listener is None:
                ok = False
            else:
                listeners.append(listener)
    settings = _settings(checker, table, path, defaults)
    peer_uids = _ids(checker, table, "upstream_peer_uids", path, _uid) or ()
    if peer_uids and upstream is not None and upstream.kind != "unix-listen":
        checker.problem(_join(path, "upstream_peer_uids"), "only applies to a unix-listen upstream")
    if not ok:
        return None
    return AgentConfig(name, upstream, tuple(listeners), settings, peer_uids)


def _directory(checker: _Checker, value: Any, path: str) -> DirectoryConfig | None:
    table = checker.table(value, path, {"watch", "pattern", "listen", "mode", "interval"})
    if not table:
        return None
    watch = checker.typed(table, "watch", path, (str,))
    if not watch:
        checker.problem(_join(path, "watch"), "is required (the directory to watch)")
        return None
    fields: dict[str, Any] = {}
    pattern = checker.typed(table, "pattern", path, (str,))
    if pattern is not None:
        fields["pattern"] = pattern
    listen = checker.typed(table, "listen", path, (str,))
    if listen is not None:
        if "{name}" not in listen:
            checker.problem(_join(path, "listen"), "must contain {name} (each agent needs its own socket)")
        fields["listen"] = listen
    if "mode" in table:
        mode = _mode(table["mode"])
        if isinstance(mode, str):
            checker.problem(_join(path, "mode"), mode)
        else:
            fields["mode"] = mode
    interval = checker.typed(table, "interval", path, (int, float), _positive)
    if interval is not None:
        fields["interval"] = float(interval)
    return DirectoryConfig(watch, **fields)


def _audit(checker: _Checker, value: Any, path: str) -> AuditConfig | None:
    table = checker.table(value, path, {"mode", "path", "max_bytes", "backups"})
    fields: dict[str, Any] = {}
    mode = checker.typed(table, "mode", path, (str,))
    if mode is not None:
        if mode not in AUDIT_MODES:
            checker.problem(_join(path, "mode"), "must be %s, got %r" % (", ".join(AUDIT_MODES), mode))
        else:
            fields["mode"] = mode
    where = checker.typed(table, "path", path, (str,))
    if where is not None:
        if not where:
            checker.problem(_join(path, "path"), "must be a file path or \"stderr\"")
        elif where != "stderr":
            directory = os.path.dirname(os.path.abspath(where))
            if not os.path.isdir(directory):
                checker.problem(_join(path, "path"), "directory %s does not exist" % directory)
            elif os.path.isdir(where):
                checker.problem(_join(path, "path"), "%s is a directory; name the file" % where)
        fields["path"] = where
    elif fields.get("mode", "off") != "off":
        checker.problem(_join(path, "path"), "is required when mode is not off (a file, or \"stderr\")")
    if "path" in fields and "mode" not in table:
        fields["mode"] = "full"  # a path alone means: record, with redacted arguments
    max_bytes = checker.typed(table, "max_bytes", path, (int,), _at_least(0))
    if max_bytes is not None:
        if 0 < max_bytes < 4096:
            checker.problem(_join(path, "max_bytes"), "must be 0 (never rotate) or at least 4096")
        else:
            fields["max_bytes"] = max_bytes
    backups = checker.typed(table, "backups", path, (int,), _at_least(1))
    if backups is not None:
        fields["backups"] = backups
    return AuditConfig(**fields)


def parse(data: dict) -> Config:
    """Validate a decoded TOML document; raise ConfigError with every problem."""
    checker = _Checker()
    top = checker.table(data, "", {"log", "metrics", "defaults", "agent", "directory", "limits", "audit"})
    max_buffered = 1 << 30
    if "limits" in top:
        limits = checker.table(top["limits"], "limits", {"max_buffered_bytes"})
        value = checker.typed(limits, "max_buffered_bytes", "limits", (int,), _at_least(1 << 20))
        if value is not None:
            max_buffered = value
    log_level = "info"
    log_format = "plain"
    if "log" in top:
        log = checker.table(top["log"], "log", {"level", "format"})
        level = checker.typed(log, "level", "log", (str,))
        if level is not None:
            if level not in ("debug", "info", "warning", "error"):
                checker.problem("log.level", "must be debug, info, warning or error, got %r" % level)
            else:
                log_level = level
        fmt = checker.typed(log, "format", "log", (str,))
        if fmt is not None:
            if fmt not in ("plain", "json"):
                checker.problem("log.format", "must be plain or json, got %r" % fmt)
            else:
                log_format = fmt
    metrics = None
    if "metrics" in top:
        table = checker.table(top["metrics"], "metrics", {"listen"})
        listen = checker.typed(table, "listen", "metrics", (str,))
        if listen is not None:
            result = _host_port(listen)
            if isinstance(result, str):
                checker.problem("metrics.listen", result)
            else:
                metrics = result
    defaults = AgentSettings()
    if "defaults" in top:
        table = checker.table(top["defaults"], "defaults", _SETTING_KEYS)
        defaults = _settings(checker, table, "defaults", defaults)
    agents: list[AgentConfig] = []
    raw_agents = top.get("agent", [])
    if not isinstance(raw_agents, list):
        checker.problem("agent", "must be an array of tables: [[agent]]")
        raw_agents = []
    for i, item in enumerate(raw_agents):
        agent = _agent(checker, item, "agent[%d]" % i, defaults)
        if agent is not None:
            agents.append(agent)
    directory = None
    if "directory" in top:
        directory = _directory(checker, top["directory"], "directory")
    if not raw_agents and "directory" not in top:
        checker.problem("agent", "no agents: add an [[agent]] (or a [directory] to watch)")
    _check_unique(checker, agents)
    audit = _audit(checker, top["audit"], "audit") if "audit" in top else None
    if checker.problems:
        raise ConfigError(checker.problems)
    return Config(tuple(agents), log_level, log_format, metrics, directory, defaults, max_buffered, audit)


def _check_unique(checker: _Checker, agents: list[AgentConfig]) -> None:
    names: dict[str, int] = {}
    paths: dict[str, str] = {}
    for i, agent in enumerate(agents):
        if agent.name in names:
            checker.problem("agent[%d].name" % i, "%r is already the name of agent[%d]" % (agent.name, names[agent.name]))
        names.setdefault(agent.name, i)
        for listener in agent.listeners:
            if listener.path in paths:
                checker.problem(
                    "agent[%d]" % i, "listener path %s is already used by agent %s" % (listener.path, paths[listener.path])
                )
            paths.setdefault(listener.path, agent.name)
    for i, agent in enumerate(agents):
        if agent.upstream.path and agent.upstream.path in paths:
            checker.problem("agent[%d].upstream" % i, "%s is also a listener" % agent.upstream)


def load(path: str) -> Config:
    """Read and validate a file (ConfigError on any problem)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(["%s: %s" % (path, exc.strerror or exc)]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(["%s: not valid TOML: %s" % (path, exc)]) from None
    return parse(data)


def from_arguments(upstream: str, listen: list[str], name: str = "default") -> AgentConfig:
    """The one agent the command line describes (without a file)."""
    return AgentConfig(name, UpstreamAddress.parse(upstream), tuple(ListenerConfig(p) for p in listen))
