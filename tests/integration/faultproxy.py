"""A fault-injecting TCP proxy for the network-fault tests (a harness, not product).

It listens on 127.0.0.1 and forwards every connection to one target (a SuperLink's
Fleet API); TLS passes through untouched. While it runs, a test can:

- add ``latency`` seconds to every chunk, each way;
- cap ``bandwidth`` (bytes per second, each way);
- :meth:`reset` every open connection (an RST to both ends);
- :meth:`partition` for N seconds: nothing moves either way and new connections
  wait, as when packets vanish on a link (TCP's retransmissions then deliver what
  was held once it heals, unless an end gives up first).

``tc netem`` is not available on these machines; this sits between a SuperNode and
the SuperLink instead. Every thread is a daemon and :meth:`close` stops them all.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

CHUNK = 64 * 1024


class FaultProxy:
    """127.0.0.1:``port`` -> ``target``, with faults on demand."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.latency = 0.0
        self.bandwidth = 0.0  # 0: no cap
        self.connections = 0
        self.resets = 0
        self._healed = threading.Event()
        self._healed.set()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True, name="proxy").start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        while not self._healed.wait(0.2):  # a partition: the connect hangs
            if self._stop.is_set():
                client.close()
                return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open += [client, upstream]
            self.connections += 1
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Read ``src`` as it arrives; a sender delivers each chunk ``latency``
        after its arrival (a link's delay, not one per chunk in a row)."""
        line: queue.Queue[tuple[float, bytes]] = queue.Queue()
        sender = threading.Thread(target=self._send, args=(line, src, dst),
                                  daemon=True)
        sender.start()
        try:
            while not self._stop.is_set():
                data = src.recv(CHUNK)
                line.put((time.monotonic(), data))
                if not data:
                    break
        except OSError:
            line.put((time.monotonic(), b""))

    def _send(self, line: queue.Queue[tuple[float, bytes]], src: socket.socket,
              dst: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                arrived, data = line.get()
                if not data:
                    break
                while not self._healed.wait(0.2):  # held, not lost, while cut off
                    if self._stop.is_set():
                        return
                wait = arrived + self.latency - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if self.bandwidth:
                    time.sleep(len(data) / self.bandwidth)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def reset(self) -> int:
        """Reset every open connection (RST both ways); returns how many."""
        with self._lock:
            socks, self._open = self._open, []
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
        self.resets += len(socks) // 2
        return len(socks) // 2

    @contextmanager
    def cut(self) -> Iterator[None]:
        """Nothing moves while inside (a partition)."""
        self._healed.clear()
        try:
            yield
        finally:
            self._healed.set()

    def partition(self, seconds: float) -> threading.Thread:
        """A partition of ``seconds``, in the background."""
        def run() -> None:
            with self.cut():
                self._stop.wait(seconds)

        thread = threading.Thread(target=run, daemon=True, name="partition")
        thread.start()
        return thread

    def close(self) -> None:
        self._stop.set()
        self._healed.set()
        self._server.close()
        self.reset()
