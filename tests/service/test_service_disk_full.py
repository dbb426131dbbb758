"""A full artifact store, for real: the store is a small tmpfs (mounted here, so the test needs
root; skipped otherwise), the API is uvicorn and the job runs in a real worker process. An upload
that does not fit is a 507 `disk_full` and leaves nothing behind; /readyz reports the free space
and is not ready below WELORE_ARTIFACT_MIN_FREE_MB; a job whose output does not fit fails
`disk_full` with a message saying what to free."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest

from helpers import wait_for
from procs import ApiServer, Worker

pytestmark = pytest.mark.service

STORE_MB, MIN_FREE_MB = 24, 4


@pytest.fixture
def small_store(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the disk-full test mounts a small tmpfs as the artifact store, which needs root")
    store = tmp_path / "store"
    store.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={STORE_MB}m", "tmpfs", str(store)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:200]}); the disk-full test needs one")
    try:
        yield store
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def _fill(path, leave_bytes: int) -> None:
    """Write a ballast file until only `leave_bytes` are free."""
    free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
    with open(path, "wb") as f:
        left = free - leave_bytes
        while left > 0:
            left -= f.write(b"\0" * min(1 << 20, left))


def test_a_full_store_is_507_not_ready_and_fails_jobs_disk_full(settings, keys, small_store, tmp_path):
    full = settings.model_copy(update={"artifact_dir": small_store, "artifact_min_free_mb": MIN_FREE_MB,
                                       "upload_max_bytes": 64 * 2**20,
                                       "queue_prefix": settings.queue_prefix + "_disk"})
    api = ApiServer(full, tmp_path)
    worker = None
    h = keys["A"]
    try:
        with httpx.Client(base_url=api.url, timeout=120, headers=h) as c:
            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["artifact_store_space"] == "ok"
            assert 0 < ready.json()["artifact_store_free_bytes"] <= STORE_MB * 2**20

            # An upload larger than the space left: 507 with the error body, nothing kept.
            r = c.post("/v1/files", files={"file": ("big.txt", b"some text\n" * (3 * STORE_MB * 2**20 // 20))})
            assert r.status_code == 507, r.text[:300]
            err = r.json()["error"]
            assert err["code"] == "disk_full" and "WELORE_ARTIFACT_DIR" in err["message"], err
            assert "free space" in err["message"] and "/tmp/" not in err["message"]
            assert list((small_store / ".tmp").iterdir()) == []
            assert c.get("/readyz").json()["artifact_store_free_bytes"] > (STORE_MB - 1) * 2**20  # all freed

            # Below the threshold: not ready, saying why.
            ballast = small_store / "ballast"
            _fill(ballast, leave_bytes=2 * 2**20)
            ready = c.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "not_ready", ready.text
            assert "below WELORE_ARTIFACT_MIN_FREE_MB" in ready.json()["checks"]["artifact_store_space"]
            assert ready.json()["artifact_store_free_bytes"] < MIN_FREE_MB * 2**20

            # A job whose output does not fit (the tiny model's checkpoint is ~10 MB): failed disk_full.
            job = c.post("/v1/jobs", json={"type": "compress", "model": "tiny",
                                           "params": {"err": 0.3, "min_ratio": 0.0, "calibration": "none"}})
            assert job.status_code == 202, job.text[:300]
            worker = Worker(full, tmp_path, "disk")
            done = wait_for(c, job.json()["id"], h, timeout=300)
            assert done["status"] == "failed", done
            assert done["error"]["code"] == "disk_full", done["error"]
            assert "free space" in done["error"]["message"] and "WELORE_ARTIFACT_DIR" in done["error"]["message"]
            assert list((small_store / ".tmp").iterdir()) == [] and not (small_store / "jobs" / done["id"]).exists()

            ballast.unlink()
            assert c.get("/readyz").status_code == 200
    finally:
        if worker is not None:
            worker.stop()
        api.stop()
    assert "Traceback" not in api.output()
