"""A TCP relay that adds latency without capping throughput (netem is absent on this kernel).

Each accepted connection is joined to ``--target``; every chunk read from either side is
queued with the time it is due (arrival + ``--delay-ms``) and written when due, so a
request/reply pair through the relay takes two delays (the RTT) while a bulk transfer flows
at whatever the link behind it allows: the queue pipelines chunks, it never waits for one
to land before reading the next. Each direction's queue is bounded in bytes, so a slow
reader holds the sender back through TCP flow control instead of filling memory.

Standard library only, so it starts in a fraction of a second. It prints ``PORT <n>`` on
stdout once it listens (``--listen HOST:0`` lets the kernel pick), and exits when its
parent process does, so a crashed test leaves no relay behind. Usage::

    python tests/delayrelay.py --listen 10.213.4.1:0 --target 127.0.0.1:8000 --delay-ms 12.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections import deque
from collections.abc import Sequence

CHUNK_BYTES = 256 << 10
#: Per direction: enough for a bandwidth-delay product of 1 Gbit/s x 50 ms.
QUEUE_BYTES = 8 << 20


class _ByteBoundedQueue:
    """FIFO of ``(due, chunk)`` holding at most ``limit`` bytes (one chunk always fits);
    a ``None`` chunk is the end of the stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.items: deque[tuple[float, bytes | None]] = deque()
        self.changed = asyncio.Condition()

    async def put(self, due: float, chunk: bytes | None) -> None:
        size = len(chunk or b"")
        async with self.changed:
            await self.changed.wait_for(lambda: self.size == 0 or self.size + size <= self.limit)
            self.items.append((due, chunk))
            self.size += size
            self.changed.notify_all()

    async def get(self) -> tuple[float, bytes | None]:
        async with self.changed:
            await self.changed.wait_for(lambda: bool(self.items))
            due, chunk = self.items.popleft()
            self.size -= len(chunk or b"")
            self.changed.notify_all()
            return due, chunk


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived."""
    queue = _ByteBoundedQueue(QUEUE_BYTES)

    async def read() -> None:
        while chunk := await reader.read(CHUNK_BYTES):
            await queue.put(time.monotonic() + delay, chunk)
        await queue.put(time.monotonic() + delay, None)

    async def write() -> None:
        while True:
            due, chunk = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if chunk is None:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    reading = asyncio.create_task(read())
    try:
        await write()
    finally:
        reading.cancel()


async def _serve_one(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*target)
    except OSError:
        client_writer.close()
        return
    pumps = [
        asyncio.create_task(_pump(client_reader, server_writer, delay)),
        asyncio.create_task(_pump(server_reader, client_writer, delay)),
    ]
    try:
        # A half-close is passed on; the connection ends when both directions have, or
        # when either side fails (reset), which ends the other too.
        done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:
            task.cancel()
    finally:
        for writer in (client_writer, server_writer):
            with contextlib.suppress(OSError):
                writer.close()


async def _orphaned(parent: int) -> None:
    """Return once the parent process has gone (this process is then re-parented)."""
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()

    def check() -> None:
        if os.getppid() != parent:
            gone.set()
        else:
            loop.call_later(0.5, check)

    check()
    await gone.wait()


async def relay(listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
    parent = os.getppid()
    server = await asyncio.start_server(
        lambda r, w: _serve_one(r, w, target, delay_s), listen[0], listen[1], backlog=128
    )
    port = server.sockets[0].getsockname()[1]
    print(f"PORT {port}", flush=True)
    async with server:
        await _orphaned(parent)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (PORT 0: any)")
    parser.add_argument("--target", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay (RTT / 2)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(relay(args.listen, args.target, args.delay_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
