"""`welore serve` in embedded mode (no configuration: SQLite, local artifacts, in-process worker)
as a real process on a free port, for the tests that talk to it over HTTP."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, models_dir: Path):
        self.home, self.models_dir = home, models_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"serve-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WELORE_")}
        env.update(HOME=str(home), WELORE_MODELS_DIR=str(models_dir), WELORE_CACHE_DIR=os.environ["WELORE_CACHE_DIR"],
                   WELORE_DATA_DIR=os.environ["WELORE_DATA_DIR"], HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        self.env = env
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "welore_core.cli", "serve", "--port", str(self.port)],
                                     cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"welore serve did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.3)

    def output(self) -> str:
        return self.log.read_text()

    def api_key(self) -> str:
        """The key printed on the first start (the server must have started on an empty database)."""
        found = re.findall(r"^WELORE_API_KEY=(wl_\S+)$", self.output(), flags=re.M)
        assert len(found) == 1, self.output()
        return found[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._out.close()
        return self.proc.returncode
