"""Limits that keep one client, or many, from taking the proxy down:
what one client may be owed (client_backlog), and the bytes buffered for
all clients together ([limits] max_buffered_bytes), measured as the real
resident memory of a real proxy process under a flood of 1,000 clients.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import trio

from proxyutil import Client, Watch, metric, rss, run_proxy, wait_ready
from qgaproxy import sim

STEP = 10.0


# -- one client that never reads ------------------------------------------------------------


async def test_client_that_never_reads_is_paused_others_served(tmp_path):
    """A client pipelines 1,000 requests and reads nothing. Each reply is
    big (it echoes an 8 KiB id), so its socket fills and its replies pile
    up in the proxy: after client_backlog owed replies the proxy stops
    reading it, while another client is served as usual. Real time, real
    sockets, the simulated agent."""
    total, pad = 1000, 8000
    agent = sim.SimAgent()
    async with run_proxy("sim", sim_agent=agent, client_backlog=64) as proxy:
        with trio.fail_after(STEP):
            await wait_ready(proxy)
        watch = Watch(proxy)
        path = proxy.config.listen[0]
        router = proxy.router
        stuck = await Client.connect(path)
        ids = ["s%04d-%s" % (k, "x" * pad) for k in range(total)]
        requests = [b'{"execute": "guest-ping", "id": "%s"}' % i.encode() for i in ids]
        sent = trio.Event()

        async def send_all():
            for request in requests:
                await stuck.send(request)  # blocks once the proxy stops reading
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            await watch.until(lambda: router.clients and router.clients[0].requests > 0, STEP, "stuck client read")
            client = router.clients[0]
            await watch.until(lambda: not router.can_read(client), STEP, "the stuck client paused",
                              lambda: "backlog %d, requests read %d" % (client.backlog(), client.requests))
            paused_at = client.requests
            assert client.backlog() >= proxy.config.client_backlog
            # what one read can add beyond the backlog: one READ_SIZE of requests
            assert client.backlog() <= proxy.config.client_backlog + (256 << 10) // len(requests[0]) + 1
            assert paused_at < total and not sent.is_set()

            # Another client is served meanwhile.
            async with await Client.connect(path) as other:
                for k in range(50):
                    with trio.fail_after(STEP):
                        assert await other.call("guest-get-host-name", id=k) == {
                            "return": {"host-name": "qgasim"}, "id": k}
            # ... and the stuck one stayed paused all that time.
            assert client.requests == paused_at and not router.can_read(client)
            assert not sent.is_set()

            # Once it reads, it gets every reply, in order, and the rest is read.
            with trio.fail_after(60):
                for k in range(total):
                    reply = json.loads(await stuck.read_line())
                    assert reply == {"return": {}, "id": ids[k]}, k
                await sent.wait()
        assert client.requests == total
        await stuck.aclose()


# -- the memory bound, as resident memory of a real process ----------------------------------

LIMIT = 256 << 20  # [limits] max_buffered_bytes
CLIENTS = 1000
MESSAGE = 60 << 20  # what each flood client tries to send: one 60 MiB request
CHUNK = 256 << 10  # per connection per round
# What the process may hold beyond the limit: the interpreter and its
# modules (idle RSS, measured below: ~35 MiB), 1,000 idle connections
# (~11 KiB each in the proxy, measured below: ~11 MiB), and one message
# of the largest size (64 MiB) being turned into a request: its parsed
# value and its serialized copy exist side by side for a moment
# (2 x 64 MiB). Nothing of it grows with the number of clients or with
# the data they send.
OVERHEAD = 200 << 20
REFUSAL = (b'{"error": {"class": "GenericError", "desc": "qgaproxy: too much data buffered for all clients '
           b'(limit %d bytes); closing"}}\n' % LIMIT)

# One process drives every flood connection: non-blocking sockets, epoll,
# at most one CHUNK per connection per round. It connects them all, says
# "connected", waits for "go", floods, and prints one JSON line of results.
FLOOD_DRIVER = r"""
import json, select, socket, sys, time
path, n, size, chunk, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
head, tail = b'{"execute": "guest-ping", "arguments": {"pad": "', b'"}}'
view = memoryview(head + b"A" * (size - len(head) - len(tail)) + tail)
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(False)
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
start = time.monotonic()
ep = select.epoll()
conns = {}
for s in socks:
    conns[s.fileno()] = {"sock": s, "sent": 0, "got": bytearray(), "sending": True, "closed": False, "error": None}
    ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT)
left, rounds = n, 0
while left and time.monotonic() - start < deadline:
    rounds += 1
    for fd, ev in ep.poll(1.0):
        c = conns[fd]
        if c["closed"]:
            continue
        s = c["sock"]
        if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = s.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as e:
                data, c["error"] = b"", e.__class__.__name__
            if data == b"" or (data and not c["sending"] and b"\n" in c["got"] + data):
                if data:
                    c["got"] += data
                c["closed"] = True
                left -= 1
                ep.unregister(fd)
                s.close()
                continue
            if data:
                c["got"] += data
        if c["sending"] and ev & select.EPOLLOUT:
            try:
                c["sent"] += s.send(view[c["sent"]:c["sent"] + chunk])
            except BlockingIOError:
                pass
            except OSError as e:
                c["sending"], c["error"] = False, e.__class__.__name__
                ep.modify(fd, select.EPOLLIN)
                continue
            if c["sent"] >= len(view):
                c["sending"] = False
                ep.modify(fd, select.EPOLLIN)
print(json.dumps({"elapsed": time.monotonic() - start, "rounds": rounds, "conns": [
    {"sent": c["sent"], "got": c["got"].decode("latin-1"), "closed": c["closed"], "error": c["error"]}
    for c in conns.values()]}), flush=True)
"""


def _raise_nofile() -> None:
    """In the proxy process: room for 1,000 clients and then some."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class Lines:
    """Lines from a pipe, read by a task; waiters wake on each line."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self._buf = b""
        self._changed = trio.Event()

    async def pump(self) -> None:
        while True:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                break
            self._buf += chunk
            *complete, self._buf = self._buf.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def until(self, predicate, timeout: float, what: str):
        try:
            with trio.fail_after(timeout):
                while True:
                    found = predicate(self.lines)
                    if found:
                        return found
                    await self._changed.wait()
        except trio.TooSlowError:
            raise AssertionError("%s: not seen within %gs; last lines: %s" % (what, timeout, self.lines[-5:])) from None


async def http_get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
        data = b""
        while chunk := await stream.receive_some(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


async def test_memory_bound_of_a_real_proxy_process(real_agent, tmp_path):
    sockdir = tempfile.mkdtemp(prefix="qgaproxy-flood-")
    listen = os.path.join(sockdir, "flood.sock")
    config = tmp_path / "flood.toml"
    config.write_text(textwrap.dedent(f"""
        [metrics]
        listen = "127.0.0.1:0"

        [limits]
        max_buffered_bytes = {LIMIT}

        [[agent]]
        name = "flood"
        upstream = "unix:{real_agent.path}"
        request_timeout = 30

          [[agent.listener]]
          path = "{listen}"
          max_clients = {CLIENTS + 100}
        """))
    _raise_nofile()  # this process: the driver inherits it (it holds 1,000 sockets)
    proxy = await trio.lowlevel.open_process(
        [sys.executable, "-m", "qgaproxy", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_raise_nofile,
    )
    log = Lines(proxy.stderr)
    driver = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.pump)
            found = await log.until(lambda ls: [l for l in ls if "metrics on http://127.0.0.1:" in l], 20, "metrics")
            port = int(found[0].rsplit(":", 1)[1].split("/")[0])
            await log.until(lambda ls: any("-> ready" in l for l in ls), 20, "the agent synced")
            with trio.fail_after(STEP):
                async with await Client.connect(listen) as probe:
                    assert await probe.call("guest-ping", id=0) == {"return": {}, "id": 0}
            idle, _ = rss(proxy.pid)

            driver = await trio.lowlevel.open_process(
                [sys.executable, "-c", FLOOD_DRIVER, listen, str(CLIENTS), str(MESSAGE), str(CHUNK), "40"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )
            out = Lines(driver.stdout)
            nursery.start_soon(out.pump)
            await out.until(lambda ls: "connected" in ls, 30, "flood connections")
            await log.until(lambda ls: sum(1 for l in ls if " connected on flood " in l) >= CLIENTS + 1, 30,
                            "the proxy accepted every connection")
            connected, _ = rss(proxy.pid)
            per_connection = (connected - idle) / CLIENTS

            peak = [connected]
            flood_over = trio.Event()
            pings: list[tuple[bool, str]] = []  # (during the flood, outcome)
            latencies: list[float] = []  # for the report only

            async def sample():
                while not flood_over.is_set():
                    peak[0] = max(peak[0], rss(proxy.pid)[0])
                    with trio.move_on_after(0.005):  # the sampling period, not a wait for a state
                        await flood_over.wait()

            async def ping():
                """A well-behaved client: one small request at a time. If the
                proxy hangs up on it, it notes why and connects again."""
                k = 0
                while not flood_over.is_set():
                    async with await Client.connect(listen) as c:
                        while not flood_over.is_set():
                            k += 1
                            began = time.monotonic()
                            try:
                                with trio.fail_after(STEP):
                                    reply = await c.call("guest-ping", id=k)
                                latencies.append(time.monotonic() - began)
                            except (EOFError, trio.BrokenResourceError) as exc:
                                pings.append((False, "closed: %s" % exc))
                                break
                            except trio.TooSlowError:
                                pings.append((False, "no reply within %g s" % STEP))
                                break
                            during = not flood_over.is_set()
                            if reply == {"return": {}, "id": k}:
                                pings.append((during, "ok"))
                            else:
                                pings.append((during, json.dumps(reply)))

            with trio.fail_after(50):
                async with trio.open_nursery() as flood:
                    flood.start_soon(sample)
                    flood.start_soon(ping)
                    await driver.stdin.send_all(b"go\n")
                    lines = await out.until(lambda ls: [l for l in ls if l.startswith("{")], 45, "the flood's results")
                    result = json.loads(lines[0])
                    flood_over.set()
            _, hwm = rss(proxy.pid)
            peak_rss = max(peak[0], hwm)
            body = await http_get(port, "/metrics")
            refusals = metric(body, "qgaproxy_memory_limit_refusals_total", agent="flood")

            conns = result["conns"]
            refused = [c for c in conns if c["got"].encode("latin-1") == REFUSAL and c["closed"]]
            completed = [c for c in conns if c["sent"] == MESSAGE and c not in refused]
            odd = [c for c in conns if c not in refused and c not in completed]
            attempted = sum(c["sent"] for c in conns)
            served = sum(1 for during, outcome in pings if during and outcome == "ok")
            failed_pings = [outcome for during, outcome in pings if outcome != "ok"]
            print(
                "\nflood: %d clients, %.1f s, %.0f MiB sent in all (%.1fx the limit); refused %d, completed %d; "
                "metric refusals %s; pings served during the flood %d (slowest round trip %.2f s), "
                "pings refused or failed %d %s\n"
                "RSS: idle %.1f MiB, per idle connection %.1f KiB, peak %.1f MiB (VmHWM %.1f MiB); "
                "limit %d MiB + overhead %d MiB = %d MiB"
                % (CLIENTS, result["elapsed"], attempted / 2**20, attempted / LIMIT, len(refused), len(completed),
                   refusals, served, max(latencies, default=0.0), len(failed_pings), failed_pings[:2], idle / 2**20, per_connection / 1024,
                   peak_rss / 2**20, hwm / 2**20, LIMIT >> 20, OVERHEAD >> 20, (LIMIT + OVERHEAD) >> 20)
            )
            # Every flood client was refused with the proxy's error and hung
            # up on, or (if the budget let it) got its whole message through.
            assert not odd, [dict(c, got=c["got"][:200]) for c in odd[:5]]
            for c in completed:
                assert '"Parameter \'pad\' is unexpected"' in c["got"], c["got"][:300]
            assert len(refused) > 0
            refused_pings = sum(1 for o in failed_pings if o.startswith('{"error"') and "too much data" in o)
            assert refusals == len(refused) + refused_pings
            assert attempted > LIMIT  # more was pushed at the proxy than it may hold
            assert proxy.returncode is None
            with trio.fail_after(STEP):
                async with await Client.connect(listen) as after:
                    assert await after.call("guest-ping", id="after") == {"return": {}, "id": "after"}
            # The justification of OVERHEAD holds: the fixed part is small.
            assert idle < 100 << 20 and per_connection < 64 << 10
            problems = []
            # The well-behaved client was served throughout, never refused.
            if failed_pings or served < 1:
                problems.append("the small well-behaved client was not served: %d pings served during the flood, "
                                "%d refused or failed, e.g. %s" % (served, len(failed_pings), failed_pings[:1]))
            # The bound itself.
            if peak_rss > LIMIT + OVERHEAD:
                problems.append("peak RSS %.1f MiB exceeds the limit (%d MiB) + overhead (%d MiB)"
                                % (peak_rss / 2**20, LIMIT >> 20, OVERHEAD >> 20))
            assert not problems, "; ".join(problems)
            nursery.cancel_scope.cancel()
    finally:
        for process in (driver, proxy):
            if process is not None and process.returncode is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(STEP) as scope:
                    await process.wait()
                if scope.cancelled_caught:
                    process.kill()
                    await process.wait()
        shutil.rmtree(sockdir, ignore_errors=True)
