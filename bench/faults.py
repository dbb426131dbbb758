"""Fault matrix → the `faults` section of BENCHMARKS.md: the production stack (`welore serve`, two
`welore worker`s) meets, one after the other, the faults a deployment meets, and each row counts
what it cost: jobs lost (accepted, then not run to success), jobs stuck (not finished 10 min
after the fault), attempts spent beyond those of the jobs a lost worker held, and 5xx answers.

Everything it breaks is its own (tests/service/outages.py): a private `redis-server` (no
persistence: a restart comes back empty), a database of its own on the shared Postgres reached only
through a TCP proxy that it cuts, and an artifact directory on a small tmpfs that it fills (root
only; without root the disk-full row is skipped). The shared servers are never touched.

Each row: two fine-tuning jobs (one per worker) and two evaluations queued behind them; once both
fine-tunings train, the fault; a third evaluation is submitted during it with an Idempotency-Key
through `welore_client` (which retries); a poller reads every job's status twice a second all along.
503 while a dependency is down (with Retry-After) and 507 `disk_full` while the store is full are
the expected answers, counted apart; any other 5xx is a failure. Short heartbeat timeout (10 s,
heartbeat 1 s), so that every outage below lasts several timeouts.

Usage: python -m bench.faults [--only NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.report import table, write_section

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "service")]
os.environ.setdefault("WELORE_CACHE_DIR", str(Path.home() / ".cache" / "welore"))
os.environ.setdefault("WELORE_DATA_DIR", str(ROOT.parent / "shared" / "data"))

from outages import PrivateRedis, SwitchProxy, private_database, through  # noqa: E402
from procs import ApiServer, Worker  # noqa: E402

PG_ADMIN = os.environ.get("WELORE_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
TERMINAL = ("succeeded", "failed", "cancelled")
TRAIN = {"type": "finetune", "model": "tiny", "params": {"data": "boolq-passages", "method": "full", "steps": 60,
                                                         "batch_size": 1, "seq_len": 8, "val_sequences": 1}}
QUICK = {"type": "evaluate", "model": "tiny", "params": {"data": "boolq", "seq_len": 8, "windows": 1}}
COMPRESS = {"type": "compress", "model": "tiny", "params": {"err": 0.3, "min_ratio": 0.0, "calibration": "none"}}
STUCK_AFTER_S = 600
TMPFS_BYTES = 512 * 2**20  # 16 MiB a fine-tuned tiny model, 14 of them


class Poller(threading.Thread):
    """Reads the status of every job in `ids` twice a second; counts the answers by class."""

    def __init__(self, url: str, headers: dict):
        super().__init__(daemon=True)
        self.url, self.headers, self.ids = url, headers, []
        self.codes: dict[str, int] = {"2xx": 0, "503/507": 0, "5xx": 0, "other": 0, "no answer": 0}
        self._halt = threading.Event()

    def count(self, status: int) -> None:
        key = "2xx" if status < 300 else "503/507" if status in (503, 507) else "5xx" if status >= 500 else "other"
        self.codes[key] += 1

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as c:
            while not self._halt.wait(0.5):
                for job_id in list(self.ids):
                    try:
                        self.count(c.get(f"/v1/jobs/{job_id}").status_code)
                    except httpx.HTTPError:
                        self.codes["no answer"] += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


class Matrix:
    """The stack the rows share, and the rows."""

    def __init__(self, work: Path, db_url: str, pg_port: int, artifacts: Path):
        from api.auth.keys import create_key
        from api.db import session_scope
        from api.settings import Settings
        from tinymodel import write_tiny_model

        self.work, self.direct = work, db_url
        self.redis = PrivateRedis()
        self.proxy = SwitchProxy(pg_port)
        write_tiny_model(work / "models" / "tiny")
        self.settings = Settings(database_url=through(db_url, pg_port, self.proxy), redis_url=self.redis.url,
                                 artifact_dir=artifacts, models_dir=work / "models", state_dir=work / "state",
                                 queue_prefix=f"welore_faults_{secrets.token_hex(3)}", heartbeat_s=1.0,
                                 heartbeat_timeout_s=10.0, max_attempts=3,
                                 artifact_min_free_mb=64)  # readiness below the tmpfs size (where the setting exists)
        with session_scope(db_url) as s:
            self.key = create_key(s, "faults")[1]
        self.h = {"Authorization": f"Bearer {self.key}"}
        self.logs = work / "logs"
        self.logs.mkdir()
        self.api = ApiServer(self.settings, self.logs)
        self.workers = [Worker(self.settings, self.logs, f"w{i}") for i in range(2)]
        self.http = httpx.Client(base_url=self.api.url, headers=self.h, timeout=60)
        self.poller = Poller(self.api.url, self.h)
        self.poller.start()
        self._named = 2
        self.row_ids: list[str] = []

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError):
                os.killpg(w.pid, signal.SIGCONT)
        for step in (self.poller.stop, self.http.close, *(w.stop for w in self.workers), self.api.stop,
                     self.proxy.close, self.redis.close):
            try:
                step()
            except Exception as exc:  # the rest must go all the same
                print(f"could not {step.__qualname__}: {exc!r}", file=sys.stderr)

    # -- helpers --------------------------------------------------------------------------
    def row_of(self, job_id: str):
        from api.db import session_scope
        from api.models import Job

        with session_scope(self.direct) as s:
            return s.get(Job, job_id)

    def holder(self, job_id: str) -> Worker:
        pid = int(self.row_of(job_id).runner.split(":")[1])
        return next(w for w in self.workers if pid in w.pids())

    def replace(self, worker: Worker) -> None:
        self.workers.remove(worker)
        self.workers.append(Worker(self.settings, self.logs, f"w{self._named}"))
        self._named += 1

    def submit(self, body: dict) -> str:
        r = self.http.post("/v1/jobs", json=body)
        self.poller.count(r.status_code)
        r.raise_for_status()
        self.watch(r.json()["id"])
        return r.json()["id"]

    def watch(self, job_id: str) -> None:
        self.poller.ids.append(job_id)
        self.row_ids.append(job_id)

    def submit_retrying(self, body: dict, notes: list) -> str | None:
        """A client's idempotent submit during the fault (it retries 503s and broken connections)."""
        from welore_client import Client
        from welore_client.errors import APIError, WeloreClientError

        try:
            with Client(self.api.url, self.key) as client:
                job = client.jobs.create(**body, idempotency_key=f"during-{secrets.token_hex(4)}")
        except WeloreClientError as exc:
            if isinstance(exc, APIError):
                self.poller.count(exc.status)
            notes.append(f"submit during it: {type(exc).__name__} {getattr(exc, 'status', '')}".rstrip())
            return None
        self.watch(job.id)
        return job.id

    def probe(self, method: str, path: str, **kw) -> str:
        """One request on a connection of its own; → its status and error code (or detail), counted."""
        try:
            with httpx.Client(base_url=self.api.url, headers=self.h, timeout=60) as c:
                r = c.request(method, path, **kw)
        except httpx.HTTPError as exc:
            self.poller.codes["no answer"] += 1
            return f"no answer ({type(exc).__name__})"
        self.poller.count(r.status_code)
        try:
            body = r.json()
            detail = body["error"]["code"] if "error" in body else body.get("checks", {}).get("artifact_store", "")
        except (ValueError, KeyError, TypeError, AttributeError):
            detail = ""
        return f"{r.status_code} {detail}".rstrip()

    def until(self, cond, what: str, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while not (got := cond()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"still not {what} after {timeout} s; logs in {self.logs}")
            time.sleep(0.5)
        return got

    def training(self, job_id: str) -> bool:
        row = self.row_of(job_id)
        if row.status in TERMINAL:
            raise RuntimeError(f"{job_id} ended ({row.status} {row.error_code}: {row.error_message}) before the fault")
        return row.status == "running" and row.stage == "train"

    # -- a row ----------------------------------------------------------------------------
    def run(self, name: str, fault) -> list:
        before = dict(self.poller.codes)
        self.row_ids = []
        train = [self.submit(TRAIN) for _ in range(2)]
        for _ in range(2):
            self.submit(QUICK)
        self.until(lambda: all(self.training(j) for j in train), "training")
        notes: list[str] = []
        t0 = time.monotonic()
        lost_held, expected = fault(self, train, notes)
        fault_s = time.monotonic() - t0
        ids = list(self.row_ids)
        deadline = time.monotonic() + STUCK_AFTER_S
        while time.monotonic() < deadline and any(self.row_of(j).status not in TERMINAL for j in ids):
            time.sleep(1)
        drained_s = time.monotonic() - t0 - fault_s
        rows = [self.row_of(j) for j in ids]
        stuck = sum(r.status not in TERMINAL for r in rows)
        lost = sum(r.status in TERMINAL and r.status != "succeeded" and r.error_code not in expected for r in rows)
        for r in rows:
            if r.status in ("failed", "cancelled"):
                notes.append(f"{r.type} {r.status} {r.error_code}: {(r.error_message or '')[:60]}")
        extra = sum(max(0, r.attempts - 1) for r in rows) - lost_held
        codes = {k: self.poller.codes[k] - before[k] for k in before}
        print(f"{name}: {len(rows)} jobs, lost {lost}, stuck {stuck}, extra attempts {extra}, answers {codes}; "
              f"{'; '.join(notes)}", flush=True)
        return [name, len(rows), sum(r.status == "succeeded" for r in rows), lost, stuck, extra, codes["5xx"],
                codes["503/507"], codes["no answer"], round(fault_s), round(drained_s), "; ".join(notes) or "-"]


# -- the faults: (matrix, the fine-tuning job ids, notes) → (attempts a lost worker spent, the error codes of
# -- the failures it may rightly cause) ------------------------------------------------------------------
def redis_flushed(m: Matrix, train, notes):
    m.redis.flush()  # the two evaluations' task messages (and every sent mark) are gone
    m.submit_retrying(QUICK, notes)
    return 0, ()


def redis_down_30s(m: Matrix, train, notes):
    m.redis.stop()
    t0 = time.monotonic()
    m.submit_retrying(QUICK, notes)  # accepted, kept queued until the broker is back
    time.sleep(max(0.0, 30 - (time.monotonic() - t0)))
    m.redis.start()
    return 0, ()


def postgres_down_60s(m: Matrix, train, notes):
    m.proxy.cut()
    t0 = time.monotonic()
    m.submit_retrying(QUICK, notes)  # refused with 503 (nothing accepted), after the client's retries
    time.sleep(max(0.0, 60 - (time.monotonic() - t0)))
    m.proxy.restore()
    return 0, ()


def worker_kill_9(m: Matrix, train, notes):
    worker = m.holder(train[0])
    worker.kill()
    m.submit_retrying(QUICK, notes)
    m.replace(worker)
    return 1, ()


def worker_sigterm(m: Matrix, train, notes):
    worker = m.holder(train[0])
    worker.stop(signal.SIGTERM)
    m.submit_retrying(QUICK, notes)
    m.replace(worker)
    return 0, ()  # a graceful shutdown gives the attempt back


def worker_sigstop_60s(m: Matrix, train, notes):
    worker = m.holder(train[0])
    os.killpg(worker.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    m.submit_retrying(QUICK, notes)
    time.sleep(max(0.0, 60 - (time.monotonic() - t0)))
    os.killpg(worker.pid, signal.SIGCONT)  # it finds its job taken over and leaves it
    return 1, ()


def disk_full(m: Matrix, train, notes):
    """The artifact store full while jobs run: an upload and a compression need space; a job that
    hits ENOSPC may fail `disk_full` (nothing else), and everything works again once space is freed."""
    fill = m.settings.artifact_dir / "fill.bin"
    with open(fill, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 2**20)
            f.flush()
    try:
        upload = {"file": ("a.jsonl", b'{"text": "a line of text"}\n' * 64)}
        notes.append(f"upload {m.probe('POST', '/v1/files', files=upload)}")
        notes.append(f"readyz {m.probe('GET', '/readyz')}")
        job = m.submit(COMPRESS)  # writes its checkpoint into the full store
        m.until(lambda: m.row_of(job).status in TERMINAL, "finished", timeout=300)
    finally:
        fill.unlink()
    notes.append(f"readyz after {m.probe('GET', '/readyz')}")
    return 0, ("disk_full",)


FAULTS = {"Redis flushed": redis_flushed, "Redis down 30 s": redis_down_30s, "Postgres down 60 s": postgres_down_60s,
          "worker kill -9": worker_kill_9, "worker SIGTERM": worker_sigterm, "worker SIGSTOP 60 s": worker_sigstop_60s,
          "disk full": disk_full}


@contextlib.contextmanager
def small_disk(path: Path):
    """`path` on a tmpfs of TMPFS_BYTES (root only); None when it cannot be mounted."""
    path.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs",
                                                    str(path)], capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def report(rows: list, skipped: list[str]) -> str:
    lines = ["## Fault matrix (`python -m bench.faults`)", "",
             f"CPU ({os.cpu_count()} cores, shared with the client, Postgres, its own Redis and two workers); "
             f"{time.strftime('%Y-%m-%d')}; load average {os.getloadavg()[0]:.1f} at the end. The production stack "
             "(`welore serve`, two `welore worker`s; heartbeat 1 s, timeout 10 s) on a private `redis-server`, a "
             "database of its own behind a TCP proxy that is cut for the Postgres outage, and artifacts on a "
             f"{TMPFS_BYTES // 2**20} MiB tmpfs. Per row: two fine-tunings (one per worker) and two evaluations "
             "queued behind them, then the fault once both train, and a third evaluation submitted during it "
             "with an Idempotency-Key (through `welore_client`, which retries); a poller reads every job's status "
             "twice a second. `lost`: accepted, then not run to success (in the disk-full row, failures "
             f"`disk_full` aside); `stuck`: not finished {STUCK_AFTER_S // 60} min after the fault; `extra "
             "attempts`: attempts beyond one per job, less those of the job a lost worker held; `5xx`: answers "
             "≥ 500 other than 503 and 507; `503/507`: answers while a dependency was down (503, with "
             "Retry-After) or the store full (507 `disk_full`).", "",
             table(["fault", "jobs", "succeeded", "lost", "stuck", "extra attempts", "5xx", "503/507", "no answer",
                    "fault s", "drained in s", "notes"], rows), ""]
    if skipped:
        lines += [f"Not run: {', '.join(skipped)} (the tmpfs needs root).", ""]
    bad = [r[0] for r in rows if r[3] or r[4] or r[5] or r[6]]
    lines += [f"Goal (issue 40): every row lost 0, stuck 0, extra attempts 0, 5xx 0 — "
              f"{'met' if not bad else 'not met: ' + ', '.join(bad)}."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(FAULTS), help="these rows only")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the logs (the work directory)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the stack, database and tmpfs go too
    work = Path(tempfile.mkdtemp(prefix="welore-bench-faults-"))
    rows, skipped = [], []
    try:
        with private_database(PG_ADMIN, "welore_faults") as (db_url, port), small_disk(work / "artifacts") as disk:
            matrix = Matrix(work, db_url, port, disk or work / "artifacts")
            try:
                for name, fault in FAULTS.items():
                    if args.only and name not in args.only:
                        continue
                    if fault is disk_full and disk is None:
                        skipped.append(name)
                        continue
                    print(f"{name} ...", flush=True)
                    rows.append(matrix.run(name, fault))
            finally:
                matrix.close()
    finally:
        if args.keep:
            print(f"logs kept in {work / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    body = report(rows, skipped)
    print(body)
    if not args.no_write and not args.only:
        write_section("faults", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
