"""A TCP proxy on 127.0.0.1 in front of a real server that breaks connections on purpose: the
i-th connection it accepts is reset (RST) once `budgets[i]` bytes of the server's response have
passed (None, or connections past the list: never). What the client sees is a real connection
reset mid-response; the server has processed the request by then."""

from __future__ import annotations

import selectors
import socket
import struct
import threading


class CuttingProxy:
    def __init__(self, upstream_port: int, budgets: list[int | None]):
        self.upstream_port, self.budgets = upstream_port, list(budgets)
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                i = self.connections
                self.connections += 1
            budget = self.budgets[i] if i < len(self.budgets) else None
            threading.Thread(target=self._serve, args=(conn, budget), daemon=True).start()

    def _serve(self, conn: socket.socket, budget: int | None) -> None:
        """Both directions in this one thread, so the reset (close with SO_LINGER 0) goes out at once."""
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, up)
        sel.register(up, selectors.EVENT_READ, conn)
        sent = 0
        try:
            while not self._stop:
                for key, _ in sel.select(timeout=1.0):
                    src, dst = key.fileobj, key.data
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is up and budget is not None and sent + len(data) > budget:
                        conn.sendall(data[: budget - sent])
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        return  # the finally closes conn: an RST to the client mid-response
                    dst.sendall(data)
                    if src is up:
                        sent += len(data)
        except OSError:
            pass
        finally:
            sel.close()
            conn.close()
            up.close()

    def close(self) -> None:
        self._stop = True
        self._sock.close()
