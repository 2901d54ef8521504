"""The floor under (b): a trio server that answers every client's ping
itself, one task per client, with the proxy's own I/O calls (wait until
readable, read, write on the spot). No agent, no parsing, no ids. No
program that gives each client a trio task can serve more requests per
second on the same machine, so it shows how much of (b) the machine and
the I/O library leave.

    python bench/floor.py LISTEN_SOCKET
"""

import json
import os
import sys

import trio

PONG = b'{"return": {}}\n'


def _answer(line: bytes) -> bytes:
    if b"guest-sync" not in line:
        return PONG
    ident = json.loads(line.lstrip(b"\xff"))["arguments"]["id"]
    return b'\xff{"return": %d}\n' % ident


async def serve(stream):
    fd = stream.socket.fileno()
    buf = b""
    try:
        while True:
            await trio.lowlevel.wait_readable(fd)
            data = os.read(fd, 65536)
            if not data:
                return
            buf += data
            if b"guest-sync" in buf:  # a sync (only at connect): its own answer
                lines = buf.split(b"\n")
                buf = lines.pop()
                out = b"".join(_answer(line) for line in lines)
            else:
                lines = buf.count(b"\n")
                buf = buf[buf.rfind(b"\n") + 1 :]
                out = PONG * lines
            if out:
                sent = os.write(fd, out)  # on the spot, as the proxy writes
                if sent < len(out):
                    await stream.send_all(out[sent:])
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def main(listen_path):
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(listen_path)
    sock.listen(128)
    await trio.serve_listeners(serve, [trio.SocketListener(sock)])


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
