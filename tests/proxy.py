"""A TCP proxy on loopback that can blackhole its connections, for Redis network faults."""

from __future__ import annotations

import asyncio
import contextlib

from tests.servers import free_port


class BlackholeProxy:
    """Forwards 127.0.0.1:port to a target; `blackhole()` stops every byte, sending no FIN or RST.

    While blackholed, existing connections stay open but nothing is forwarded either way,
    and new connections are accepted but never forwarded, as with a silently dropped
    route. `restore()` closes the dead connections and forwards new ones again.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.blackholed = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def blackhole(self) -> None:
        self.blackholed = True

    def restore(self) -> None:
        self._close_all()
        self.blackholed = False

    def _close_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            if not transport.is_closing():
                transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self.blackholed:
            return  # held open, never forwarded; closed by restore()
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(upstream_writer)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while True:
                data = await source.read(65536)
                if not data:
                    break
                while self.blackholed:
                    # Drop nothing and deliver nothing: the bytes wait until the link
                    # is restored, which aborts this connection instead.
                    await asyncio.sleep(0.05)
                    if sink.transport.is_closing():
                        return
                sink.write(data)
                await sink.drain()
        if not sink.transport.is_closing():
            sink.transport.abort()
