"""Checks of welore_client against a real running service, shared by the embedded test
(`welore serve` as a process) and the production one (uvicorn + Postgres + Redis + Celery)."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from cutting_proxy import CuttingProxy
from welore_client import (APIConnectionError, AuthenticationError, Client, ConflictError, NotFoundError,
                           ValidationError)

COMPRESS = {"err": 0.3, "min_ratio": 0.0, "calibration": "none"}  # plain SVD: fast on the tiny model
LONG_FINETUNE = {"data": "boolq-passages", "steps": 100000, "batch_size": 1, "seq_len": 16, "eval_every": 0,
                 "val_sequences": 1}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def submit_follow_wait_download(client: Client, out: Path) -> str:
    """compress → events → wait → download, every file verified; a resubmit with the same key is the
    same job; a second download skips identical files."""
    key = f"test-{uuid.uuid4()}"
    job = client.jobs.create("compress", "tiny", COMPRESS, idempotency_key=key)
    assert job.status in ("queued", "running") and job.type == "compress"
    assert client.jobs.create("compress", "tiny", COMPRESS, idempotency_key=key).id == job.id

    events = list(client.jobs.events(job.id))
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0
    assert [e.data["status"] for e in events if e.type == "status"] == ["queued", "running", "succeeded"]
    assert {"load", "spectrum", "factorize", "save"} <= {e.data["stage"] for e in events if e.type == "progress"}
    assert events[-1].is_terminal

    done = client.jobs.wait(job.id, timeout=60)
    assert done.status == "succeeded" and done.progress == 1.0 and abs(done.result["err_achieved"] - 0.3) <= 0.01
    metrics = client.jobs.metrics(job.id)
    assert metrics.series["rss_mb"] and metrics.final["rss_peak_mb"] > 0

    arts = client.jobs.artifacts(job.id)
    files = client.jobs.download(job.id, out)
    assert sorted(f.name for f in files) == sorted(a.name for a in arts)
    assert {"welore.json", "model.safetensors", "config.json"} <= {f.name for f in files}
    for f, a in zip(sorted(files, key=lambda f: f.name), sorted(arts, key=lambda a: a.name)):
        assert f.path == out / a.name and f.path.stat().st_size == a.size and _sha(f.path) == a.sha256
        assert not f.skipped and f.resumed_from == 0
    assert not list(out.rglob("*.part"))
    assert all(f.skipped for f in client.jobs.download(job.id, out))

    report = client.jobs.report(job.id)
    assert report["matrix_types"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert report["layers"] == [0, 1] and len(report["matrices"]) == 14 and report["tau"] is not None
    assert {m["label"] for m in report["matrices"]} <= {"LRC", "N-LRC"}
    return job.id


def resume_partial_download(client: Client, job_id: str, reference: Path, out: Path) -> None:
    """A partial `.part` (a correct prefix) is continued with Range; a wrong prefix is caught by the
    SHA-256 and fetched again whole; a connection reset mid-file resumes where it broke."""
    art = max(client.jobs.artifacts(job_id), key=lambda a: a.size)
    data = (reference / art.name).read_bytes()
    out.mkdir(parents=True)
    half = len(data) // 2
    (out / f"{art.name}.part").write_bytes(data[:half])
    got = {f.name: f for f in client.jobs.download(job_id, out)}
    assert got[art.name].resumed_from == half and _sha(out / art.name) == art.sha256
    assert not (out / f"{art.name}.part").exists()

    (out / art.name).unlink()
    (out / f"{art.name}.part").write_bytes(b"\0" * half)  # same length, wrong bytes
    got = {f.name: f for f in client.jobs.download(job_id, out)}
    assert got[art.name].resumed_from == 0 and _sha(out / art.name) == art.sha256

    # Through a proxy that resets the connection a third of the way into the largest file.
    fresh = out.parent / f"{out.name}-proxied"
    arts = sorted(client.jobs.artifacts(job_id), key=lambda a: a.name)
    before = sum(a.size for a in arts[: [a.name for a in arts].index(art.name)])
    proxy = CuttingProxy(_port(client), [20_000 + before + art.size // 3])
    try:
        with Client(proxy.url, api_key=_key(client), backoff_s=0.05) as flaky:
            got = {f.name: f for f in flaky.jobs.download(job_id, fresh)}
    finally:
        proxy.close()
    assert proxy.connections == 2 and 0 < got[art.name].resumed_from < art.size
    assert all(_sha(fresh / a.name) == a.sha256 for a in arts)


def _port(client: Client) -> int:
    return int(client.base_url.rsplit(":", 1)[1])


def _key(client: Client) -> str:
    return client._transport.http.headers["authorization"].removeprefix("Bearer ")


def events_reconnect(client: Client, job_id: str) -> None:
    """The event stream broken mid-way is reopened with Last-Event-ID: same events, no repeats."""
    direct = [e.seq for e in client.jobs.events(job_id)]
    proxy = CuttingProxy(_port(client), [1500, 800])
    try:
        with Client(proxy.url, api_key=_key(client), backoff_s=0.05) as flaky:
            seqs = [e.seq for e in flaky.jobs.events(job_id)]
            assert seqs == direct and proxy.connections >= 3
            assert [e.seq for e in flaky.jobs.events(job_id, after=direct[2])] == direct[3:]
    finally:
        proxy.close()


def retries_are_safe(client: Client) -> None:
    """A reset after the server took a submit: retried with an idempotency key (one job), never without."""
    before = {j.id for j in client.jobs.list()}
    params = {"data": "boolq", "seq_len": 16, "windows": 1}
    keyed, unkeyed = CuttingProxy(_port(client), [0, 0]), CuttingProxy(_port(client), [0])
    try:
        with Client(keyed.url, api_key=_key(client), backoff_s=0.05) as flaky:
            job = flaky.jobs.create("evaluate", "tiny", params, idempotency_key=f"retry-{uuid.uuid4()}")
        assert keyed.connections == 3  # two resets, then the retry that got the (replayed) job
        with Client(unkeyed.url, api_key=_key(client), backoff_s=0.05) as flaky:
            with pytest.raises(APIConnectionError):
                flaky.jobs.create("evaluate", "tiny", params)
        assert unkeyed.connections == 1  # sent once, not retried
    finally:
        keyed.close()
        unkeyed.close()
    new = [j for j in client.jobs.list() if j.id not in before]
    assert len(new) == 2 and job.id in {j.id for j in new}  # the keyed submit made one job, not three
    for j in new:
        client.jobs.wait(j.id, timeout=120)


def pagination(client: Client) -> None:
    """list() walks every page; filters apply across pages."""
    for _ in range(5):
        job = client.jobs.create("evaluate", "tiny", {"data": "boolq", "seq_len": 16, "windows": 1})
        try:
            client.jobs.cancel(job.id)
        except ConflictError:
            pass  # it finished first
    everything = [j.id for j in client.jobs.list(page_size=200)]
    assert len(everything) >= 6  # the compress job and these five
    assert [j.id for j in client.jobs.list(page_size=2)] == everything
    evaluates = list(client.jobs.list(type="evaluate", page_size=2))
    assert evaluates and all(j.type == "evaluate" for j in evaluates)
    done = list(client.jobs.list(status="succeeded", page_size=1))
    assert done and all(j.status == "succeeded" for j in done)


def cancel(client: Client, compressed_id: str) -> None:
    """A queued job never starts; a running one stops; a finished one → ConflictError (409)."""
    a = client.jobs.create("finetune", compressed_id, LONG_FINETUNE)
    b = client.jobs.create("finetune", compressed_id, LONG_FINETUNE)
    assert client.jobs.cancel(b.id).status == "cancelled"
    for e in client.jobs.events(a.id):
        if e.type == "metric" and "loss" in e.data.get("values", {}):
            break
    assert client.jobs.cancel(a.id).cancel_requested
    assert client.jobs.wait(a.id, timeout=120).status == "cancelled"
    b = client.jobs.get(b.id)
    assert b.status == "cancelled" and b.started_at is None
    with pytest.raises(ConflictError) as exc:
        client.jobs.cancel(a.id)
    assert exc.value.status == 409 and exc.value.message


def error_mapping(client: Client, job_id: str) -> None:
    with pytest.raises(NotFoundError) as nf:
        client.jobs.get("job_doesnotexist")
    assert nf.value.status == 404 and nf.value.code == "not_found" or nf.value.code.endswith("not_found")
    with pytest.raises(ValidationError) as bad:
        client.jobs.create("compress", "tiny", {"err": 1.5})
    assert bad.value.status == 422 and bad.value.code == "invalid_params"
    assert [f["field"] for f in bad.value.fields] == ["params.err"] and "1" in bad.value.fields[0]["allowed"]
    with pytest.raises(NotFoundError) as nm:
        client.jobs.create("compress", "no-such-model", COMPRESS)
    assert nm.value.code == "model_not_found" and "no-such-model" in nm.value.message
    with pytest.raises(ConflictError):
        client.jobs.cancel(job_id)  # it succeeded
    with Client(client.base_url, api_key="wl_wrong") as wrong:
        with pytest.raises(AuthenticationError) as au:
            wrong.jobs.get(job_id)
    assert au.value.status == 401 and au.value.code == "unauthorized" and "WELORE_API_KEY" in au.value.message
    with Client("http://127.0.0.1:9", api_key="wl_x", max_retries=1, backoff_s=0.01) as nowhere:
        with pytest.raises(APIConnectionError, match="2 attempt"):
            nowhere.models.list()


# ---------------------------------------------------------------------------------------------
# The tests, imported by test_client_embedded.py and test_client_pg.py (each defines `client`)


@pytest.fixture(scope="module")
def compressed(client, tmp_path_factory):
    out = tmp_path_factory.mktemp("download")
    return submit_follow_wait_download(client, out), out


def test_submit_events_wait_download(compressed):
    assert compressed[0].startswith("job_")


def test_resume_partial_download(client, compressed, tmp_path):
    resume_partial_download(client, compressed[0], compressed[1], tmp_path / "partial")


def test_events_reconnect_with_last_event_id(client, compressed):
    events_reconnect(client, compressed[0])


def test_retries_only_when_safe(client, compressed):
    retries_are_safe(client)


def test_pagination(client, compressed):
    pagination(client)


def test_cancel(client, compressed):
    cancel(client, compressed[0])


def test_error_mapping(client, compressed):
    error_mapping(client, compressed[0])
