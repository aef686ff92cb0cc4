"""A storage outage on demand: a TCP proxy in front of a real server that can be taken down and up.

Why a proxy and not the server itself: moto keeps its buckets in memory, so stopping and starting
it loses every object, and freezing it (SIGSTOP) makes clients wait for their read timeouts (s3fs:
15 s) instead of failing, which is a different fault. While the proxy is `down`, its port refuses
new connections and every open connection is reset, which is what clients see when an S3 server is
stopped; `up` listens on the same port again, as a restarted server does, with its data intact.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class OutageProxy:
    """Forwards 127.0.0.1:`port` to `upstream` (host, port) until taken `down`."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = 0
        self.lock = threading.Lock()
        self.conns: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.refused_since: float | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections, reset the open ones."""
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, set()
        # shutdown() before close(): close() alone leaves a socket open while another thread is
        # blocked in accept() or recv() on it.
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)   # also drops connections waiting in the backlog
            listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                # SO_LINGER 0: closing sends a RST, as the kernel does for a server process that is gone.
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def outage(self, seconds: float) -> None:
        """Down for `seconds`, then up again."""
        self.down()
        try:
            time.sleep(seconds)
        finally:
            self.up()

    def close(self) -> None:
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:   # closed by down()
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:   # went down meanwhile
                    client.close()
                    server.close()
                    return
                self.conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:   # one side ended: end the other, so that neither waits on a half-open pair
            with self.lock:
                self.conns -= {src, dst}
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
