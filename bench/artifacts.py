"""Artifact download throughput → the `artifacts` section of BENCHMARKS.md: what verifying a
download while it is sent costs (issue 40). One large artifact (random bytes) is served by
`welore serve` (embedded, uvicorn on loopback) and downloaded whole, interleaved round by round:

- whole file: hashed as it is sent, the last chunk held back until the digest matches;
- `Range: bytes=0-` on the same server: the same bytes through the unverified range path;
- with --baseline REV: the whole file from the code at git revision REV (its own worktree and
  server), i.e. as it was served before verification.

Each figure is the median MB/s over the rounds; the client runs on the same machine and takes
part of its CPU, so the ratios (measured together) matter more than the absolute rates.

Usage: python -m bench.artifacts [--mib N] [--rounds R] [--baseline REV]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.report import table, write_section

ROOT = Path(__file__).resolve().parent.parent
NAME = "weights.bin"


class Server:
    """`welore serve` (embedded) from the code at `code`, serving one finished job with the artifact `blob`."""

    def __init__(self, code: Path, work: Path, blob: Path, sha256: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        state = work / f"state-{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WELORE_")}
        env.update(HOME=str(work / f"home-{self.port}"), WELORE_STATE_DIR=str(state), PYTHONPATH=str(code),
                   WELORE_CACHE_DIR=str(work / f"cache-{self.port}"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.log = work / f"serve-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "welore_core.cli", "serve", "--port", str(self.port),
                                          "--log-level", "warning"], cwd=code, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"welore serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.3)
        key = re.findall(r"^WELORE_API_KEY=(wl_\S+)$", self.log.read_text(), flags=re.M)[0]
        self.headers = {"Authorization": f"Bearer {key}"}
        self.job_id = self._finished_job(f"sqlite:///{state / 'welore.db'}", state / "artifacts", blob, sha256)
        self.artifact_url = f"{self.url}/v1/jobs/{self.job_id}/artifacts/{NAME}"

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _finished_job(db_url: str, artifacts: Path, blob: Path, sha256: str) -> str:
        """A succeeded job owning the artifact (a hard link to `blob`), written as the worker would."""
        from sqlalchemy import select

        from api.db import session_scope
        from api.models import ApiKey, Artifact, Job, new_id, utcnow

        job_id = new_id("job")
        (artifacts / "jobs" / job_id).mkdir(parents=True)
        os.link(blob, artifacts / "jobs" / job_id / NAME)
        with session_scope(db_url) as s:
            owner = s.scalars(select(ApiKey.id)).one()
            s.add(Job(id=job_id, owner_id=owner, type="compress", model="bench", model_ref={"kind": "registry",
                      "name": "bench"}, params={}, status="succeeded", progress=1.0, queue="bench", attempts=1,
                      cancel_requested=False, created_at=utcnow(), finished_at=utcnow()))
            s.flush()
            s.add(Artifact(job_id=job_id, name=NAME, size=blob.stat().st_size, sha256=sha256))
        return job_id

    def download(self, client: httpx.Client, headers: dict, expect: int) -> float:
        """MB/s of one download (its bytes counted, its status checked)."""
        got = 0
        t0 = time.perf_counter()
        with client.stream("GET", self.artifact_url, headers={**self.headers, **headers}) as r:
            assert r.status_code == expect, (r.status_code, r.read()[:300])
            for chunk in r.iter_raw(1 << 20):
                got += len(chunk)
        seconds = time.perf_counter() - t0
        assert got == int(r.headers["content-length"]), (got, r.headers["content-length"])
        return got / 1e6 / seconds

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


def _blob(path: Path, mib: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _hash_rate(path: Path) -> float:
    from welore_core.hashing import file_sha256

    t0 = time.perf_counter()
    file_sha256(path)
    return path.stat().st_size / 1e6 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="size of the artifact (MiB)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--baseline", default=None, help="a git revision whose whole-file download to measure too")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="welore-bench-artifacts-") as tmp:
        work = Path(tmp)
        blob = work / NAME
        sha = _blob(blob, args.mib)
        servers = {"current": Server(ROOT, work, blob, sha)}
        old = work / "baseline"
        try:
            if args.baseline:
                subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline], cwd=ROOT, check=True,
                               capture_output=True)
                servers["baseline"] = Server(old, work, blob, sha)
            cases = [("whole file, verified while sent", servers["current"], {}, 200),
                     ("`Range: bytes=0-` (not verified)", servers["current"], {"Range": "bytes=0-"}, 206)]
            if args.baseline:
                cases.append((f"whole file at {args.baseline[:10]} (before verification)", servers["baseline"],
                              {}, 200))
            with httpx.Client(timeout=600) as client:
                for _, server, headers, expect in cases:  # warm: page cache, the first (recorded) check
                    server.download(client, headers, expect)
                for _ in range(args.rounds):
                    rates.setdefault("sha256 of the file alone (one core)", []).append(_hash_rate(blob))
                    for label, server, headers, expect in cases:
                        rates.setdefault(label, []).append(server.download(client, headers, expect))
        finally:
            for server in servers.values():
                server.close()
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    medians = {label: statistics.median(r) for label, r in rates.items()}
    reference = medians["`Range: bytes=0-` (not verified)"]
    rows = [[label, round(m), round(min(rates[label])), round(max(rates[label])), f"{m / reference:.2f}×"]
            for label, m in medians.items()]
    import platform

    body = "\n".join([
        "## Artifact downloads: the cost of verifying while sending",
        "",
        f"`python -m bench.artifacts --mib {args.mib} --rounds {args.rounds}"
        + (f" --baseline {args.baseline}" if args.baseline else "") + f"` on {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}: one {args.mib} MiB artifact of random "
        "bytes, downloaded whole over loopback from `welore serve` (embedded, uvicorn), the rounds interleaved; "
        "the file is in the page cache. MB/s, median (min–max) of the rounds, and the ratio to the unverified "
        "range path of the same server.",
        "",
        table(["download", "MB/s", "min", "max", "vs unverified"], rows),
    ])
    print(body)
    write_section("artifacts", body)


if __name__ == "__main__":
    main()
