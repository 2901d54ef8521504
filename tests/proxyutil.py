"""Shared helpers for tests that run the proxy in-process (trio)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

import trio

from qgaproxy.proxy import Proxy, ProxyConfig
from qgaproxy.transport import UpstreamAddress


@contextlib.asynccontextmanager
async def run_proxy(upstream: str, listen: list[str] | None = None, *, sim_agent=None, **options):
    """Start a Proxy in a nursery; yield it once every listener accepts.

    upstream: "unix:PATH", "serial:PATH" or "sim". listen defaults to one
    socket in a fresh temporary directory (proxy.config.listen[0])."""
    tmp = None
    if listen is None:
        tmp = tempfile.mkdtemp(prefix="qgaproxy-test-")
        listen = [os.path.join(tmp, "proxy.sock")]
    config = ProxyConfig(upstream=UpstreamAddress.parse(upstream), listen=tuple(listen), **options)
    proxy = Proxy(config, sim_agent=sim_agent)
    async with trio.open_nursery() as nursery:
        await proxy.start_serving(nursery)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()
    proxy.remove_socket_files()
    for path in listen:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if tmp:
        with contextlib.suppress(OSError):
            os.rmdir(tmp)


async def wait_ready(proxy: Proxy) -> None:
    """Wait until the upstream is synced (bounded by the caller's timeout)."""
    from qgaproxy.upstream import State

    await proxy.wait_state(State.READY)


class Client:
    """A raw agent-protocol client over a unix socket (trio)."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, path: str) -> "Client":
        return cls(await trio.open_unix_socket(path))

    async def send(self, data: bytes | dict) -> None:
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        await self.stream.send_all(data)

    async def read_line(self) -> bytes:
        """One reply line including its newline (and any 0xFF before it)."""
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError("connection closed; buffered %r" % self.buf[:200])
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    async def reply(self) -> dict:
        return json.loads((await self.read_line()).lstrip(b"\xff"))

    async def call(self, execute: str, arguments: dict | None = None, **extra) -> dict:
        message = {"execute": execute}
        if arguments is not None:
            message["arguments"] = arguments
        message.update(extra)
        await self.send(message)
        return await self.reply()

    async def at_eof(self) -> bool:
        chunk = await self.stream.receive_some(1 << 16)
        self.buf += chunk
        return not chunk

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


# ---------------------------------------------------------------------------
# Busy clients for fault scenarios (tests/vm/test_vm_proxy.py,
# tests/test_serial.py): each keeps requests pipelined through the proxy and
# checks every reply as it comes: exactly one per request, in order, with the
# request's own id and a body that fits the command it sent.
# ---------------------------------------------------------------------------

import collections  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

NOT_AVAILABLE = "Guest agent is not available: "
_TIMED_OUT = re.compile(r"^Guest agent command '([^']*)' timed out after [0-9.]+ seconds$")


class Progress:
    """A wake-up the busy clients pulse after every reply; tests wait on
    predicates over the clients' records, each wait bounded."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def until(self, predicate, timeout: float, what: str = "condition", describe=None) -> None:
        try:
            with trio.fail_after(timeout):
                while not predicate():
                    await self._event.wait()
        except trio.TooSlowError:
            extra = describe() if describe else ""
            raise AssertionError(f"{what}: not reached within {timeout}s {extra}") from None



class _Pulse:
    """A reusable wake-up between two tasks of one busy client."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Record(collections.namedtuple("Record", "k command sent got kind detail")):
    """One request and its reply. kind: "ok" (the agent answered, including
    the CommandNotFound it gives the made-up commands), "timeout" or
    "unavailable" (detail: the reason after "Guest agent is not available: ").
    sent/got: time.monotonic()."""


# The commands a busy client cycles through; "nope" is a made-up command
# named after the client and the request, so that its error text (the
# agent's own "The command X has not been found") is unique to the sender.
MIX = ("guest-ping", "guest-get-host-name", "guest-ping", "guest-sync", "guest-get-time",
       "guest-ping", "nope", "guest-info", "guest-ping", "guest-get-timezone")

_COLLIDING_IDS = (lambda k: k, lambda k: "r%d" % k, lambda k: {"n": k}, lambda k: [k, "x"], None)


def _same_json(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and type(a) is type(b)


def reply_problem(raw: bytes, expect: dict) -> tuple[dict | None, str | None]:
    """(the reply, None), or (None, why it cannot be the reply `expect`
    waits for): not JSON, not a reply, or not its id."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None, "not JSON"
    if not isinstance(value, dict) or len({"return", "error"} & set(value)) != 1 \
            or set(value) - {"return", "error", "id"}:
        return None, "not a reply"
    if expect["has_id"]:
        if "id" not in value or not _same_json(value["id"], expect["ident"]):
            return None, "wrong id (misrouted, out of order or extra)"
    elif "id" in value:
        return None, "an id in the reply to a request without"
    return value, None


def error_kind(command: str, error: dict) -> tuple[str, str] | None:
    """(kind, detail) of an error a busy client may get: "ok" (the agent's
    CommandNotFound for a made-up command), "unavailable" (detail: the
    reason), "timeout"; None for any other."""
    cls, desc = error.get("class"), error.get("desc", "")
    if command.startswith("guest-nope-") and cls == "CommandNotFound" \
            and desc == "The command %s has not been found" % command:
        return "ok", ""
    if cls == "GenericError" and desc.startswith(NOT_AVAILABLE):
        return "unavailable", desc[len(NOT_AVAILABLE):]
    m = _TIMED_OUT.match(desc) if cls == "GenericError" else None
    if m and m.group(1) == command:
        return "timeout", ""
    return None


_FITS = {
    "guest-ping": lambda r, expect: r == {},
    "guest-get-host-name": lambda r, expect: isinstance(r, dict) and isinstance(r.get("host-name"), str),
    "guest-sync": lambda r, expect: r == expect["sync"] and type(r) is int,
    "guest-get-time": lambda r, expect: type(r) is int and r > 0,
    "guest-info": lambda r, expect: isinstance(r, dict) and "version" in r and "supported_commands" in r,
    "guest-get-timezone": lambda r, expect: isinstance(r, dict) and "offset" in r,
}


def return_fits(command: str, ret, expect: dict) -> bool:
    """Whether a "return" value fits the command that was sent."""
    fits = _FITS.get(command)
    return fits is not None and fits(ret, expect)


async def connect_unix(path) -> trio.SocketStream:
    """A connected unix stream. A non-blocking connect to a unix socket
    whose listen backlog is full fails with EAGAIN, which trio takes for a
    connect in progress and hands back an unconnected socket: check, and
    try again (bounded by the caller's deadline)."""
    while True:
        stream = await trio.open_unix_socket(str(path))
        try:
            stream.socket.getpeername()
            return stream
        except OSError:
            stream.socket.close()
        await trio.sleep(0.01)


class PipelinedClient:
    """One connection keeping up to `depth` requests in flight until stop is
    set (or `total` were sent): a sender task and a reader task that takes
    the replies in order. After stop it drains, then sends a final marker
    whose reply must be the very next line (nothing extra was waiting).

    Subclasses make the requests (_request), judge each reply (_reply,
    which returns its kind), and say what a lost reply (_lost) or a wrong
    line before the final marker (_wrong) means: a failure at once, or a
    count. pace(): awaited before sending after an "unavailable" reply, so
    that a down agent does not turn the clients into a busy loop. gap:
    seconds between sends (a steady rate instead of flat out). call_bound:
    the longest wait for the next reply (a hang guard)."""

    def __init__(self, path, name: str, index: int, progress: Progress, *, depth: int,
                 call_bound: float, pace=None, total: int | None = None, gap: float = 0.0):
        self.path = path
        self.name = name
        self.index = index
        self.progress = progress
        self.depth = depth
        self.call_bound = call_bound
        self.pace = pace or (lambda: trio.sleep(0.02))
        self.total = total
        self.gap = gap
        self.stop = trio.Event()
        self.done = trio.Event()
        self.sent = 0
        self._outstanding: collections.deque = collections.deque()
        self._wake = _Pulse()
        self._sender_done = False
        self._pace_needed = False

    def _request(self, k: int) -> tuple[bytes, dict]:
        raise NotImplementedError

    def _reply(self, raw: bytes, expect: dict) -> str:
        raise NotImplementedError

    def _lost(self, expect: dict, why: str, count: int) -> None:
        raise NotImplementedError

    def _wrong(self, expect: dict, why: str, raw: bytes) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        try:
            with trio.fail_after(self.call_bound):
                client = Client(await connect_unix(self.path))
            async with client:
                slots = trio.Semaphore(self.depth)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._sender, client, slots)
                    if not await self._reader(client, slots):
                        nursery.cancel_scope.cancel()
                        return
                await self._final_marker(client)
        finally:
            self.done.set()
            self.progress.notify()

    async def _final_marker(self, client: Client) -> None:
        ident = "%s/final" % self.name
        await client.send(b'{"execute": "guest-ping", "id": "%s"}\n' % ident.encode())
        expect = {"k": -1, "command": "final marker", "ident": ident}
        raw = None
        with trio.move_on_after(self.call_bound):
            try:
                raw = await client.read_line()
            except EOFError as exc:
                self._lost(expect, "connection closed (%s)" % exc, 1)
                return
        if raw is None:
            self._lost(expect, "no reply within %gs" % self.call_bound, 1)
            return
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        if not isinstance(value, dict) or value.get("id") != ident:
            self._wrong(expect, "an extra or misrouted line before the final marker", raw)

    async def _sender(self, client: Client, slots: trio.Semaphore) -> None:
        try:
            k = 0
            while not self.stop.is_set() and (self.total is None or k < self.total):
                await slots.acquire()
                if self.stop.is_set():
                    break
                if self._pace_needed:
                    self._pace_needed = False
                    await self.pace()
                if self.gap:
                    await trio.sleep(self.gap)
                data, expect = self._request(k)
                expect["sent"] = time.monotonic()
                self._outstanding.append(expect)
                self._wake.set()
                try:
                    await client.send(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the reader reports what is lost
                self.sent = k = k + 1
        finally:
            self._sender_done = True
            self._wake.set()

    async def _reader(self, client: Client, slots: trio.Semaphore) -> bool:
        """False when a reply was lost (the connection is no use after that)."""
        while True:
            if not self._outstanding:
                if self._sender_done:
                    return True
                await self._wake.wait()
                continue
            expect = self._outstanding[0]
            raw = None
            with trio.move_on_after(self.call_bound):
                try:
                    raw = await client.read_line()
                except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._lost(expect, "the proxy closed the connection (%s)" % exc, len(self._outstanding))
                    return False
            if raw is None:
                self._lost(expect, "no reply within %gs" % self.call_bound, len(self._outstanding))
                return False
            self._outstanding.popleft()
            if self._reply(raw, expect) == "unavailable":
                self._pace_needed = True
            slots.release()
            self.progress.notify()


class BusyClient(PipelinedClient):
    """A PipelinedClient whose every check is fatal: any reply that is not
    exactly the next one it expects (id, order, body), and any lost reply,
    raises AssertionError.

    Ids: unique (default): mostly "<name>-<k>", some integers unique to the
    client, some requests without an id. colliding=True: every client uses
    the same id sequence (ints, strings, objects, arrays, none); then only
    the body tells replies apart: each client rotates the command mix
    differently and its guest-sync values and made-up commands are its own."""

    def __init__(self, path, name: str, index: int, progress: Progress, *, depth: int = 8,
                 total: int | None = None, colliding: bool = False, call_bound: float = 10.0,
                 pace=None, mix=MIX, forbidden: re.Pattern | None = None):
        super().__init__(path, name, index, progress, depth=depth, call_bound=call_bound, pace=pace, total=total)
        self.colliding = colliding
        self.mix = mix[index % len(mix):] + mix[: index % len(mix)] if colliding else mix
        self.forbidden = forbidden
        self.records: list[Record] = []

    # -- requests ----------------------------------------------------------
    def _request(self, k: int):
        command = self.mix[k % len(self.mix)]
        message: dict = {}
        expect = {"k": k, "sync": None}
        if command == "nope":
            command = "guest-nope-%s-%d" % (self.name, k)
        message["execute"] = command
        if command == "guest-sync":
            expect["sync"] = 500_000_000 + self.index * 1_000_000 + k
            message["arguments"] = {"id": expect["sync"]}
        if self.colliding:
            make = _COLLIDING_IDS[k % len(_COLLIDING_IDS)]
            ident = make(k) if make else None
            has_id = make is not None
        elif k % 11 == 10:
            ident, has_id = None, False
        elif k % 5 == 4:
            ident, has_id = 900_000_000 + self.index * 1_000_000 + k, True
        else:
            ident, has_id = "%s-%d" % (self.name, k), True
        if has_id:
            message["id"] = ident
        expect.update(command=command, ident=ident, has_id=has_id)
        return (json.dumps(message) + "\n").encode(), expect

    def _where(self, expect: dict) -> str:
        return "client %s request %d (%s, id %r)" % (self.name, expect["k"], expect["command"], expect["ident"])

    def _check(self, raw: bytes, expect: dict) -> tuple[str, str]:
        where = self._where(expect)
        if self.forbidden is not None and self.forbidden.search(raw):
            raise AssertionError("%s: a stale marker reached a proxy client: %r" % (where, raw[:300]))
        value, problem = reply_problem(raw, expect)
        if problem is not None:
            raise AssertionError("%s: %s: %r" % (where, problem, raw[:300]))
        command = expect["command"]
        if "error" in value:
            kind = error_kind(command, value["error"])
            if kind is None:
                raise AssertionError("%s: unexpected error: %r" % (where, raw[:300]))
            return kind
        if not return_fits(command, value["return"], expect):
            raise AssertionError("%s: a reply that does not fit the command: %r" % (where, raw[:300]))
        return "ok", ""

    def _reply(self, raw: bytes, expect: dict) -> str:
        got = time.monotonic()
        kind, detail = self._check(raw, expect)
        self.records.append(Record(expect["k"], expect["command"], expect["sent"], got, kind, detail))
        return kind

    def _lost(self, expect: dict, why: str, count: int) -> None:
        raise AssertionError("%s: %s" % (self._where(expect), why))

    def _wrong(self, expect: dict, why: str, raw: bytes) -> None:
        raise AssertionError("%s: %s: %r" % (self._where(expect), why, raw[:300]))

    # -- queries ---------------------------------------------------------------
    def count(self, kind: str | None = None, *, sent_after: float | None = None,
              detail: str | None = None) -> int:
        return sum(
            1
            for r in self.records
            if (kind is None or r.kind == kind)
            and (sent_after is None or r.sent >= sent_after)
            and (detail is None or r.detail.startswith(detail))
        )


class Crowd:
    """n BusyClients started in `nursery`, sharing one Progress."""

    def __init__(self, nursery: trio.Nursery, path, n: int, *, prefix: str = "c", **options):
        self.progress = Progress()
        self.clients = [BusyClient(path, "%s%d" % (prefix, i), i, self.progress, **options) for i in range(n)]
        for client in self.clients:
            nursery.start_soon(client.run)

    def tally(self) -> collections.Counter:
        """Replies by kind ("unavailable: <why>" spelled out) over all clients."""
        out: collections.Counter = collections.Counter()
        for client in self.clients:
            for r in client.records:
                out[r.kind + (": " + r.detail if r.detail else "")] += 1
        return out

    def count(self, kind: str | None = None, **kw) -> int:
        return sum(c.count(kind, **kw) for c in self.clients)

    def describe(self) -> str:
        return "; per client (ok/timeout/unavailable): " + ", ".join(
            "%s %d/%d/%d" % (c.name, c.count("ok"), c.count("timeout"), c.count("unavailable"))
            for c in self.clients
        ) + "; totals %s" % dict(self.tally())

    async def until(self, predicate, timeout: float, what: str) -> None:
        await self.progress.until(predicate, timeout, what, self.describe)

    async def until_each(self, predicate, timeout: float, what: str) -> None:
        """Wait until predicate(client) holds for every client."""
        await self.until(lambda: all(predicate(c) for c in self.clients), timeout, what)

    async def stop(self, timeout: float = 30.0) -> collections.Counter:
        for client in self.clients:
            client.stop.set()
        await self.until(lambda: all(c.done.is_set() for c in self.clients), timeout, "clients drained")
        return self.tally()


async def proxy_pace(proxy, interval: float = 0.05) -> None:
    """Pacing for busy clients of an in-process proxy: go on at once when
    the agent is (or becomes) ready, else after `interval`."""
    from qgaproxy.upstream import State

    with trio.move_on_after(interval):
        await proxy.wait_state(State.READY)


async def wait_state_change(proxy, *states, timeout: float, what: str = "") -> float:
    """Wait (bounded) until the upstream is in one of `states`; returns the
    time.monotonic() when that was seen."""
    try:
        with trio.fail_after(timeout):
            await proxy.wait_state(*states)
    except trio.TooSlowError:
        raise AssertionError("%s: upstream still %s after %gs, wanted %s"
                             % (what, proxy.upstream.state.value, timeout,
                                "/".join(s.value for s in states))) from None
    return time.monotonic()


class Transitions:
    """Every upstream state change of an in-process proxy, with its time
    (time.monotonic()), recorded through the router's observer so that a
    short-lived state (resyncing for 100 ms) is not missed the way polling
    proxy.upstream.state would miss it."""

    def __init__(self, proxy) -> None:
        self.log: list[tuple[float, object, object, str | None]] = []
        self._progress = Progress()
        observer = proxy.router.observer
        original = observer.state_changed

        def hook(old, new, reason):
            self.log.append((time.monotonic(), old, new, reason))
            original(old, new, reason)
            self._progress.notify()

        observer.state_changed = hook

    def mark(self) -> int:
        return len(self.log)

    async def wait_for(self, since: int, *states, timeout: float, what: str) -> tuple[float, int]:
        """Wait (bounded) for a change into one of `states` recorded at or
        after index `since`; returns (its time, the index after it)."""
        found: list = []

        def seen() -> bool:
            for i in range(since, len(self.log)):
                if self.log[i][2] in states:
                    found.append(i)
                    return True
            return False

        await self._progress.until(seen, timeout, what, self.describe)
        i = found[0]
        return self.log[i][0], i + 1

    def describe(self) -> str:
        return "; transitions: " + ", ".join(
            "%s->%s%s" % (old.value, new.value, " (%s)" % reason if reason else "")
            for _, old, new, reason in self.log[-12:]
        )


class Watch:
    """Wakes waiters after every step of an in-process proxy: each call of
    its _after() (client input, a reply from the agent, a client gone, a
    timer tick), so a test waits on the proxy's state instead of sleeping.
    Also records the results of the proxy's own requests (thaws, closing
    the files a departed client left open) as (command, ok, detail)."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.internal: list[tuple[str, bool, str]] = []
        self._progress = Progress()
        original_after = proxy._after

        def after():
            original_after()
            self._progress.notify()

        proxy._after = after
        observer = proxy.router.observer
        original_internal = observer.internal_result

        def internal_result(command, ok, detail):
            self.internal.append((command, ok, detail))
            original_internal(command, ok, detail)

        observer.internal_result = internal_result

    async def until(self, predicate, timeout: float, what: str, describe=None) -> None:
        """Wait (bounded by `timeout` seconds of trio time) until predicate()."""
        await self._progress.until(predicate, timeout, what, describe)


def metric(proxy_or_text, name: str, **labels) -> float | None:
    """The value of one sample in a proxy's Prometheus exposition (the
    sample whose labels include `labels`), or None when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    if isinstance(proxy_or_text, (bytes, str)):
        text = proxy_or_text.decode() if isinstance(proxy_or_text, bytes) else proxy_or_text
    else:
        text = proxy_or_text.metrics_registry.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


# -- processes and their figures ------------------------------------------------------------


def task_count() -> int:
    """Every task of the current trio run."""
    todo = [trio.lowlevel.current_root_task()]
    n = 0
    while todo:
        task = todo.pop()
        n += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return n


def fd_count(pid: int) -> int:
    """Descriptors a process holds."""
    return len(os.listdir("/proc/%d/fd" % pid))


def rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    values = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def stop_process(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (the proxy drains and exits 0), then SIGKILL after timeout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class ProxyProcess:
    """`python -m qgaproxy serve ARGS` as its own process (its own event loop;
    it inherits this process's RLIMIT_NOFILE). Its log goes to log_path;
    `lines` keeps the first 2,000 lines and every error after them."""

    def __init__(self, args: list[str], log_path: str, *, cwd=None, step: float = 30.0):
        self.step = step
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qgaproxy", "serve", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=cwd, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.log.write(raw)
            line = raw.decode(errors="replace")
            if len(self.lines) < 2000 or "Traceback" in line or "ERROR" in line:
                self.lines.append(line)
            if "qgaproxy ready" in line:
                self._ready.set()

    def wait_ready(self) -> None:
        if not self._ready.wait(self.step):
            self.stop()
            raise AssertionError("proxy did not log 'qgaproxy ready': %s" % self.lines[-20:])

    def stop(self) -> int:
        rc = stop_process(self.proc, self.step)
        self._reader.join(self.step)
        self.log.close()
        return rc
