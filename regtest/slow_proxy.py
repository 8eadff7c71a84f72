"""A loopback TCP proxy that can hold a server's answers: a slow node or a slow signer
without touching either. Requests go through at once (the server does the work); the
answers wait while the proxy is held, for a given time or until released.

    with SlowProxy("127.0.0.1", node.rpc_port) as proxy:
        rpc = NodeRpc(proxy.url, user, password)
        proxy.hold(3.0)            # every answer from now on waits until 3 s have passed
        ...                        # a call through `rpc` is now in flight
        proxy.wait_for_waiting(1)  # until an answer is being held
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from regtest.wait import wait_until

__all__ = ["SlowProxy"]

_CHUNK = 65536


class SlowProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._waiting = 0
        self._generation = 0  # a timed hold releases only the hold it started
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, name="slow-proxy", daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- holding -----------------------------------------------------------------------

    def hold(self, seconds: float | None = None) -> None:
        """Hold every answer from now on: for `seconds`, or until `release`."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            self._open.clear()
        if seconds is not None:
            timer = threading.Timer(seconds, self._release_if, args=(generation,))
            timer.daemon = True
            timer.start()

    def release(self) -> None:
        with self._lock:
            self._generation += 1
            self._open.set()

    def _release_if(self, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._open.set()

    @property
    def held(self) -> bool:
        return not self._open.is_set()

    def waiting(self) -> int:
        """Answers the server has given that the proxy is holding right now."""
        with self._lock:
            return self._waiting

    def wait_for_waiting(self, count: int = 1, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.waiting() >= count,
            timeout=timeout,
            message=lambda: f"{count} held answer(s) (holding {self.waiting()})",
        )

    # -- plumbing ----------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for src, dst, slow in ((client, server, False), (server, client, True)):
                threading.Thread(
                    target=self._pump, args=(src, dst, slow), name="slow-proxy-pump", daemon=True
                ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                if slow and not self._open.is_set():
                    with self._lock:
                        self._waiting += 1
                    try:
                        while not self._open.wait(0.05):
                            if self._closed.is_set():
                                return
                    finally:
                        with self._lock:
                            self._waiting -= 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
        self._accepter.join(timeout=5)

    def __enter__(self) -> SlowProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
