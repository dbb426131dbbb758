"""The one end-to-end test with the real SmolLM2-135M through the service (Postgres, Redis, a
real celery worker): compress it at ERR 0.3, download its welore.json, evaluate the output."""

from __future__ import annotations

import json
import math

import pytest

from helpers import read_sse, wait_for

pytestmark = [pytest.mark.service, pytest.mark.real_model]


def test_smollm2_compress_and_evaluate_through_the_service(client, keys, celery_worker):
    h = keys["A"]
    r = client.post("/v1/jobs", json={"type": "compress", "model": "smollm2-135m",
                                      "params": {"err": 0.3, "min_ratio": 0.5, "calibration": "none"}}, headers=h)
    assert r.status_code == 202, r.json()
    job_id = r.json()["id"]
    events = read_sse(client, job_id, h)
    assert events[-1]["data"]["status"] == "succeeded", events[-1]
    job = client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert abs(job["result"]["err_achieved"] - 0.3) <= 0.01
    assert job["result"]["params_after"] < job["result"]["params_before"]

    meta = json.loads(client.get(f"/v1/jobs/{job_id}/artifacts/welore.json", headers=h).content)
    # every LRC is factored except those whose factors would not be faster (stored as a dense Ŵ)
    assert meta["method"] == "welore" and 0 < len(meta["factored"]) <= job["result"]["n_lrc"]
    assert len(meta["factored"]) == sum(m["storage"] == "factors" for m in meta["matrices"])
    assert meta["source"]["model"] == "smollm2-135m"

    ev = client.post("/v1/jobs", json={"type": "evaluate", "model": job_id,
                                       "params": {"data": "boolq", "seq_len": 128, "windows": 2}}, headers=h).json()
    ev = wait_for(client, ev["id"], h, timeout=600)
    assert ev["status"] == "succeeded", ev["error"]
    assert math.isfinite(ev["result"]["perplexity"]) and ev["result"]["perplexity"] > 1
    assert ev["result"]["tokens"] == 2 * 127
