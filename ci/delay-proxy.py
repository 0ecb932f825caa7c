#!/usr/bin/env python3
"""A TCP proxy that delays every byte it forwards by a fixed time in each
direction: the round-trip time of a distant object store, on a link whose
bandwidth `tc ... tbf` limits (this kernel has no netem). Used by
ci/store-link.sh; not part of thaw.

    delay-proxy.py LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS

Data read from one side is written to the other ONE_WAY_MS after it was
read, in order; reading goes on meanwhile (bounded by a queue per
direction), so a delay does not cost bandwidth. TCP's own handshakes and
acknowledgements on each leg are not delayed: what a request sees is one
ONE_WAY_MS on the way out and one on the way back. asyncio sets
TCP_NODELAY on both legs' sockets, so a small reply is never held back
waiting for the ACK of the one before (Nagle).
"""

import asyncio
import sys

READ_BYTES = 256 * 1024
# Reads queued per direction before reading stops (the proxy's buffer:
# at least a bandwidth-delay product of the fastest profile).
QUEUE_READS = 256


async def pipe(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(QUEUE_READS)

    async def read():
        try:
            while True:
                data = await reader.read(READ_BYTES)
                await queue.put((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, asyncio.CancelledError):
            await queue.put((loop.time(), b""))

    async def write():
        try:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            return

    reading = asyncio.ensure_future(read())
    await write()
    reading.cancel()


async def serve(client_reader, client_writer, target, delay):
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    await asyncio.gather(
        pipe(client_reader, server_writer, delay),
        pipe(server_reader, client_writer, delay),
        return_exceptions=True,
    )
    for w in (server_writer, client_writer):
        w.close()


def address(text):
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    listen, target = address(sys.argv[1]), address(sys.argv[2])
    delay = float(sys.argv[3]) / 1000.0
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, target, delay), *listen, reuse_address=True
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
