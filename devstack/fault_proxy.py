"""An HTTP proxy in front of the MLflow server that puts an outage on exactly one chosen request (fault tests).

    proxy = FaultProxy("http://127.0.0.1:25000", trips=is_champion_lookup, on_trip=stop_mlflow).start()
    env["MLFLOW_TRACKING_URI"] = proxy.url      # the DAG run's stages talk to MLflow through the proxy
    proxy.tripped.wait(); ...; proxy.release(); proxy.close()

Every request is forwarded unchanged until the first one for which ``trips(method, path)`` is true. Then
``on_trip`` runs once (a test stops the real server there), and until :meth:`release`:

* that request, and any later one ``trips`` matches (the client's own retries), answers 503 at once: the
  server is away for exactly that lookup;
* every other request waits, and goes through after :meth:`release`: what the client does next meets a
  server that is back. So code that swallowed the failed lookup would carry on as if nothing happened, and a
  test sees whether it did.

Stopping a real server, rather than only answering 503, keeps the fault honest: anything else that talks to
MLflow in that window finds it down. The proxy listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_logger = logging.getLogger(__name__)
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
}


class FaultProxy:
    """See the module docstring. ``refused`` lists the requests answered 503 (method and path)."""

    def __init__(
        self, upstream: str, trips: Callable[[str, str], bool], on_trip: Callable[[], None], hold_timeout: float = 900
    ):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.trips, self.on_trip, self.hold_timeout = trips, on_trip, hold_timeout
        self.tripped = threading.Event()
        self.released = threading.Event()
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def release(self) -> None:
        """End the outage: held requests go through, tripping requests are forwarded again."""
        self.released.set()

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def route(self, method: str, path: str) -> str:
        """``forward``, ``refuse`` or ``hold`` for one request; trips (and runs ``on_trip``) on the first match."""
        if self.released.is_set():
            return "forward"
        with self._lock:  # one trip, even when two matching requests arrive together
            if self.trips(method, path):
                if not self.tripped.is_set():
                    _logger.info("fault proxy: tripping on %s %s", method, path)
                    self.on_trip()
                    self.tripped.set()
                self.refused.append(f"{method} {path}")
                return "refuse"
        return "hold" if self.tripped.is_set() else "forward"


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive state to get wrong

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _any(self) -> None:
            body = self._body()
            action = proxy.route(self.command, self.path)
            if action == "refuse":
                self._reply(503, [("Content-Type", "text/plain")], b"MLflow is down (fault injected)\n")
                return
            if action == "hold" and not proxy.released.wait(proxy.hold_timeout):
                self._reply(504, [("Content-Type", "text/plain")], b"fault proxy: held too long\n")
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=600)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                headers["Host"] = f"{proxy.upstream[0]}:{proxy.upstream[1]}"
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                self._reply(resp.status, resp.getheaders(), resp.read())
            except OSError as exc:  # the server is down outside the injected window: a gateway error
                self._reply(502, [("Content-Type", "text/plain")], f"fault proxy: {exc}\n".encode())
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            _logger.debug("fault proxy: " + format, *args)

    return Handler
