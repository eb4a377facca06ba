"""A lean static HTTP/1.1 server for the benchmark: fixed bytes by path, keep-alive.

The benchmark's server shares the machine's cores with the pipeline it feeds, so
its CPU per request is taken from the pipeline. `pipeline.testing.server.TestServer`
(http.server, a thread per connection) can misbehave in every way the tests need,
and costs about 0.3 ms of CPU per request here; this one answers GET and HEAD from
one asyncio thread with a prepared header and no per-request parsing beyond the
request line, at a fraction of that. An optional latency delays every answer, to
model a distant server.
"""

from __future__ import annotations

import asyncio
import threading

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class _Connection(asyncio.Protocol):
    def __init__(self, server: StaticServer):
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0].decode("latin-1")
            self.answer(self.server.responses.get(path, (NOT_FOUND, b"")), method == b"HEAD")

    def answer(self, response: tuple[bytes, bytes], head_only: bool) -> None:
        header, body = response
        parts = (header,) if head_only else (header, body)
        if self.server.latency:
            asyncio.get_running_loop().call_later(self.server.latency, self.send, parts)
        else:
            self.send(parts)

    def send(self, parts: tuple[bytes, ...]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.connections.discard(self)


class StaticServer:
    """`with StaticServer(latency) as server: server.add_bytes(path, data); server.url(path)`."""

    def __init__(self, latency: float = 0.0):
        self.latency = latency
        self.responses: dict[str, tuple[bytes, bytes]] = {}
        self.connections: set[_Connection] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server = self._loop.run_until_complete(
            self._loop.create_server(lambda: _Connection(self), "127.0.0.1", 0, backlog=1024)
        )
        self.port: int = self._server.sockets[0].getsockname()[1]

    def add_bytes(self, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
        header = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        self.responses[path] = (header, data)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> StaticServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._close)
        self._thread.join(timeout=5)
        self._loop.close()

    def _close(self) -> None:
        """In the loop: stop listening, close every connection, then stop the loop."""
        self._server.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        self._loop.call_soon(self._loop.stop)  # after the connections' close callbacks
