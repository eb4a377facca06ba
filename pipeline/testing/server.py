"""A real HTTP server on 127.0.0.1 for tests, benchmarks and notebooks.

Routes map a path to a handler; `add_bytes` serves fixed content. A handler
gets the live `BaseHTTPRequestHandler` and may misbehave in any way a real
server can (stall, drip bytes, lie about lengths, reset the connection).
An optional `latency` delays every response, to model a distant server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Handler = Callable[[BaseHTTPRequestHandler], None]


def send_bytes(
    request: BaseHTTPRequestHandler, data: bytes, content_type: str, status: int = 200
) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-request are normal here, not errors to print."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class TestServer:
    """A threaded HTTP/1.1 server with keep-alive, started on a free port."""

    __test__ = False  # not a pytest test class

    def __init__(self, latency: float = 0.0):
        self.routes: dict[str, Handler] = {}
        self.latency = latency
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add_bytes(self, path: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self.routes[path] = lambda request: send_bytes(request, data, content_type)
        return self.url(path)

    def add(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def start(self) -> TestServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with server._lock:
                    server.hits[path] = server.hits.get(path, 0) + 1
                if server.latency:
                    time.sleep(server.latency)
                handler = server.routes.get(path)
                if handler is None:
                    send_bytes(self, b"not found", "text/plain", status=404)
                else:
                    handler(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return RequestHandler
