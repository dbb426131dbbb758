"""End to end through a real `celery` worker process on the real Redis and Postgres: compress a
tiny model, follow its events, download and verify every artifact (SHA-256, Range, tar), load
the checkpoint with welore_core and compare logits; evaluate the output; a failing job; cancel
a queued and a running fine-tuning job with nothing left behind."""

from __future__ import annotations

import io
import os
import tarfile
import time

import httpx
import pytest
import torch

from helpers import parse_sse, read_sse, sha256, wait_for
from procs import ApiServer

pytestmark = pytest.mark.service

COMPRESS = {"err": 0.3, "min_ratio": 0.0, "calibration": "none"}


def plan_seq(events):
    return next(e["seq"] for e in events if e["type"] == "progress" and e["data"]["stage"] == "plan")


def first_seq(events, stage):
    return next(e["seq"] for e in events if e["type"] == "progress" and e["data"]["stage"] == stage)


@pytest.fixture(scope="module")
def compressed(client, keys, celery_worker):
    """A compress job of the tiny model, followed over SSE until it ends."""
    h = keys["A"]
    r = client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": COMPRESS}, headers=h)
    assert r.status_code == 202, r.json()
    job_id = r.json()["id"]
    events = read_sse(client, job_id, h)
    return job_id, events


def test_compress_job_streams_events_and_succeeds(client, keys, compressed):
    job_id, events = compressed
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] == 0
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    stages = {e["data"]["stage"] for e in events if e["type"] == "progress"}
    assert {"load", "plan", "spectrum", "factorize", "save"} <= stages
    plan = next(e["data"] for e in events if e["type"] == "progress" and e["data"]["stage"] == "plan")
    assert plan["metrics"]["estimated_peak_bytes"] > plan["metrics"]["model_bytes"] > 0
    assert plan["metrics"]["cache_bytes"] > 0 and plan["metrics"]["cache_mode"] == "factors"
    assert seqs.index(plan_seq(events)) < seqs.index(first_seq(events, "spectrum"))  # before the heavy work
    metric_names = {k for e in events if e["type"] == "metric" for k in e["data"]["values"]}
    assert "rss_mb" in metric_names

    job = client.get(f"/v1/jobs/{job_id}", headers=keys["A"]).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0 and job["error"] is None
    assert job["started_at"] and job["finished_at"] and job["attempts"] == 1
    assert abs(job["result"]["err_achieved"] - 0.3) <= 0.01 and job["result"]["n_lrc"] > 0
    assert "out" not in job["result"] and "matrices" not in job["result"]  # no server paths, no per-matrix list
    assert job["metrics"]["rss_peak_mb"] > 0 and job["metrics"]["seconds"] > 0

    # The history persists in Postgres: the JSON view equals what the stream delivered.
    history = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}, headers=keys["A"]).json()
    assert [e["seq"] for e in history] == seqs
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={**keys["A"], "Last-Event-ID": "3"}) as r:
        resumed = [e["seq"] for e in parse_sse(r.read().decode())]
    assert resumed == seqs[4:]
    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=keys["A"]).json()
    assert metrics["series"]["rss_mb"] and metrics["final"]["rss_peak_mb"] > 0


def test_download_every_artifact_and_compare_logits(client, keys, compressed, settings, tmp_path):
    job_id, _ = compressed
    h = keys["A"]
    listing = client.get(f"/v1/jobs/{job_id}/artifacts", headers=h).json()
    names = {a["name"] for a in listing["data"]}
    assert {"config.json", "model.safetensors", "welore.json", "tokenizer.json"} <= names
    out = tmp_path / "download"
    out.mkdir()
    for a in listing["data"]:
        r = client.get(a["url"], headers=h)
        assert r.status_code == 200
        assert int(r.headers["content-length"]) == a["size"] == len(r.content)
        assert r.headers["etag"] == f'"{a["sha256"]}"' and sha256(r.content) == a["sha256"]
        (out / a["name"]).write_bytes(r.content)

    # A resumed download: byte ranges of the weights, and a conditional request.
    weights = (out / "model.safetensors").read_bytes()
    url = f"/v1/jobs/{job_id}/artifacts/model.safetensors"
    r = client.get(url, headers={**h, "Range": "bytes=1000-4999"})
    assert r.status_code == 206 and r.content == weights[1000:5000]
    assert r.headers["content-range"] == f"bytes 1000-4999/{len(weights)}"
    r = client.get(url, headers={**h, "Range": f"bytes={len(weights) - 100}-"})
    assert r.status_code == 206 and r.content == weights[-100:]
    r = client.get(url, headers={**h, "Range": f"bytes={len(weights) + 10}-"})
    assert r.status_code == 416
    etag = f'"{sha256(weights)}"'
    assert client.get(url, headers={**h, "If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={**h, "If-None-Match": f'"other", W/{etag}'}).status_code == 304  # weak
    for bad in ("bytes=abc", "bytes=5-1", "items=0-10", "bytes=", "bytes=-"):  # ignored: the whole file
        r = client.get(url, headers={**h, "Range": bad})
        assert r.status_code == 200 and r.content == weights, bad
    r = client.get(url, headers={**h, "Range": f"bytes={len(weights) + 10}-"})
    assert r.status_code == 416 and r.json()["error"]["code"] == "range_not_satisfiable"
    assert r.headers["content-range"] == f"bytes */{len(weights)}"
    head = client.head(url, headers=h)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) == len(weights)
    assert head.headers["etag"] == etag

    # The whole checkpoint as one tar stream.
    r = client.get(f"/v1/jobs/{job_id}/checkpoint.tar", headers=h)
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert {n.split("/", 1)[1]: sha256(b) for n, b in members.items()} == {a["name"]: a["sha256"] for a in listing["data"]}

    # Nothing of the work in progress is left in the artifact store.
    assert not [p for p in (settings.artifact_dir / ".tmp").iterdir() if p.name.startswith(job_id)]

    # The downloaded checkpoint loads with welore_core and computes what a local run computes.
    from welore_core.compression.config import CompressConfig
    from welore_core.compression.pipeline import compress_checkpoint
    from welore_core.loading import load_model

    local = tmp_path / "local"
    compress_checkpoint(str(settings.models_dir / "tiny"), local, CompressConfig.from_options(COMPRESS), device="cpu")
    served = load_model(str(out), device="cpu", dtype=torch.float32)
    reference = load_model(str(local), device="cpu", dtype=torch.float32)
    assert served.meta["factored"] == reference.meta["factored"] and served.meta["factored"]
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = served.model(input_ids=ids).logits, reference.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_damaged_artifact_is_refused_not_served(client, keys, compressed, settings):
    job_id, _ = compressed
    h = keys["A"]
    stored = settings.artifact_dir / "jobs" / job_id / "model.safetensors"
    good = stored.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    try:
        stored.write_bytes(bytes(bad))
        r = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers=h)
        assert r.status_code == 409 and r.json()["error"]["code"] == "artifact_corrupt"
        assert "model.safetensors" in r.json()["error"]["message"]
        assert client.get(f"/v1/jobs/{job_id}/checkpoint.tar", headers=h).status_code == 409
    finally:
        stored.write_bytes(good)
    assert client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors", headers=h).status_code == 200


def _damage_keeping_stat(path) -> None:
    """Flip one byte in place and put the times back: same inode, size and mtime, other bytes."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)[0]
        f.seek(st.st_size // 2)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_damage_that_keeps_the_stat_is_never_served_as_intact(keys, compressed, settings, tmp_path):
    """Bit rot (the stat unchanged, so the recorded check still looks current): a download of the
    file, or of the tar, is cut before its last chunk rather than completed with bad bytes; from
    then on the file is a 409 artifact_corrupt, byte ranges included. Served by uvicorn, as in
    production, to see what a client sees."""
    job_id, _ = compressed
    h = keys["A"]
    stored = settings.artifact_dir / "jobs" / job_id / "model.safetensors"
    good = stored.read_bytes()
    api = ApiServer(settings, tmp_path)
    url = f"{api.url}/v1/jobs/{job_id}/artifacts/model.safetensors"
    try:
        with httpx.Client(timeout=60, headers=h) as c:
            tar = f"{api.url}/v1/jobs/{job_id}/checkpoint.tar"
            for n, (what, target) in enumerate((("download", url), ("tar", tar))):
                aged = time.time() - 600 + n  # a new mtime: the next request re-hashes the restored file
                stored.write_bytes(good)
                os.utime(stored, (aged, aged))  # old enough for its check to be trusted
                r = c.get(url)
                assert r.status_code == 200 and r.content == good  # verified, and the check recorded
                _damage_keeping_stat(stored)
                with pytest.raises(httpx.RemoteProtocolError):  # fewer bytes than Content-Length, then EOF
                    c.get(target)
                r = c.get(url)
                assert r.status_code == 409 and r.json()["error"]["code"] == "artifact_corrupt", (what, r.text[:200])
                assert c.get(url, headers={"Range": "bytes=0-99"}).status_code == 409
                assert c.head(url).status_code == 409
        assert "artifact 'model.safetensors' of job" in api.output()
        assert "Traceback" not in api.output()
    finally:
        api.stop()
        stored.write_bytes(good)


def test_other_keys_cannot_see_the_job(client, keys, compressed):
    job_id, _ = compressed
    for path in ("", "/events", "/metrics", "/artifacts", "/artifacts/welore.json", "/checkpoint.tar"):
        assert client.get(f"/v1/jobs/{job_id}{path}", headers=keys["B"]).status_code == 404, path
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["B"]).status_code == 404
    assert client.post("/v1/jobs", json={"type": "evaluate", "model": job_id, "params": {}},
                       headers=keys["B"]).status_code == 404
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=keys["A"]).status_code == 409


def test_evaluate_the_output_and_a_failing_job(client, keys, compressed):
    job_id, _ = compressed
    h = keys["A"]
    models = {m["id"]: m for m in client.get("/v1/models", headers=h).json()["data"]}
    assert models[job_id]["source"] == "job" and models[job_id]["summary"]["err_achieved"] > 0.29

    ok = client.post("/v1/jobs", json={"type": "evaluate", "model": job_id,
                                       "params": {"data": "boolq", "seq_len": 32, "windows": 3}}, headers=h).json()
    # Too little text for one window: the engine refuses, the job fails with its error.
    small = client.post("/v1/files", files={"file": ("small.txt", b"only a few words here")}, headers=h).json()
    bad = client.post("/v1/jobs", json={"type": "evaluate", "model": "tiny",
                                        "params": {"data": small["id"], "seq_len": 4096, "windows": 1}},
                      headers=h).json()
    ok = wait_for(client, ok["id"], h)
    assert ok["status"] == "succeeded", ok["error"]
    assert ok["result"]["perplexity"] > 1 and ok["result"]["tokens"] == 3 * 31 and ok["result"]["data"] == "boolq"
    assert ok["metrics"]["tokens_per_s"] > 0
    assert client.get(f"/v1/jobs/{ok['id']}/artifacts", headers=h).json()["data"] == []

    bad = wait_for(client, bad["id"], h)
    assert bad["status"] == "failed" and bad["error"]["code"] == "invalid_data"
    assert "fewer than one window" in bad["error"]["message"]
    last = client.get(f"/v1/jobs/{bad['id']}/events", params={"format": "json"}, headers=h).json()[-1]
    assert last["data"] == {"status": "failed", "error": bad["error"]}


def test_cancel_queued_and_running_finetune(client, keys, settings, compressed):
    """WeLore-COFT fine-tuning of the compressed output. The worker runs one job at a time: A runs,
    B waits and is cancelled while queued (it never starts), then A is cancelled mid-training;
    C proves the worker moved past B."""
    h = keys["A"]
    model = compressed[0]
    long_run = {"data": "boolq-passages", "steps": 100000, "batch_size": 1, "seq_len": 16, "eval_every": 0,
                "val_sequences": 1}
    a = client.post("/v1/jobs", json={"type": "finetune", "model": model, "params": long_run}, headers=h).json()
    b = client.post("/v1/jobs", json={"type": "finetune", "model": model, "params": long_run}, headers=h).json()
    cancelled_b = client.post(f"/v1/jobs/{b['id']}/cancel", headers=h)
    assert cancelled_b.status_code == 202 and cancelled_b.json()["status"] == "cancelled"

    # Wait until A trains (its loss arrives as a metric), then cancel it.
    wait_for(client, a["id"], h, statuses=("running",), timeout=300)
    with client.stream("GET", f"/v1/jobs/{a['id']}/events", headers=h) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: ") and '"loss"' in line:
                break
    r = client.post(f"/v1/jobs/{a['id']}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["cancel_requested"], r.json()
    a = wait_for(client, a["id"], h, timeout=120)
    assert a["status"] == "cancelled" and a["error"] is None and a["started_at"]
    assert 0 <= a["progress"] < 1  # progress is written at intervals: a cancel may land before the first write
    metrics = client.get(f"/v1/jobs/{a['id']}/metrics", headers=h).json()
    assert metrics["series"]["loss"] and metrics["final"] is not None
    assert client.get(f"/v1/jobs/{a['id']}/artifacts", headers=h).json()["data"] == []
    assert not (settings.artifact_dir / "jobs" / a["id"]).exists()
    assert not [p for p in (settings.artifact_dir / ".tmp").iterdir() if p.name.startswith(a["id"])]

    c = client.post("/v1/jobs", json={"type": "evaluate", "model": "tiny",
                                      "params": {"data": "boolq", "seq_len": 16, "windows": 1}}, headers=h).json()
    assert wait_for(client, c["id"], h)["status"] == "succeeded"
    b = client.get(f"/v1/jobs/{b['id']}", headers=h).json()
    assert b["status"] == "cancelled" and b["started_at"] is None and b["attempts"] == 0
    assert [e["data"]["status"] for e in client.get(f"/v1/jobs/{b['id']}/events", params={"format": "json"},
                                                    headers=h).json()] == ["queued", "cancelled"]


def test_a_redelivered_task_does_no_harm(client, keys, compressed, settings):
    """Running the task again for a finished job returns at once and changes nothing."""
    from worker.runner import bus_for, run_job

    job_id, events = compressed
    before = client.get(f"/v1/jobs/{job_id}", headers=keys["A"]).json()
    assert run_job(job_id, settings, bus_for(settings)) == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}", headers=keys["A"]).json() == before
    history = client.get(f"/v1/jobs/{job_id}/events", params={"format": "json"}, headers=keys["A"]).json()
    assert len(history) == len(events)
