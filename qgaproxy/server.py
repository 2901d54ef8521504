"""The process: many agents, one metrics endpoint, signals, reload.

It owns the set of running agents (one Proxy each, in its own cancel
scope so one can stop without touching another), the metrics server,
SIGTERM/SIGINT (drain, then exit), SIGHUP (reload the file: start agents
that appeared, stop the ones that went, restart the ones whose settings
changed, leave the rest alone; a bad file changes nothing), the optional
directory watch, and telling systemd (sd_notify) what it is doing.

It decides nothing about the protocol; each Proxy does that.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
from typing import Callable

import attrs
import trio

from . import audit
from . import config as configmod
from .config import AgentConfig, Config, ConfigError, ListenerConfig
from .metrics import MetricsRegistry, serve_metrics
from .proxy import Proxy, ProxyConfig
from .router import Budget
from .transport import UpstreamAddress

log = logging.getLogger("qgaproxy")


def _notify(kind: str, text: str = "") -> None:
    try:
        from . import sdnotify
    except ImportError:  # pragma: no cover
        return
    if kind == "ready":
        sdnotify.ready(text)
    elif kind == "reloading":
        sdnotify.reloading()
    elif kind == "stopping":
        sdnotify.stopping()
    elif kind == "status":
        sdnotify.status(text)


@attrs.define(eq=False)
class _Running:
    config: AgentConfig
    proxy: Proxy
    scope: trio.CancelScope
    done: trio.Event


class Server:
    def __init__(
        self,
        config: Config,
        *,
        load: Callable[[], Config] | None = None,
        sim_agents: dict | None = None,
    ):
        """load: how to read the configuration again on SIGHUP (None: no reload)."""
        self.config = config
        self._load = load
        self.metrics = MetricsRegistry()
        self.budget = Budget(config.max_buffered_bytes)
        self.metrics.health = lambda: {n: r.proxy.upstream.state.value for n, r in self.agents.items()}
        self.metrics.status = lambda: {n: r.proxy.status() for n, r in self.agents.items()}
        # One audit trail for every agent of the process (records name the agent).
        self.audit_log = audit.open_log(config.audit)
        self.agents: dict[str, _Running] = {}
        self._nursery: trio.Nursery | None = None
        self._metrics_scope: trio.CancelScope | None = None
        self.metrics_listeners: list = []
        self._sim_agents = sim_agents or {}
        self._watched: dict[str, AgentConfig] = {}  # agents from the directory watch
        self.reloads = 0
        self.changed = trio.Event()  # set after every reload, for tests

    # -- running ------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._start_metrics(self.config.metrics)
                for agent in self.config.agents:
                    await self._start_agent(agent)
                if self.config.directory is not None:
                    nursery.start_soon(self._watch_directory)
                self._announce_ready()
                task_status.started(self)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await self.reload()
                        continue
                    log.info("%s: stopping", signal.Signals(signum).name)
                    break
                _notify("stopping")
                await self.stop_all()
                if self.audit_log is not None:
                    self.audit_log.close()
                nursery.cancel_scope.cancel()

    def _announce_ready(self) -> None:
        self.metrics.serving = True
        names = ", ".join(sorted(self.agents)) or "none yet"
        log.info("qgaproxy ready: %d agent(s): %s", len(self.agents), names)
        _notify("ready", "serving %d agent(s)" % len(self.agents))

    async def _start_metrics(self, where: tuple[str, int] | None) -> None:
        if where is None:
            return
        scope = trio.CancelScope()

        async def serve(task_status=trio.TASK_STATUS_IGNORED):
            with scope:
                await serve_metrics(self.metrics, where[0], where[1], task_status=task_status)

        self.metrics_listeners = await self._nursery.start(serve)
        self._metrics_scope = scope

    async def _start_agent(self, agent: AgentConfig) -> None:
        proxy = Proxy(
            ProxyConfig.from_agent(agent),
            sim_agent=self._sim_agents.get(agent.name),
            metrics_registry=self.metrics,
            budget=self.budget,
            audit_log=self.audit_log,
        )
        scope = trio.CancelScope()
        done = trio.Event()

        async def run_agent(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with scope:
                    async with trio.open_nursery() as nursery:
                        await proxy.start_serving(nursery)
                        task_status.started()
            finally:
                proxy.remove_socket_files()
                done.set()

        await self._nursery.start(run_agent)
        self.agents[agent.name] = _Running(agent, proxy, scope, done)

    async def stop_agent(self, name: str) -> None:
        running = self.agents.pop(name, None)
        if running is None:
            return
        await running.proxy.shutdown()
        running.scope.cancel()
        await running.done.wait()
        running.proxy.metrics.remove()
        log.info("agent %s stopped", name)

    async def stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for name in list(self.agents):
                nursery.start_soon(self.stop_agent, name)

    # -- reload ---------------------------------------------------------------------
    async def reload(self) -> bool:
        """Re-read the file and apply the difference. False if it was bad."""
        if self._load is None:
            log.warning("SIGHUP: no configuration file to reload")
            return False
        _notify("reloading")
        try:
            new = self._load()
        except ConfigError as exc:
            log.error("reload rejected, the running configuration stays:\n  %s", "\n  ".join(exc.problems))
            _notify("ready", "reload rejected")
            return False
        await self.apply(new)
        _notify("ready", "serving %d agent(s)" % len(self.agents))
        return True

    async def apply(self, new: Config) -> None:
        old = self.config
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper()))
        self.budget.limit = new.max_buffered_bytes
        if new.audit != old.audit:
            self._reopen_audit(new.audit)
        if new.metrics != old.metrics:
            if self._metrics_scope is not None:
                self._metrics_scope.cancel()
                self._metrics_scope = None
                self.metrics_listeners = []
            await self._start_metrics(new.metrics)
        wanted = {agent.name: agent for agent in new.agents}
        wanted.update(self._watched)
        removed = [name for name in self.agents if name not in wanted]
        changed = [name for name, agent in wanted.items() if name in self.agents and self.agents[name].config != agent]
        added = [name for name in wanted if name not in self.agents]
        # Stop first: a changed or moved agent may reuse a socket path.
        async with trio.open_nursery() as nursery:
            for name in removed + changed:
                nursery.start_soon(self.stop_agent, name)
        for name in changed + added:
            try:
                await self._start_agent(wanted[name])
            except OSError as exc:
                log.error("agent %s cannot start: %s", name, exc)
        self.config = new
        self.reloads += 1
        log.info(
            "configuration applied: %d added, %d removed, %d restarted, %d unchanged",
            len(added),
            len(removed),
            len(changed),
            len(self.agents) - len(added) - len(changed),
        )
        self.changed.set()
        self.changed = trio.Event()

    def _reopen_audit(self, config) -> None:
        try:
            fresh = audit.open_log(config)
        except OSError as exc:
            log.error("audit trail %s cannot be opened, the old one stays: %s", config.path, exc)
            return
        old, self.audit_log = self.audit_log, fresh
        for running in self.agents.values():
            running.proxy.set_audit(fresh)
        if old is not None:
            old.close()
        log.info("audit trail: %s", "off" if fresh is None else "%s (%s)" % (config.path, config.mode))

    # -- directory mode -----------------------------------------------------------------
    async def _watch_directory(self) -> None:
        """Poll a directory of agent sockets (libvirt keeps them as
        .../channel/target/domain-*/org.qemu.guest_agent.0): proxy each one
        while it exists. Polling, not inotify: no dependency, and a few
        stat() calls every couple of seconds cost nothing."""
        while True:
            directory = self.config.directory
            if directory is None:
                return
            found = scan_directory(directory, self.config.defaults)
            changed = False
            for name, agent in found.items():
                if name not in self._watched:
                    self._watched[name] = agent
                    if name not in self.agents:
                        try:
                            await self._start_agent(agent)
                            log.info("directory: proxying %s for %s", agent.listeners[0].path, name)
                            changed = True
                        except OSError as exc:
                            log.error("directory: agent %s cannot start: %s", name, exc)
                            del self._watched[name]
            for name in list(self._watched):
                if name not in found:
                    del self._watched[name]
                    log.info("directory: %s is gone", name)
                    await self.stop_agent(name)
                    changed = True
            if changed:
                self.changed.set()
                self.changed = trio.Event()
            await trio.sleep(directory.interval)


def scan_directory(
    directory: configmod.DirectoryConfig, defaults: configmod.AgentSettings = configmod.AgentSettings()
) -> dict[str, AgentConfig]:
    """The agents a directory holds now: name -> AgentConfig.

    The name is the first path component the pattern's wildcard matched
    (for libvirt: domain-3-web), made safe for a file name."""
    agents = {}
    for path in sorted(glob.glob(os.path.join(directory.watch, directory.pattern))):
        rel = os.path.relpath(path, directory.watch)
        first = rel.split(os.sep)[0]
        name = "".join(c if c.isalnum() or c in "_.:-" else "_" for c in first)[:64] or "agent"
        if name in agents:
            continue
        listen = directory.listen.format(name=name)
        agents[name] = AgentConfig(
            name=name,
            upstream=UpstreamAddress("unix", path),
            listeners=(ListenerConfig(listen, mode=directory.mode),),
            settings=defaults,
        )
    return agents
