"""A TCP proxy in front of PostgreSQL, to see and break what a client sends and hears.

The embedded PostgreSQL listens on a Unix socket only; the proxy listens on a free
TCP port of 127.0.0.1 and forwards each connection to that socket, byte for byte, in
threads of its own (so it serves clients of any event loop). It records what clients
send (to count statements), can be armed to forward the next `COMMIT` and then drop
that connection before the server's reply reaches the client (the commit happens, and
the client cannot know), and can fall silent like a dead network.

Why not toxiproxy: it is a separate server (a Go binary; PyPI has only its clients), and
its toxics cut by time or bytes; cutting right after a COMMIT needs to read what is sent.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the PostgreSQL whose URL it is given."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        port = parts.port or 5432
        self._socket_path = f"{query.pop('host')}/.s.PGSQL.{port}"
        self._parts = parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1")
        self._query = query
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sent = bytearray()
        self._drop_after_commit = False
        self._silent = False
        self.dropped = threading.Event()  # set once a COMMIT's reply was dropped
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    @property
    def url(self) -> str:
        """The database URL through the proxy."""
        query = {**self._query, "sslmode": "disable"}
        netloc = f"{self._parts.netloc}:{self.port}"
        return urlunsplit(self._parts._replace(netloc=netloc, query=urlencode(query)))

    def start(self) -> TcpProxy:
        """Accept connections in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every forwarded connection."""
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def sent(self) -> bytes:
        """Everything clients sent so far."""
        with self._lock:
            return bytes(self._sent)

    def forget(self) -> None:
        """Start recording what clients send afresh."""
        with self._lock:
            self._sent.clear()

    def drop_reply_to_next_commit(self) -> None:
        """Forward the next COMMIT, then cut its connection before the reply comes back."""
        with self._lock:
            self._drop_after_commit = True

    def fall_silent(self) -> None:
        """From now on forward nothing, either way, and close nothing: a dead network."""
        with self._lock:
            self._silent = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.connect(self._socket_path)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._sockets += [client, server]
            cut = threading.Event()  # this connection's COMMIT went out: drop the reply
            threading.Thread(target=self._upstream, args=(client, server, cut), daemon=True).start()
            threading.Thread(
                target=self._downstream, args=(server, client, cut), daemon=True
            ).start()

    def _upstream(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        while data := _receive(client):
            with self._lock:
                if self._silent:
                    continue
                self._sent += data
                if self._drop_after_commit and b"COMMIT" in data:
                    self._drop_after_commit = False
                    cut.set()  # before forwarding: the reply cannot overtake it
            try:
                server.sendall(data)
            except OSError:
                break
        _close(server)

    def _downstream(
        self, server: socket.socket, client: socket.socket, cut: threading.Event
    ) -> None:
        while data := _receive(server):
            if self._silent:
                continue
            if cut.is_set():
                _close(client)
                _close(server)
                self.dropped.set()
                return
            try:
                client.sendall(data)
            except OSError:
                break
        _close(client)


def _receive(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed already, by the other direction's thread
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
