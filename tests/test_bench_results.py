"""The sections of BENCHMARKS.md whose rows are kept in the repository (bench/results/) are rendered from
them: compression-recipes (bench/results/recipes-w8.json: every planned row is there) and scale
(bench/results/scale.json); the published tables and goal lines are exactly what `python -m bench.recipes`
and `python -m bench.scale` render from those files (no measurement needed)."""

from __future__ import annotations

import json

from bench import scale
from bench.recipes import SECTION, TITLE, fmt, planned, results_file
from bench.report import read_section


def test_tracked_rows_cover_the_plan_and_render_the_published_section():
    rows = json.loads(results_file(8).read_text())
    assert set(rows) == {"dense"} | {key for key, *_ in planned()}
    rendered = fmt(rows, 8)
    assert "Not measured yet" not in rendered
    published = read_section(SECTION)
    assert published.startswith(TITLE)
    # the first paragraph names the machine and the day it was rendered; everything after it is the measurement
    assert published[len(TITLE):].split("\n\n")[1:] == rendered.split("\n\n")[1:]


def test_scale_section_is_rendered_from_the_tracked_parts():
    saved = json.loads(scale.RESULTS_FILE.read_text())
    assert set(saved) == {"depth", "big"}
    assert read_section(scale.SECTION) == scale.render(saved)
