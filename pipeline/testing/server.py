"""A real HTTP server on 127.0.0.1 for tests, benchmarks and notebooks.

Routes map a path to a handler; `add_bytes` serves fixed content. A handler
gets the live `BaseHTTPRequestHandler` and may misbehave in any way a real
server can; ready-made ones misbehave on demand: `status`, `redirect`, `flaky`,
`drip_headers`, `drip_body`, `short_body`, `endless_body`, `gzip_bomb`, `raw`
and `reset`. An optional `latency` delays every response, to model a distant server.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Handler = Callable[[BaseHTTPRequestHandler], None]


def send_bytes(
    request: BaseHTTPRequestHandler,
    data: bytes,
    content_type: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(data)


# Misbehaving handlers, each what a real server on the internet may do.

DRIP_LIMIT = 30.0  # seconds a dripping or endless handler keeps going, client or not


def status(code: int, headers: dict[str, str] | None = None) -> Handler:
    """Answer `code` with a short text body and extra headers (e.g. Retry-After)."""
    return lambda request: send_bytes(request, f"{code}".encode(), "text/plain", code, headers)


def redirect(location: str, code: int = 302) -> Handler:
    return lambda request: send_bytes(request, b"", "text/plain", code, {"Location": location})


def flaky(failures: int, failure: Handler, then: Handler) -> Handler:
    """Answer the first `failures` requests with `failure`, later ones with `then`."""
    failing = iter(range(failures))
    return lambda request: (then if next(failing, None) is None else failure)(request)


def _drip(request: BaseHTTPRequestHandler, data: bytes, interval: float) -> None:
    """Write `data` one byte per `interval` until done, the client leaves or time is up."""
    stop = time.monotonic() + DRIP_LIMIT
    with contextlib.suppress(OSError):
        for index in range(len(data)):
            if time.monotonic() > stop:
                break
            request.wfile.write(data[index : index + 1])
            request.wfile.flush()
            time.sleep(interval)
    request.close_connection = True


def _head(data_length: int | None, content_type: str = "image/jpeg", **extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}"]
    if data_length is not None:
        lines.append(f"Content-Length: {data_length}")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def drip_headers(data: bytes, interval: float) -> Handler:
    """Send the status line and headers one byte at a time (then the body)."""
    return lambda request: _drip(request, _head(len(data)) + data, interval)


def drip_body(data: bytes, interval: float) -> Handler:
    """Send headers at once, then the body one byte at a time."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.wfile.write(_head(len(data)))
        _drip(request, data, interval)

    return handle


def short_body(data: bytes, missing: int) -> Handler:
    """Declare `missing` more bytes than are sent, then close the connection."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.wfile.write(_head(len(data) + missing) + data)
        request.close_connection = True

    return handle


def endless_body(chunk: bytes = b"\xff" * 65536) -> Handler:
    """A body with no length that never ends (until the client leaves)."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.wfile.write(_head(None))
        stop = time.monotonic() + DRIP_LIMIT
        with contextlib.suppress(OSError):
            while time.monotonic() < stop:
                request.wfile.write(chunk)
        request.close_connection = True

    return handle


def gzip_bomb(decoded_size: int) -> Handler:
    """`decoded_size` zero bytes, gzip-compressed (about 1000:1), as Content-Encoding."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    block = bytes(1 << 20)
    parts = [
        packer.compress(block[: min(len(block), decoded_size - done)])
        for done in range(0, decoded_size, len(block))
    ]
    payload = b"".join(parts) + packer.flush()
    headers = {"Content-Encoding": "gzip"}
    return lambda request: send_bytes(request, payload, "image/jpeg", 200, headers)


def raw(data: bytes) -> Handler:
    """Send `data` as the whole answer (a broken status line, 1000 headers...), then close."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        request.wfile.write(data)
        request.close_connection = True

    return handle


def reset() -> Handler:
    """Abort the connection with a TCP reset instead of an answer."""

    def handle(request: BaseHTTPRequestHandler) -> None:
        linger = struct.pack("ii", 1, 0)  # on, 0 seconds: close() sends RST
        request.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        request.connection.close()
        request.close_connection = True

    return handle


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-request are normal here, not errors to print."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class TestServer:
    """A threaded HTTP/1.1 server with keep-alive, started on a free port."""

    __test__ = False  # not a pytest test class

    def __init__(self, latency: float = 0.0, certificate: tuple[str, str] | None = None):
        """`certificate` (cert file, key file) makes it an https server."""
        self.routes: dict[str, Handler] = {}
        self.latency = latency
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self.scheme = "https" if certificate else "http"
        if certificate:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certificate)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

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
            # Headers and body go out in two writes: with Nagle's algorithm the body's
            # tail waits for the client's delayed ACK (4.5 ms per request instead of 0.5).
            disable_nagle_algorithm = True

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
