"""Screenshots of every console page: starts `welore serve` (embedded, in a temporary home),
runs a compression and a short fine-tuning of MODEL through welore_client, then saves with
Debian's chromium (playwright) the sign-in, jobs, job (compress: rank map, spectrum; finetune:
loss / perplexity / throughput / memory charts), submit (a 422 at its field) pages and /docs.

    python scripts/screenshots.py [--model smollm2-135m] [--out docs/screenshots]

Costs on two CPU cores with the SmolLM2-135M: ~2-4 minutes (the spectra are cached after the first run).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "service")]

from browser import chromium  # noqa: E402
from embedded_server import Server  # noqa: E402
from welore_client import Client  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--err", type=float, default=0.5)
    ap.add_argument("--calibration", default="none", help="calibration text of the compression (none: plain SVD)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server (finally below) on a kill
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WELORE_CACHE_DIR", str(Path.home() / ".cache" / "welore"))
    os.environ.setdefault("WELORE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "models").mkdir()
        server = Server(Path(home), Path(home) / "models")
        try:
            key = server.api_key()
            with Client(server.url, api_key=key) as client:
                comp = client.jobs.create("compress", args.model, {"err": args.err, "min_ratio": 0.5,
                                                                    "calibration": args.calibration})
                print(f"compress {comp.id}: {client.jobs.wait(comp.id, timeout=1800).status}", flush=True)
                ft = client.jobs.create("finetune", comp.id, {"data": "boolq-passages", "steps": args.steps,
                                                             "batch_size": 2, "seq_len": 64, "eval_every": 4,
                                                             "val_sequences": 8})
                print(f"finetune {ft.id}: {client.jobs.wait(ft.id, timeout=1800).status}", flush=True)
            shoot(server.url, key, comp.id, ft.id, out)
        finally:
            server.stop()
    for p in sorted(out.glob("*.png")):
        print(p)
    return 0


def shoot(url: str, key: str, comp_id: str, ft_id: str, out: Path) -> None:
    with chromium() as browser:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(url + "/")
        page.wait_for_selector("#signin")
        page.screenshot(path=str(out / "signin.png"))
        page.fill("#api-key", key)
        page.click("#signin button[type=submit]")
        page.wait_for_selector(f'tr[data-job="{comp_id}"]')
        page.screenshot(path=str(out / "jobs.png"))
        page.goto(f"{url}/#/jobs/{comp_id}")
        page.wait_for_selector("#rank-map td.cell")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "job-compress.png"), full_page=True)
        page.goto(f"{url}/#/jobs/{ft_id}")
        page.wait_for_selector('#charts [data-chart="loss"] canvas')
        page.wait_for_selector("table.artifacts")
        page.wait_for_timeout(500)
        page.screenshot(path=str(out / "job-finetune.png"), full_page=True)
        page.goto(f"{url}/#/submit")
        form = page.locator("#form-compress")
        form.locator("[name=err]").fill("1.5")
        form.locator("button[type=submit]").click()
        page.wait_for_selector('[data-error-for="params.err"]:not(:empty)')
        page.screenshot(path=str(out / "submit.png"), full_page=True)
        page.goto(url + "/docs")
        page.wait_for_selector(".swagger-ui .info .title")
        page.screenshot(path=str(out / "docs.png"))


if __name__ == "__main__":
    sys.exit(main())
