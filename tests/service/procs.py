"""Real service processes for the load and fault tests: the API (`welore serve` in production
mode, i.e. uvicorn) and Celery workers (`welore worker`), each in its own process group so a
test can SIGTERM or kill -9 exactly one of them. Loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from helpers import service_env

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(settings) -> dict[str, str]:
    env = service_env(settings)
    env.update(WELORE_HEARTBEAT_TIMEOUT_S=str(settings.heartbeat_timeout_s),
               WELORE_MAX_ATTEMPTS=str(settings.max_attempts), WELORE_API_CONCURRENCY=str(settings.api_concurrency),
               WELORE_UPLOAD_MAX_BYTES=str(settings.upload_max_bytes),
               WELORE_UPLOAD_MAX_LINE_BYTES=str(settings.upload_max_line_bytes),
               WELORE_ARTIFACT_MIN_FREE_MB=str(settings.artifact_min_free_mb))
    return env


class Proc:
    def __init__(self, cmd: list[str], settings, log: Path, ready):
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(settings), stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 180
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[3:5]} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> set[int]:
        """The process and its children (a Celery worker's pool processes)."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            return {p.pid, *(c.pid for c in p.children(recursive=True))}
        except psutil.Error:
            return set()

    def kill(self) -> None:
        """kill -9 the whole process group: no cleanup of any kind runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._out.close()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._out.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class ApiServer(Proc):
    def __init__(self, settings, log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "welore_core.cli", "serve", "--port", str(self.port), "--log-level", "warning"]
        super().__init__(cmd, settings, log_dir / f"api-{self.port}.log", self._ready)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


class Worker(Proc):
    def __init__(self, settings, log_dir: Path, name: str, concurrency: int = 1):
        log = log_dir / f"worker-{name}.log"
        cmd = [sys.executable, "-m", "welore_core.cli", "worker", "--concurrency", str(concurrency),
               "--hostname", f"{name}@{settings.queue_prefix}", "--loglevel", "info"]
        super().__init__(cmd, settings, log, lambda: log.exists() and b" ready." in log.read_bytes())
