"""Debian's chromium driven by playwright (never a browser download of playwright's own):
scripts/setup installs /usr/bin/chromium and the python package."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: run scripts/setup as root (it apt-get installs chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


PAINTED_PIXELS = """sel => { const c = document.querySelector(sel); if (!c) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""
