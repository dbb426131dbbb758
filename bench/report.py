"""The benchmark harness shared by the scripts in bench/: running a `welore` command as its own
process (its JSON report, its seconds and peak RSS), markdown tables, the machine description, and
writing one section of BENCHMARKS.md (between `<!-- bench:NAME -->` markers) without touching the
others."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
RESULTS = Path(__file__).resolve().parent / "results"  # the rows each section is rendered from (tracked)
HEADER = "# Benchmarks\n\nWritten by the scripts in `bench/`; each section is replaced whole by its script.\n"


def welore_json(*args, env: dict | None = None) -> dict:
    """`welore ARGS --json` in a process of its own → its JSON report (a failure raises with its stderr)."""
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", *map(str, args), "--json"], capture_output=True,
                          text=True, cwd=BENCHMARKS.parent, env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                                                 **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"welore {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) >= 1e4 or abs(v) < 1e-3 and v != 0 else f"{v:.4g}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return f"{dev}; torch {torch.__version__}; Python {platform.python_version()}; {_dt.date.today().isoformat()}"


def _section(name: str) -> re.Pattern:
    return re.compile(rf"<!-- bench:{re.escape(name)} -->\n(.*?)\n<!-- /bench:{re.escape(name)} -->", re.S)


def read_section(name: str) -> str | None:
    """The body of the section `name` of BENCHMARKS.md, as `write_section` wrote it (None where absent)."""
    m = _section(name).search(BENCHMARKS.read_text()) if BENCHMARKS.exists() else None
    return m.group(1) if m else None


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
    pattern = _section(name)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS.write_text(text)
