"""Chaos: many clients pipelining requests through the proxy while a seeded
schedule of faults hits the agent; every reply is checked against the
request it answers.

Used by tests/test_chaos.py (the simulated agent), tests/vm/test_vm_chaos.py
(a real QEMU VM) and scripts/soak.py (long runs).

The checker. Every request a ChaosClient sends is tied to what it expects
back, so a reply that reached the wrong client, or the wrong request of the
right client, cannot pass:

- ids of every JSON type, unique to the client and the request: strings,
  integers, floats, objects, arrays ("<name>/<k>", ...);
- requests whose id tells nothing (none, null, true, false) carry a body
  that reveals the request: guest-sync with a value unique to it, a made-up
  command named after the client and the request (the agent's
  CommandNotFound text quotes it), or guest-file-read of a file of the
  client's own, whose content is the client's name over and over (a client
  opens it again before a read could reach its end, so every read returns
  bytes; a read of a handle that is gone fails with that handle's number,
  unique to the client, and an open of a file that a new guest does not
  have yet names the client's own path);
- replies come back in the order the connection sent its requests, so the
  k-th reply must be the k-th request's.

Allowed outcomes besides the proper reply: the proxy's "timed out" error
naming the command, and its "Guest agent is not available" errors. Anything
else is a mismatch (counted with its text, never fatal while the run goes
on: the caller asserts there were none). A reply that does not come within
call_bound is "lost" (a mismatch too), and after the run each client sends
a final marker whose reply must be the very next line (nothing extra was
delivered to it).
"""

from __future__ import annotations

import base64
import collections
import json
import random
import re
import time

import trio

from proxyutil import PipelinedClient, Progress, error_kind, reply_problem, return_fits
_HANDLE_GONE = re.compile(r"^handle '(\d+)' has not been found$")

#: Bytes of a client's file read per guest-file-read (a window of the file
#: always holds one whole "|<name>" mark).
READ_COUNT = 24
FILE_SIZE = 64 << 10

#: Commands for requests whose id identifies them; ambiguous ids (none,
#: null, true, false) take only the body-revealing ones.
MIX = ("guest-ping", "guest-sync", "guest-get-host-name", "nope", "guest-info",
       "file-read", "guest-get-time", "guest-ping", "file-read", "guest-sync")
REVEALING = ("guest-sync", "nope", "file-read")

#: One id shape per request, in turn.
ID_KINDS = ("str", "int", "none", "float", "obj", "null", "arr", "bool", "str", "int")


def file_pattern(name: str) -> bytes:
    mark = ("|%s" % name).encode()
    return (mark * (FILE_SIZE // len(mark) + 1))[:FILE_SIZE]


def file_path(name: str) -> str:
    return "/tmp/qgaproxy-chaos-%s" % name


class ChaosClient(PipelinedClient):
    """A PipelinedClient checking every reply (see the module docstring),
    never failing at once. Counters: kinds (per reply: ok, timeout,
    unavailable, file-gone, mismatch, lost), mismatches (texts)."""

    def __init__(self, path, name: str, index: int, progress: Progress, *, depth: int = 4,
                 call_bound: float = 30.0, pace=None, gap: float = 0.0, file_size: int = FILE_SIZE):
        super().__init__(path, name, index, progress, depth=depth, call_bound=call_bound, pace=pace, gap=gap)
        self.pattern = file_pattern(name)
        self.kinds: collections.Counter = collections.Counter()
        self.ok_times: list[float] = []  # time.monotonic() of the last ok replies
        self.mismatches: list[str] = []
        self.handle: int | None = None
        self._opening = False
        # Reads per open: never as far as the end of the file, so that every
        # read returns bytes that show whose file it is.
        self._reads_per_open = file_size // READ_COUNT - 1
        self._reads_left = 0

    # -- requests ---------------------------------------------------------------
    def _ident(self, k: int):
        kind = ID_KINDS[k % len(ID_KINDS)]
        unique = self.index * 10_000_000 + k
        return kind, {
            "str": "%s/%d" % (self.name, k),
            "int": 1_000_000_000 + unique,
            "float": unique + 0.5,
            "obj": {"client": self.name, "k": k, "deep": [{"k": k}]},
            "arr": [self.name, k, None],
            "null": None,
            "bool": k % 2 == 0,
        }.get(kind)

    def _request(self, k: int) -> tuple[bytes, dict]:
        id_kind, ident = self._ident(k)
        revealing_only = id_kind in ("none", "null", "bool")
        mix = REVEALING if revealing_only else MIX
        command = mix[(k // len(ID_KINDS) + k) % len(mix)]
        message: dict = {}
        expect: dict = {"k": k, "sync": None, "handle": None, "open": False}
        if command == "file-read":
            if self.handle is not None and self._reads_left <= 0:
                self.handle = None  # read far enough: open it again
            if self.handle is not None:
                command = "guest-file-read"
                expect["handle"] = self.handle
                message["arguments"] = {"handle": self.handle, "count": READ_COUNT}
                self._reads_left -= 1
            elif not self._opening and not revealing_only:
                self._opening = True
                command = "guest-file-open"
                expect["open"] = True
                message["arguments"] = {"path": file_path(self.name), "mode": "r"}
            else:
                command = "guest-sync"
        if command == "nope":
            command = "guest-nope-%s-%d" % (self.name, k)
        if command == "guest-sync":
            expect["sync"] = 500_000_000 + self.index * 10_000_000 + k
            message["arguments"] = {"id": expect["sync"]}
        message = {"execute": command, **message}
        if id_kind != "none":
            message["id"] = ident
        expect.update(command=command, ident=ident, has_id=id_kind != "none")
        return (json.dumps(message) + "\n").encode(), expect

    def _mismatch(self, expect: dict, why: str, raw: bytes) -> tuple[str, str]:
        text = "client %s request %d (%s, id %r): %s: %r" % (
            self.name, expect["k"], expect["command"], expect["ident"], why, raw[:300])
        self.mismatches.append(text)
        return "mismatch", text

    def _check(self, raw: bytes, expect: dict) -> str:
        value, problem = reply_problem(raw, expect)
        if problem is not None:
            return self._mismatch(expect, problem, raw)[0]
        command = expect["command"]
        if expect["open"]:
            self._opening = False
        if "error" in value:
            error = value["error"]
            cls, desc = error.get("class"), error.get("desc", "")
            kind = error_kind(command, error)
            if kind is not None:
                return kind[0]
            if command == "guest-file-open" and cls == "GenericError" \
                    and desc.startswith("failed to open file '%s' " % file_path(self.name)):
                return "file-gone"  # a new guest (QEMU restarted) without the file yet
            m = _HANDLE_GONE.match(desc) if cls == "GenericError" else None
            if m and command == "guest-file-read" and int(m.group(1)) == expect["handle"]:
                if self.handle == expect["handle"]:
                    self.handle = None  # a new agent, or a new channel: open again
                return "file-gone"
            return self._mismatch(expect, "unexpected error", raw)[0]
        ret = value["return"]
        if command == "guest-file-open":
            if type(ret) is not int:
                return self._mismatch(expect, "not a handle", raw)[0]
            self.handle = ret
            self._reads_left = self._reads_per_open
            return "ok"
        if command == "guest-file-read":
            if not (isinstance(ret, dict) and isinstance(ret.get("buf-b64"), str)):
                return self._mismatch(expect, "not a read result", raw)[0]
            data = base64.b64decode(ret["buf-b64"])
            if ret.get("count") != len(data) or len(data) != READ_COUNT or data not in self.pattern:
                return self._mismatch(expect, "another file's content", raw)[0]
            return "ok"
        if not return_fits(command, ret, expect):
            return self._mismatch(expect, "a reply that does not fit the command", raw)[0]
        return "ok"

    # -- PipelinedClient ------------------------------------------------------------
    def _reply(self, raw: bytes, expect: dict) -> str:
        kind = self._check(raw, expect)
        self.kinds[kind] += 1
        if kind == "ok":
            self.ok_times.append(time.monotonic())
            del self.ok_times[:-4]
        return kind

    def _lost(self, expect: dict, why: str, count: int) -> None:
        self.kinds["lost"] += count
        self._mismatch(expect, why, b"")

    def _wrong(self, expect: dict, why: str, raw: bytes) -> None:
        self.kinds["mismatch"] += 1
        self._mismatch(expect, why, raw)

    def replies(self) -> int:
        return sum(self.kinds.values())


class ChaosCrowd:
    """n ChaosClients in `nursery`, sharing one Progress."""

    def __init__(self, nursery: trio.Nursery, path, n: int, *, prefix: str = "c", **options):
        self.progress = Progress()
        self.clients = [ChaosClient(path, "%s%03d" % (prefix, i), i, self.progress, **options)
                        for i in range(n)]
        self._nursery = nursery
        for client in self.clients:
            nursery.start_soon(client.run)

    def tally(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for client in self.clients:
            out.update(client.kinds)
        return out

    def mismatches(self) -> list[str]:
        return [m for c in self.clients for m in c.mismatches]

    def describe(self) -> str:
        return "; totals %s; first mismatches %s" % (dict(self.tally()), self.mismatches()[:3])

    async def until(self, predicate, timeout: float, what: str) -> None:
        await self.progress.until(predicate, timeout, what, self.describe)

    async def all_served_since(self, since: float, timeout: float, what: str) -> None:
        """Every client got an ok reply after `since` (time.monotonic())."""
        await self.until(lambda: all(c.ok_times and c.ok_times[-1] > since or c.done.is_set()
                                     for c in self.clients), timeout, what)

    async def stop(self, timeout: float) -> collections.Counter:
        for client in self.clients:
            client.stop.set()
        await self.until(lambda: all(c.done.is_set() for c in self.clients), timeout, "clients drained")
        return self.tally()


# ---------------------------------------------------------------------------
# The schedule of faults on the simulated agent.

SIM_FAULTS = ("hang", "late", "drop", "restart-mid-reply", "garbage", "disconnect",
              "disconnect-restart", "pause", "latency", "garbage-on-connect", "drop-every",
              "agent-restart", "older-agent")

GARBAGE = (b"garbage\n", b"\x00\x01\x02 not json\n", b'{"return": {}, "id": 1}\n', b"\xff",
           b'{"return": {}}\n', b'{"error": {"class": "GenericError", "desc": "stray"}}\n',
           b"[1, 2, 3]\n", b'{"return": 1' + b"x" * 3000 + b"\n", b"}}}]]]\n", b'"\xc3\x28"\n')


class SimChaos:
    """Seeded faults on a SimAgent, one after another: each is chosen,
    held for a while, then cleared. counts: faults injected by name."""

    def __init__(self, agent, rng: random.Random, *, request_timeout: float, log=None):
        self.agent = agent
        self.rng = rng
        self.request_timeout = request_timeout
        self.counts: collections.Counter = collections.Counter()
        self.log = log

    def _clear(self) -> None:
        cfg = self.agent.config
        cfg.hang = frozenset()
        cfg.late = {}
        cfg.drop = frozenset()
        cfg.drop_every = 0
        cfg.latency = 0.0
        cfg.on_connect = b""
        if cfg.id_mode != "echo":
            cfg.id_mode = "echo"  # the current agent is back: a new process
            self.agent.restart()
        self.agent.release()
        self.agent.resume()

    async def run(self, duration: float, *, gap=(0.1, 0.6)) -> None:
        """Inject faults for `duration` seconds, then clear everything."""
        rng = self.rng
        cfg = self.agent.config
        end = trio.current_time() + duration
        try:
            while trio.current_time() < end:
                await trio.sleep(rng.uniform(*gap))
                fault = rng.choice(SIM_FAULTS)
                hold = rng.uniform(0.1, 1.5)
                command = rng.choice(("guest-ping", "guest-get-host-name", "guest-info", "guest-sync",
                                      "guest-file-read", "guest-get-time"))
                self.counts[fault] += 1
                if self.log:
                    self.log("fault %s (%s, %.2fs)" % (fault, command, hold))
                if fault == "hang":
                    cfg.hang = frozenset({command})
                elif fault == "late":
                    cfg.late = {command: rng.choice((0.05, 0.3, self.request_timeout * 1.5))}
                elif fault == "drop":
                    cfg.drop = frozenset({command})
                elif fault == "drop-every":
                    cfg.drop_every = rng.randint(3, 50)
                elif fault == "restart-mid-reply":
                    self.agent.cut_next_reply()
                elif fault == "garbage":
                    self.agent.inject(b"".join(rng.sample(GARBAGE, rng.randint(1, 3))))
                elif fault == "disconnect":
                    self.agent.disconnect()
                elif fault == "disconnect-restart":
                    self.agent.disconnect(restart=True)
                elif fault == "pause":
                    hold = rng.uniform(0.5, self.request_timeout * 3)
                    self.agent.stop_reading()
                elif fault == "latency":
                    cfg.latency = rng.choice((0.001, 0.005, 0.02))
                elif fault == "agent-restart":
                    # The agent process dies and starts again in the guest;
                    # QEMU keeps the channel: whatever it was parsing is lost.
                    self.agent.restart()
                elif fault == "older-agent":
                    # Replaced by an agent older than 4.0 (ids ignored or
                    # refused), on the same channel.
                    cfg.id_mode = rng.choice(("ignore", "reject"))
                    self.agent.restart()
                elif fault == "garbage-on-connect":
                    cfg.on_connect = rng.choice(GARBAGE[:2] + (b'{"return": {"count": 5, "buf-b64": "aGVs',))
                    self.agent.disconnect(restart=rng.random() < 0.5)
                await trio.sleep(hold)
                self._clear()
        finally:
            self._clear()


def chaos_seed(env: str = "QGAPROXY_CHAOS_SEED") -> int:
    import os

    value = os.environ.get(env)
    return int(value) if value else random.SystemRandom().randrange(1 << 32)
