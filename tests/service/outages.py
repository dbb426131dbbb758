"""Servers of its own for a test or a benchmark to break, never the shared ones: a private
`redis-server` on a free port (no persistence, so a restart comes back empty, as one without an
RDB/AOF file does), a TCP proxy in front of a real server whose cut refuses new connections and
resets the open ones (what clients see when that server goes down) until it is restored, and a
database of its own on the shared Postgres, to reach only through such a proxy (so that nothing
else reads it while it is cut). Loopback only; bench/faults.py uses them too."""

from __future__ import annotations

import contextlib
import secrets
import selectors
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

from procs import free_port


@contextlib.contextmanager
def private_database(admin_url: str, name: str = "welore_outage"):
    """A new database on the server of `admin_url`, migrated to head, dropped at the end; → (its URL,
    postgresql+psycopg://<user>@127.0.0.1:<port>/<name>, and the server's port)."""
    import psycopg

    from api import migrate
    from api.db import dispose

    name = f"{name}_{secrets.token_hex(4)}"
    base, port = admin_url.rsplit("/", 1)[0], int(admin_url.rsplit(":", 1)[1].split("/")[0])
    url = f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate.upgrade(url)
        yield url, port
    finally:
        dispose(url)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def through(url: str, port: int, proxy: "SwitchProxy") -> str:
    """`url` (a server on 127.0.0.1:`port`) by way of `proxy`."""
    return url.replace(f"127.0.0.1:{port}/", f"127.0.0.1:{proxy.port}/", 1)


class PrivateRedis:
    """`redis-server` on 127.0.0.1:<free port>, started at once; `stop()`/`start()` an outage."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="welore-redis-")
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir, "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start (exit {self.proc.poll()})")
            time.sleep(0.05)

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """Down, and everything it held is lost (no persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None

    def flush(self) -> None:
        import redis

        r = redis.Redis(port=self.port)
        r.flushall()
        r.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SwitchProxy:
    """127.0.0.1:<free port> → 127.0.0.1:`upstream_port`. `cut()`: refused and reset, as a server
    that went down; `restore()`: through again on the same port."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = None
        self.restore()

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(128)
            self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            open_, self._open = self._open, set()
        if listener is not None:
            listener.close()
        for s in open_:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                conn.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    conn.close()
                    up.close()
                    return
                self._open |= {conn, up}
            threading.Thread(target=self._pipe, args=(conn, up), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in sel.select(timeout=1.0):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            pass  # cut: the sockets were closed under us
        finally:
            sel.close()
            with self._lock:
                self._open -= {a, b}
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass
