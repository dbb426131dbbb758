"""API behaviour against the real Postgres (a database made for the run, migrated with Alembic):
auth, validation, idempotency, pagination, cancel of queued jobs, uploads, models, refusals.
Jobs here go to a queue no worker reads, so they stay queued."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import make_client, parse_sse, service_env

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def idle_client(settings):
    idle = settings.model_copy(update={"queue_prefix": settings.queue_prefix + "_idle"})
    with make_client(idle) as c:
        yield c


def _eval(c, h, **params):
    return c.post("/v1/jobs", json={"type": "evaluate", "model": "tiny", "params": params}, headers=h)


def test_health_and_ready(idle_client):
    assert idle_client.get("/healthz").json() == {"status": "ok"}
    r = idle_client.get("/readyz")
    assert r.status_code == 200, r.json()
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "artifact_store": "ok",
                                  "artifact_store_space": "ok"}
    assert r.json()["artifact_store_free_bytes"] > 0
    assert r.json()["mode"] == "distributed"


def test_migrations_match_the_models(pg_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from api import migrate
    from api.models import Base

    assert migrate.current(pg_url) == "0004"
    engine = create_engine(pg_url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_auth_is_required(idle_client):
    r = idle_client.get("/v1/jobs")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert idle_client.get("/v1/jobs", headers={"Authorization": "Bearer wl_nope"}).status_code == 401
    assert idle_client.get("/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    assert idle_client.post("/v1/files", files={"file": ("a.txt", b"hi")}).status_code == 401


def test_invalid_params_name_the_field_and_range(idle_client, key):
    r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": {"err": 1.5}}, headers=key)
    assert r.status_code == 422
    field = r.json()["error"]["fields"][0]
    assert field["field"] == "params.err" and field["allowed"] == "0.0 < value < 1.0" and field["received"] == 1.5
    assert "params.err" in r.json()["error"]["message"]

    r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": {"err": 0.2, "params_kept": 0.5}},
                         headers=key)
    assert r.status_code == 422 and "exactly one of 'err'" in r.json()["error"]["message"]

    r = idle_client.post("/v1/jobs", json={"type": "finetune", "model": "tiny", "params": {"data": "boolq", "steps": 0}},
                         headers=key)
    assert r.status_code == 422
    assert r.json()["error"]["fields"][0]["field"] == "params.steps"
    assert r.json()["error"]["fields"][0]["allowed"] == "1 ≤ value ≤ 1000000"

    r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": {"err": 0.2, "bogus": 1}},
                         headers=key)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "params.bogus"
    assert "min_ratio" in r.json()["error"]["fields"][0]["allowed"]

    r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny",
                                           "params": {"err": 0.2, "calibration": "boolq", "sink_weight": 0}},
                         headers=key)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "params.sink_weight"

    r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny",
                                           "params": {"err": 0.2, "calibration": "boolq", "compensate": "maybe"}},
                         headers=key)
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "params.compensate"

    for params, message in (({"err": 0.2, "calibration": "none", "method": "loss"}, "needs calibration"),
                            ({"err": 0.2, "sequential": False, "compensate": True}, "enable sequential"),
                            ({"err": 0.2, "calibration": "none", "calib_samples": 8}, "calib_samples need calibration")):
        r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": params}, headers=key)
        assert r.status_code == 422 and message in r.json()["error"]["message"], r.json()  # the recipe's cross-checks

    r = idle_client.post("/v1/jobs", json={"type": "train", "model": "tiny", "params": {}}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_params"

    r = _eval(idle_client, key, data="no-such-dataset")
    assert r.status_code == 422 and r.json()["error"]["fields"][0]["field"] == "params.data"


def test_unknown_model_or_file_is_404(idle_client, key, settings):
    for model in ("no-such-model", "../tiny", "/etc", "~/models", "org/not-in-cache", "job_doesnotexist"):
        r = idle_client.post("/v1/jobs", json={"type": "evaluate", "model": model, "params": {}}, headers=key)
        assert r.status_code == 404, (model, r.json())
        assert r.json()["error"]["code"] == "model_not_found"
    r = _eval(idle_client, key, data="file_0123456789abcdef01234567")
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    # A folder under the models directory without config.json is no model either.
    (settings.models_dir / "empty").mkdir(exist_ok=True)
    assert idle_client.post("/v1/jobs", json={"type": "evaluate", "model": "empty", "params": {}},
                            headers=key).status_code == 404


def test_job_ids_as_models_must_be_finished_checkpoints(idle_client, key, keys):
    queued = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": {"err": 0.2}},
                              headers=key).json()
    r = idle_client.post("/v1/jobs", json={"type": "evaluate", "model": queued["id"], "params": {}}, headers=key)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_not_ready"
    ev = _eval(idle_client, key).json()
    r = idle_client.post("/v1/jobs", json={"type": "evaluate", "model": ev["id"], "params": {}}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_model"
    r = idle_client.post("/v1/jobs", json={"type": "evaluate", "model": queued["id"], "params": {}}, headers=keys["B"])
    assert r.status_code == 404


def test_submit_returns_202_and_the_job(idle_client, key):
    r = idle_client.post("/v1/jobs", json={"type": "compress", "model": "smollm2-135m", "params": {"params_kept": 0.6}},
                         headers=key)
    assert r.status_code == 202
    job = r.json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["started_at"] is None
    assert job["params"] == {"params_kept": 0.6, "merged": False, "recover": 0}  # recipe defaults: CompressConfig's
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    got = idle_client.get(f"/v1/jobs/{job['id']}", headers=key).json()
    assert got["id"] == job["id"] and got["queue"].endswith(".gpu")


def test_idempotency_key(idle_client, key, keys):
    body = {"type": "evaluate", "model": "tiny", "params": {"seq_len": 64}}
    h = {**key, "Idempotency-Key": "abc-123"}
    first = idle_client.post("/v1/jobs", json=body, headers=h)
    again = idle_client.post("/v1/jobs", json=body, headers=h)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    changed = idle_client.post("/v1/jobs", json={**body, "params": {"seq_len": 65}}, headers=h)
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_conflict"
    other = idle_client.post("/v1/jobs", json=body, headers={**keys["B"], "Idempotency-Key": "abc-123"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    listed = idle_client.get("/v1/jobs", headers=key).json()["data"]
    assert [j["id"] for j in listed] == [first.json()["id"]]


def test_list_is_newest_first_with_cursor_and_filters(idle_client, key):
    ids = [_eval(idle_client, key, windows=i + 1).json()["id"] for i in range(5)]
    compress = idle_client.post("/v1/jobs", json={"type": "compress", "model": "tiny", "params": {"err": 0.1}},
                                headers=key).json()["id"]
    seen, after = [], None
    while True:
        params = {"limit": 2, "type": "evaluate"} | ({"after": after} if after else {})
        page = idle_client.get("/v1/jobs", params=params, headers=key).json()
        seen += [j["id"] for j in page["data"]]
        after = page["next_cursor"]
        if after is None:
            break
    assert seen == ids[::-1]
    everything = idle_client.get("/v1/jobs", params={"limit": 200}, headers=key).json()
    assert [j["id"] for j in everything["data"]] == [compress, *ids[::-1]] and everything["next_cursor"] is None
    assert idle_client.get("/v1/jobs", params={"status": "succeeded"}, headers=key).json()["data"] == []
    assert len(idle_client.get("/v1/jobs", params={"status": "queued"}, headers=key).json()["data"]) == 6
    assert idle_client.get("/v1/jobs", params={"limit": 0}, headers=key).status_code == 422
    assert idle_client.get("/v1/jobs", params={"status": "done"}, headers=key).status_code == 422
    assert idle_client.get("/v1/jobs", params={"after": "job_unknown"}, headers=key).status_code == 422


def test_cancel_a_queued_job(idle_client, key, keys):
    job = _eval(idle_client, key).json()
    assert idle_client.post(f"/v1/jobs/{job['id']}/cancel", headers=keys["B"]).status_code == 404
    r = idle_client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)
    assert r.status_code == 202 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = idle_client.post(f"/v1/jobs/{job['id']}/cancel", headers=key)
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    events = idle_client.get(f"/v1/jobs/{job['id']}/events", params={"format": "json"}, headers=key).json()
    assert [(e["seq"], e["data"]["status"]) for e in events] == [(0, "queued"), (1, "cancelled")]
    with idle_client.stream("GET", f"/v1/jobs/{job['id']}/events", headers=key) as r:  # ends at once
        assert [e["data"]["status"] for e in parse_sse(r.read().decode())] == ["queued", "cancelled"]


def test_cross_key_access_is_404(idle_client, key, keys):
    job = _eval(idle_client, key).json()
    other = keys["B"]
    for path in ("", "/events?format=json", "/metrics", "/artifacts", "/artifacts/config.json", "/checkpoint.tar"):
        r = idle_client.get(f"/v1/jobs/{job['id']}{path}", headers=other)
        assert r.status_code == 404, path
    assert job["id"] not in [j["id"] for j in idle_client.get("/v1/jobs", headers=other).json()["data"]]


def test_metric_series_are_downsampled_to_a_bound(idle_client, key, settings):
    """A long job's thousands of metric events: each series at most `max_points` (1000 by default),
    evenly spaced, its first and last points kept."""
    from api.db import session_scope
    from api.events import store

    job_id = _eval(idle_client, key).json()["id"]
    with session_scope(settings.db_url) as s:
        store.add_events(s, job_id, [store.make_event(seq, "metric", {"stage": "train", "step": seq,
                                                                       "values": {"loss": 1 / seq, "lr": 0.1}})
                                     for seq in range(1, 3001)])
    series = idle_client.get(f"/v1/jobs/{job_id}/metrics", headers=key).json()["series"]
    assert {k: len(v) for k, v in series.items()} == {"loss": 1000, "lr": 1000}
    few = idle_client.get(f"/v1/jobs/{job_id}/metrics", params={"max_points": 4}, headers=key).json()["series"]
    assert [p["step"] for p in few["loss"]] == [1, 1001, 2000, 3000] and few["loss"][-1]["value"] == 1 / 3000
    assert idle_client.get(f"/v1/jobs/{job_id}/metrics", params={"max_points": 1}, headers=key).status_code == 422


def test_artifact_paths_outside_the_job_are_refused(idle_client, key):
    job = _eval(idle_client, key).json()
    for name in ("../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "config.json", "/etc/passwd"):
        r = idle_client.get(f"/v1/jobs/{job['id']}/artifacts/{name}", headers=key)
        assert r.status_code == 404, name
    assert idle_client.get(f"/v1/jobs/{job['id']}/artifacts", headers=key).json()["data"] == []
    assert idle_client.get(f"/v1/jobs/{job['id']}/checkpoint.tar", headers=key).status_code == 409


def test_upload_files(idle_client, key, keys):
    good = b'{"text": "hello world"}\n\n{"prompt": "2+2=", "completion": " 4"}\n'
    r = idle_client.post("/v1/files", files={"file": ("train.jsonl", good, "application/jsonl")}, headers=key)
    assert r.status_code == 201, r.json()
    f = r.json()
    assert f["format"] == "jsonl" and f["records"] == 2 and f["size"] == len(good)
    assert idle_client.get(f"/v1/files/{f['id']}", headers=key).json() == f
    assert idle_client.get(f"/v1/files/{f['id']}", headers=keys["B"]).status_code == 404
    # the file can be named as data; another key cannot use it
    assert _eval(idle_client, key, data=f["id"]).status_code == 202
    assert idle_client.post("/v1/jobs", json={"type": "evaluate", "model": "tiny", "params": {"data": f["id"]}},
                            headers=keys["B"]).status_code == 404

    bad = b'{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n{"text": "never read"}\n'
    r = idle_client.post("/v1/files", files={"file": ("bad.jsonl", bad)}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["line"] == 3
    assert r.json()["error"]["message"].startswith("line 3: not valid JSON")
    r = idle_client.post("/v1/files", files={"file": ("bad.jsonl", b'{"label": 1}\n')}, headers=key)
    assert r.status_code == 422 and "line 1: no usable fields" in r.json()["error"]["message"]
    r = idle_client.post("/v1/files", files={"file": ("x.csv", b"a,b\n")}, headers=key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_file_type"
    r = idle_client.post("/v1/files", files={"file": ("big.txt", b"x" * (300 * 1024))}, headers=key)
    assert r.status_code == 413
    r = idle_client.post("/v1/files", files={"file": ("t.txt", "plain text ünïcode".encode())}, headers=key)
    assert r.status_code == 201 and r.json()["format"] == "txt"


def test_models_lists_registry_and_models_dir(idle_client, key):
    data = idle_client.get("/v1/models", headers=key).json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["smollm2-135m"]["source"] == "registry" and by_id["smollm2-135m"]["available"]
    assert by_id["tiny"]["source"] == "models_dir"


def test_openapi_documents_the_api(idle_client):
    spec = idle_client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events",
                 "/v1/jobs/{job_id}/metrics", "/v1/jobs/{job_id}/artifacts", "/v1/jobs/{job_id}/artifacts/{name}",
                 "/v1/jobs/{job_id}/checkpoint.tar", "/v1/files", "/v1/files/{file_id}", "/v1/models",
                 "/healthz", "/readyz"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert '"exclusiveMaximum": 1' in json.dumps(schemas["CompressParams"]["properties"]["err"])
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    for (method, path), op in ops.items():
        codes = set(op["responses"])
        if path.startswith("/v1/"):
            no_params = path in ("/v1/models", "/v1/datasets") or (method, path) == ("GET", "/v1/files")
            signed_link = path.startswith("/v1/links/")  # authorised by its signature, not a key
            assert {"401", "422"} <= codes or (no_params and "401" in codes) or signed_link, (method, path, codes)
        if "{job_id}" in path or "{file_id}" in path:
            assert "404" in codes, (method, path)
    assert {"409", "415", "503"} <= set(ops[("POST", "/v1/jobs")]["responses"])
    assert {"413", "415"} <= set(ops[("POST", "/v1/files")]["responses"])
    assert "416" in ops[("GET", "/v1/jobs/{job_id}/artifacts/{name}")]["responses"]
    assert ("HEAD", "/v1/jobs/{job_id}/artifacts/{name}") in ops
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_keys_cli_uses_the_server_database(settings, idle_client):
    env = service_env(settings)
    out = subprocess.run([sys.executable, "-m", "welore_core.cli", "keys", "create", "--name", "cli"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    new_key = out.stdout.strip().splitlines()[-1]
    assert new_key.startswith("wl_")
    assert idle_client.get("/v1/jobs", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    from api.auth.keys import list_keys
    from api.db import session_scope

    with session_scope(settings.db_url) as s:
        stored = [k for k in list_keys(s) if k.name == "cli"]
    assert len(stored) == 1 and stored[0].key_hash != new_key and new_key[3:] not in stored[0].key_hash


def test_layering_api_imports_no_torch_and_core_no_web_stack():
    code = ("import sys; import api.app, api.cli, worker.celery_app, worker.tasks, worker.runner;"
            "api.app.create_app(); print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    core = subprocess.run([sys.executable, "-c", "import sys, welore_core.pipelines, welore_core.compression.pipeline, "
                           "welore_core.finetune, "
                           "welore_core.cli; print([m for m in ('fastapi', 'sqlalchemy', 'celery', 'redis', "
                           "'starlette') if m in sys.modules])"], capture_output=True, text=True, timeout=120)
    assert core.returncode == 0, core.stderr
    assert core.stdout.strip() == "[]"


def test_a_job_is_enqueued_once_on_the_gpu_queue(idle_client, key, settings):
    import redis

    prefix = settings.queue_prefix + "_idle"
    r = redis.Redis.from_url(settings.redis_url)
    before = {q: r.llen(f"{prefix}.{q}") for q in ("gpu", "light")}
    job = _eval(idle_client, key).json()
    after = {q: r.llen(f"{prefix}.{q}") for q in ("gpu", "light")}
    assert after == {"gpu": before["gpu"] + 1, "light": before["light"]}
    message = json.loads(r.lindex(f"{prefix}.gpu", 0))
    assert message["headers"]["task"] == "welore.run_job" and job["id"] in message["headers"]["argsrepr"]
    r.close()


def test_broker_down_is_not_ready_and_a_submit_is_kept_for_the_reaper(settings, key):
    """With the broker unreachable, /readyz says so, and a submit is accepted and kept queued with
    its message unsent; its retries with the same Idempotency-Key replay it (one job, never a failed
    one per attempt), and the reaper sends it once the broker is back."""
    import datetime as dt

    from api.db import session_scope
    from api.jobs.reaper import reap_once
    from api.models import Job, utcnow

    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    body = {"type": "evaluate", "model": "tiny", "params": {}}
    with make_client(down) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("error")
        assert r.json()["checks"]["database"] == "ok"
        first = c.post("/v1/jobs", json=body, headers={**key, "Idempotency-Key": "retry-me"})
        assert first.status_code == 202 and first.json()["status"] == "queued", first.json()
        retry = c.post("/v1/jobs", json=body, headers={**key, "Idempotency-Key": "retry-me"})
        assert retry.json()["id"] == first.json()["id"] and retry.headers["idempotent-replayed"] == "true"
        assert [j["id"] for j in c.get("/v1/jobs", headers=key).json()["data"]] == [first.json()["id"]]
    idle = settings.model_copy(update={"queue_prefix": settings.queue_prefix + "_idle"})
    with session_scope(settings.db_url) as s:  # as if the heartbeat timeout had passed
        job = s.get(Job, first.json()["id"])
        assert job.undispatched_since is not None
        job.undispatched_since, job.queue = utcnow() - dt.timedelta(seconds=settings.heartbeat_timeout_s + 1), \
            idle.queue("gpu")
    with make_client(idle) as c:  # the broker is back
        reap_once(idle, c.app.state.bus, c.app.state.dispatcher.enqueue)
    with session_scope(settings.db_url) as s:
        assert s.get(Job, first.json()["id"]).undispatched_since is None
