"""A fault-injecting HTTP reverse proxy for the object-store tests.

It sits between the library and a local S3 or GCS server on 127.0.0.1 and, per request with
a seeded probability, answers 503 without forwarding, forwards and then answers 500 (the
server applied the request; the client cannot know), resets the connection, or delays.
It counts requests by method, and can be taken down (connections refused) and brought back.
Requests whose path contains one of ``hang``, or for which ``stall(method, path, body)`` is
true, are accepted and never answered (a server that stalls). With ``deny`` (401 or 403) it
answers every request with that status and a GCS-style JSON error, as a server that rejects
the credentials. On request it answers the next conditional S3 creates (``If-None-Match``) with 409
ConditionalRequestConflict or with a bare 412 (no ``Condition`` element), without
forwarding them; and it breaks off the body of the next ``cut_bodies`` GET answers halfway
(a connection dropped mid-transfer). ``drain`` takes it down and waits for every request it
accepted: after it, nothing more reaches the server through it (a killed client's last
requests included).
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import json
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
       "upgrade", "content-length"}


class FaultProxy:
    """Use as a context manager; ``endpoint`` is what clients should talk to."""

    KINDS = ("503", "500-after", "reset", "delay")

    def __init__(self, upstream: str, *, fault_rate: float = 0.0, seed: int = 0,
                 delay_s: float = 0.05, kinds: tuple[str, ...] = KINDS,
                 hang: tuple[str, ...] = (),
                 stall: Callable[[str, str, bytes], bool] | None = None,
                 deny: int | None = None) -> None:
        up = urllib.parse.urlsplit(upstream)
        if up.hostname is None:
            raise ValueError(f"upstream {upstream!r} names no host")
        self.upstream: tuple[str, int | None] = (up.hostname, up.port)
        self.fault_rate = fault_rate
        self.delay_s = delay_s
        self.kinds = kinds
        self.hang = hang
        self.stall = stall
        self.deny = deny
        self.released = threading.Event()  # set when the proxy goes down: hung handlers end
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.requests: list[tuple[str, str]] = []  # (method, path) of each, in order
        self.faults: collections.Counter[str] = collections.Counter()
        self.port = 0
        self.cut_bodies = 0   # GET answers still to break off halfway (then the connection)
        self.conflicts = 0    # conditional creates still to answer 409
        self.bare_412 = 0     # conditional creates still to answer a bare 412
        # Writes whose URL (or body: a GCS upload names its object there) contains this are
        # applied upstream, then answered 500 (the answer lost), once each, while the budget
        # lasts: a client's retry meets its own object.
        self.lose_answer: tuple[str, int] | None = None
        self.connections: set[socket.socket] = set()
        self.active = 0  # requests being handled: read, forwarded or answered
        self.closed = False  # set by down(): a request not yet counted is not forwarded
        self.idle = threading.Condition(self.lock)
        self._server: http.server.ThreadingHTTPServer | None = None
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _fault(self) -> str | None:
        with self.lock:
            if self.rng.random() >= self.fault_rate:
                return None
            kind = self.rng.choice(self.kinds)
            self.faults[kind] += 1
            return kind

    def up(self) -> None:
        """Starts listening (again, on the same port when it was up before)."""
        proxy = self
        with self.lock:
            self.closed = False

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy.lock:
                    proxy.connections.add(self.connection)

            def finish(self) -> None:
                with proxy.lock:
                    proxy.connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        line = self.rfile.readline()
                        if not line.strip():
                            raise ConnectionError("the body ended before its last chunk")
                        size = int(line.split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        piece = self.rfile.read(size)
                        if len(piece) < size:
                            raise ConnectionError("the body ended inside a chunk")
                        out += piece
                        self.rfile.readline()
                size = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(size)
                if len(data) < size:  # the client went away mid-body: forward nothing
                    raise ConnectionError(f"{len(data)} of {size} bytes of the body came")
                return data

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                with proxy.lock:
                    if proxy.closed:  # accepted before the proxy went down: dropped
                        self.close_connection = True
                        return
                    proxy.active += 1
                try:
                    self._forward()
                except ConnectionError:  # a client gone mid-request
                    self.close_connection = True
                finally:
                    with proxy.lock:
                        proxy.active -= 1
                        proxy.idle.notify_all()

            def _forward(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.counts[self.command] += 1
                    proxy.requests.append((self.command, self.path))
                if any(part in self.path for part in proxy.hang) or (
                        proxy.stall is not None and proxy.stall(self.command, self.path, body)):
                    proxy.released.wait()  # a stalled server: no byte ever comes back
                    self.close_connection = True
                    return None
                if proxy.deny is not None:
                    reason = "Anonymous caller does not have storage.objects.list access"
                    error = {"error": {"code": proxy.deny, "message": reason,
                                       "errors": [{"message": reason, "reason": "forbidden"}]}}
                    return self._reply(proxy.deny, [("Content-Type", "application/json")],
                                       json.dumps(error).encode())
                fault = proxy._fault()
                with proxy.lock:
                    lose = proxy.lose_answer
                    if (lose is not None and lose[1] > 0 and self.command in ("PUT", "POST")
                            and (lose[0] in self.path or lose[0].encode() in body)):
                        proxy.lose_answer = (lose[0], lose[1] - 1)
                        fault = "500-after"
                if self.command == "PUT" and "If-None-Match" in self.headers:
                    with proxy.lock:
                        if proxy.conflicts > 0:
                            proxy.conflicts -= 1
                            fault = "409"
                        elif proxy.bare_412 > 0:
                            proxy.bare_412 -= 1
                            fault = "412"
                if fault in ("409", "412"):
                    code = ("ConditionalRequestConflict" if fault == "409"
                            else "PreconditionFailed")
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected</Message></Error>").encode()
                    return self._reply(int(fault), [("Content-Type", "application/xml")], xml)
                if fault == "503":
                    return self._reply(503, [("Content-Type", "text/plain")], b"injected 503")
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return None
                if fault == "delay":
                    threading.Event().wait(proxy.delay_s)  # an injected slow network
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
                headers["Host"] = self.headers["Host"]  # signed by S3 clients: kept as sent
                conn.request(self.command, self.path, body=body if body or self.command in
                             ("PUT", "POST", "PATCH") else None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "500-after":
                    return self._reply(500, [("Content-Type", "text/plain")], b"injected 500")
                with proxy.lock:
                    cut = self.command == "GET" and len(data) > 1 and proxy.cut_bodies > 0
                    proxy.cut_bodies -= cut
                if cut:  # the whole length announced, half of the body sent, then gone
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                return self._reply(resp.status, resp.getheaders(), data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def down(self) -> None:
        """Stops listening: new connections are refused, as if the server were gone."""
        with self.lock:
            self.closed = True
        self.released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            open_connections = list(self.connections)
        for conn in open_connections:  # kept-alive connections die with the server too
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def drain(self, timeout_s: float = 60.0) -> None:
        """Goes down, then waits until every request it had accepted is answered or dropped.

        Connections not yet accepted go with the listening socket; a request whose body is
        cut short is not forwarded. So once this returns, the server has finished everything
        it will ever get through this proxy. Raises TimeoutError past ``timeout_s``."""
        self.down()
        deadline = time.monotonic() + timeout_s
        with self.idle:
            while self.active:
                if not self.idle.wait(deadline - time.monotonic()):
                    raise TimeoutError(f"{self.active} requests still in flight after "
                                       f"{timeout_s} s")

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
