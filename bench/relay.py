"""The zero-logic byte relay: the floor under any user-space proxy.

It copies bytes between each client and its own connection to the agent
with the proxy's I/O library (trio), nothing else: no parsing, no ids,
no sharing. It is not a usable proxy (every client gets a private agent
connection, which a real agent does not allow at once); it only measures
what the I/O layer costs per round trip.

    python bench/relay.py UPSTREAM_SOCKET LISTEN_SOCKET
"""

import sys

import trio


async def pump(source, sink, done):
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()  # either side ending ends both


async def relay(client, upstream_path):
    async with client, await trio.open_unix_socket(upstream_path) as agent:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, agent, nursery.cancel_scope)
            nursery.start_soon(pump, agent, client, nursery.cancel_scope)


async def main(upstream_path, listen_path):
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(listen_path)
    sock.listen(128)
    await trio.serve_listeners(lambda c: relay(c, upstream_path), [trio.SocketListener(sock)])


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
