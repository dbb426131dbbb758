"""The web console in a real browser (Debian's chromium via playwright) against `welore serve`:
sign in, see a 422 at its field, submit a compression of the tiny model through the form, watch it
reach `succeeded` over SSE, see the rank map and a chart drawn, download an artifact through its
signed link and check its SHA-256, see the jobs table update live, and /docs render — with no
request leaving the server (everything offline)."""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest

from browser import PAINTED_PIXELS, chromium
from embedded_server import Server
from welore_client import Client


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    s = Server(tmp_path_factory.mktemp("console-home"), models_dir)
    try:
        yield s
    finally:
        s.stop()


def test_console_end_to_end(server):
    from playwright.sync_api import expect

    key = server.api_key()
    with chromium() as browser:
        ctx = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 1000})
        page = ctx.new_page()
        outside, errors = [], []
        page.on("request", lambda r: r.url.startswith((server.url, "data:", "blob:")) or outside.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))

        page.goto(server.url + "/")
        page.fill("#api-key", "wl_not-a-key")
        page.click("#signin button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("invalid or revoked")
        page.fill("#api-key", key)
        page.click("#signin button[type=submit]")
        expect(page.locator("table.jobs")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('welore.apiKey')") == key
        assert page.evaluate("localStorage.length") == 0

        page.click("text=Submit a job")
        form = page.locator("#form-compress")
        expect(form.locator("[name=min_ratio]")).to_be_visible()
        # The form is the OpenAPI schema of the compress params: every field, and each choice list.
        props = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["CompressParams"]["properties"]
        names = form.locator("[data-field^='params.']").evaluate_all("els => els.map(e => e.name)")
        assert sorted(names) == sorted(props)
        choices = next(v["enum"] for v in props["method"].get("anyOf", [props["method"]]) if "enum" in v)
        assert form.locator("[name=method] option").all_inner_texts() == ["(default)", *choices]
        form.locator("#model-compress").fill("tiny")
        form.locator("[name=err]").fill("1.5")
        form.locator("[name=min_ratio]").fill("0")
        form.locator("button[type=submit]").click()
        err = form.locator('[data-error-for="params.err"]')
        expect(err).to_contain_text("less than 1")
        expect(err).to_contain_text("allowed:")  # the range the API's 422 names, and what was sent
        expect(err).to_contain_text("received 1.5")
        assert form.locator('[data-error-for="params.min_ratio"]').inner_text() == ""

        form.locator("[name=err]").fill("0.3")
        form.locator("[name=calibration]").fill("none")  # the plain SVD: fast on the tiny model
        form.locator("button[type=submit]").click()
        page.wait_for_url(re.compile(r"#/jobs/job_\w+$"))
        job_id = page.url.rsplit("/", 1)[1]
        expect(page.locator('.job-head [data-status="succeeded"]')).to_be_visible(timeout=180_000)
        expect(page.locator(".job-head progress")).to_have_attribute("value", "100")
        expect(page.locator("#event-log tr.ev-status")).to_have_count(3)  # queued, running, succeeded

        expect(page.locator("#rank-map td.cell")).to_have_count(14)  # 2 layers × 7 matrix types
        expect(page.locator("#rank-map thead th")).to_have_text(["", "q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"])
        expect(page.locator("#rank-map td.cell").first).to_contain_text("%")
        expect(page.locator('#charts [data-chart="memory"] canvas')).to_be_visible()
        assert page.evaluate(PAINTED_PIXELS, '#charts [data-chart="memory"] canvas') > 100
        expect(page.locator("#result")).to_contain_text("err_achieved")

        with Client(server.url, api_key=key) as client:
            arts = {a.name: a for a in client.jobs.artifacts(job_id)}
        row = page.locator("table.artifacts tr", has=page.locator('[data-download="welore.json"]'))
        expect(row).to_contain_text(arts["welore.json"].sha256)
        with page.expect_download() as dl:
            row.locator("button").click()
        data = open(dl.value.path(), "rb").read()
        assert hashlib.sha256(data).hexdigest() == arts["welore.json"].sha256 and dl.value.suggested_filename == "welore.json"

        # The jobs table updates live: a job submitted elsewhere appears and finishes without a reload.
        page.click("header >> text=Jobs")
        expect(page.locator(f'tr[data-job="{job_id}"] [data-status="succeeded"]')).to_be_visible()
        with Client(server.url, api_key=key) as client:
            other = client.jobs.create("evaluate", "tiny", {"data": "boolq", "seq_len": 16, "windows": 1})
        expect(page.locator(f'tr[data-job="{other.id}"] [data-status="succeeded"]')).to_be_visible(timeout=120_000)
        page.select_option("#filter-type", "compress")
        expect(page.locator(f'tr[data-job="{other.id}"]')).to_have_count(0)

        page.goto(server.url + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("welore", timeout=30_000)
        assert not outside, f"requests left the server: {outside}"
        assert not errors, errors
