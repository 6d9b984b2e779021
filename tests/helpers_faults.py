"""A TCP proxy for HTTP that loses replies on purpose: the request reaches the server, its answer does not.

`ReplyDroppingProxy(upstream_port)` listens on a free loopback port and relays
each client connection to the upstream server, one request after the other.
`drop_next(match)` arms it: the next request for which `match(method, path)`
is true is forwarded whole, the server's complete answer is read — so the
server has done the work — and then the client's connection is closed without
a byte of it. That is what a lost reply on a bad link looks like to botocore.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from renkei.peers import LOOPBACK

Match = Callable[[str, str], bool]


class _Closed(Exception):
    pass


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes) -> bytes:
    while marker not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise _Closed()
        buf += chunk
    end = buf.index(marker) + len(marker)
    head = bytes(buf[:end])
    del buf[:end]
    return head


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = sock.recv(max(65536, n - len(buf)))
        if not chunk:
            raise _Closed()
        buf += chunk
    data = bytes(buf[:n])
    del buf[:n]
    return data


def _read_chunked(sock: socket.socket, buf: bytearray) -> bytes:
    out = bytearray()
    while True:
        line = _read_until(sock, buf, b"\r\n")
        out += line
        size = int(line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = _read_until(sock, buf, b"\r\n")
                out += trailer
                if trailer == b"\r\n":
                    return bytes(out)
        out += _read_exact(sock, buf, size + 2)


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
    return lines[0], fields


def _body(sock: socket.socket, buf: bytearray, fields: dict[str, str], until_close: bool) -> bytes:
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return _read_chunked(sock, buf)
    if "content-length" in fields:
        return _read_exact(sock, buf, int(fields["content-length"]))
    if not until_close:
        return b""
    data = bytearray(buf)
    buf.clear()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


class ReplyDroppingProxy:
    def __init__(self, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._lock = threading.Lock()
        self._armed: Match | None = None
        self.dropped: list[tuple[str, str, int]] = []  # (method, path, upstream status) of lost replies
        self.requests: list[tuple[str, str]] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def drop_next(self, match: Match) -> None:
        with self._lock:
            self._armed = match

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._armed is not None

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True, name="proxy-conn").start()

    def _take(self, method: str, path: str) -> bool:
        with self._lock:
            self.requests.append((method, path))
            if self._armed is not None and self._armed(method, path):
                self._armed = None
                return True
            return False

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        cbuf, ubuf = bytearray(), bytearray()
        try:
            while True:
                head = _read_until(client, cbuf, b"\r\n\r\n")
                request_line, fields = _headers(head)
                method, path = request_line.split(" ")[:2]
                if fields.get("expect", "").lower() == "100-continue":
                    # answer the interim reply ourselves; the upstream gets a request without Expect
                    head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.lower().startswith(b"expect:"))
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _body(client, cbuf, fields, until_close=False)
                drop = self._take(method, path)
                upstream.sendall(head + body)
                while True:
                    rhead = _read_until(upstream, ubuf, b"\r\n\r\n")
                    status_line, rfields = _headers(rhead)
                    status = int(status_line.split(" ")[1])
                    if 100 <= status < 200:
                        continue
                    break
                no_body = method == "HEAD" or status in (204, 304)
                rbody = b"" if no_body else _body(upstream, ubuf, rfields, until_close=True)
                if drop:
                    with self._lock:
                        self.dropped.append((method, path, status))
                    return  # the server did the work; the client never hears of it
                client.sendall(rhead + rbody)
                if rfields.get("connection", "").lower() == "close":
                    return
        except (_Closed, OSError):
            return
        finally:
            for sock in (client, upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
