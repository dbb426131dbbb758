"""Compression recipes compared on the real SmolLM2-135M → the `compression-recipes` section of
BENCHMARKS.md.

For ERR 0.1/0.3/0.5 and params kept 0.8/0.6: the default recipe (calibrated on the shipped general
text, loss allocation) against data-free WeLore and data-free uniform (the paper's setting), and
against WeLore- and uniform-allocation whitening under the default's own calibration (the same
recipe with only `--method` changed); then the default at ERR 0.5 with `--recover 150`. Each row is
one `welore compress … --json` process (its seconds and peak RSS), then `welore eval` on held-out
corpora of domains the calibration text does not hold: CommonsenseQA dev questions with their
choices and answer, the Python documentation's reference topics (read from the stdlib), the
descriptions of the Python packages installed beside welore (their METADATA: READMEs of software),
and CMake's reference documentation where Debian's cmake-data is installed. Which choices looked at
which corpus: the damping switch the first three, the heavy targets' calibration windows all four
(checked on a fifth, GNU info manuals), the library source in the calibration text one variant measured
on all four, nothing tuned (docs/research/damping.md, calibration-samples.md, calibration-text.md).

Rows are saved as they finish (`--results`, default bench/results/recipes-w<windows>.json, kept in the
repository), so an interrupted run resumes where it stopped and a fresh checkout re-renders the section
without measuring anything; delete a row there to re-measure it. The
run uses a spectrum cache of its own (a fresh temporary directory): the first calibrated row pays
the calibration pass, later rows with the same calibration reuse it, as a user's would.
Usage: python -m bench.recipes [--windows 8] [--results bench/results/recipes-w8.json] [--only KEY ...] [--skip KEY ...]
       [--adopt KEY CHECKPOINT REPORT] (a row whose long compression ran apart)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from pathlib import Path
from typing import Callable

from bench.report import RESULTS, machine, table, welore_json as cli
from welore_core.compression import config as cfg
from welore_core.compression.config import CompressConfig

MODEL = "smollm2-135m"
TARGETS = [("err", 0.1), ("err", 0.3), ("err", 0.5), ("params_kept", 0.8), ("params_kept", 0.6)]
UNROUNDED = ["--rank-multiple", "1"]  # the baselines keep any rank (as the paper and the default before ranks rounded)
VARIANTS = [  # label, extra flags
    ("default recipe", []),
    ("default recipe, --rank-multiple 1", UNROUNDED),
    ("data-free WeLore", ["--calibration", "none", *UNROUNDED]),
    ("data-free uniform", ["--calibration", "none", "--method", "uniform", *UNROUNDED]),
    ("whitened, WeLore allocation", ["--method", "welore", *UNROUNDED]),
    ("whitened, uniform allocation", ["--method", "uniform", *UNROUNDED]),
]
RECOVER = [("err", 0.5, 150)]
GOALS = {("err", 0.3): 2.0, ("err", 0.5): 8.0}
RECOVER_GOAL = 2.5
WARMUP = ["--calibration", "none"]  # first row: converts the GGUF and fills the spectrum cache (not reported)


def corpora(work: Path, data_dir: Path) -> dict[str, Path]:
    """Held-out text of other domains as JSONL files (`text` per line)."""
    import pydoc_data.topics as topics

    def csqa(obj: dict) -> str:
        q = obj["question"]
        choices = " ".join(f"({c['label']}) {c['text']}" for c in q["choices"])
        answer = next((c["text"] for c in q["choices"] if c["label"] == obj.get("answerKey")), "")
        return f"Question: {q['stem']} Choices: {choices} Answer: {answer}"

    def package_docs() -> list[str]:
        from importlib.metadata import distributions

        docs = {}
        for d in distributions():
            body = d.metadata.get_payload() or d.metadata.get("Description") or ""
            if len(body) > 1000:
                docs.setdefault(d.metadata["Name"].lower(), body)
        return [docs[k] for k in sorted(docs)]

    rows = (data_dir / "commonsenseqa" / "dev_rand_split.jsonl").read_text().splitlines()
    texts = {"csqa": [csqa(json.loads(r)) for r in rows if r.strip()],
             "pydoc": [topics.topics[k] for k in sorted(topics.topics)],
             "pkgdoc": package_docs()}
    cmake = sorted(Path("/usr/share").glob("cmake-*/Help/**/*.rst"))  # Debian's cmake-data; absent → no column
    if cmake:
        texts["cmake"] = [p.read_text(errors="replace") for p in cmake]
    out = {}
    for name, items in texts.items():
        out[name] = work / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
    return out


def evaluate(model: str, files: dict[str, Path], windows: int) -> dict[str, float]:
    return {name: cli("eval", model, "--data", f, "--windows", windows)["perplexity"] for name, f in files.items()}


def planned() -> list[tuple[str, str, float, str, list]]:
    """Every row of the table in its order: (key, target kind, target value, label, extra flags)."""
    recover = {(kind, v): steps for kind, v, steps in RECOVER}
    rows = []
    for kind, v in TARGETS:
        variants = VARIANTS + ([(f"default recipe + --recover {recover[kind, v]}", ["--recover", recover[kind, v]])]
                               if (kind, v) in recover else [])
        rows += [(f"{kind}={v} | {label}", kind, v, label, flags) for label, flags in variants]
    return rows


def run_rows(work: Path, files: dict[str, Path], windows: int, results: Path, wanted: Callable[[str], bool]) -> dict:
    done = json.loads(results.read_text()) if results.is_file() else {}

    def save(key: str, row: dict) -> None:
        done[key] = {**row, "measured": date.today().isoformat()}
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(done, indent=1))
        print(f"{key}: {json.dumps({k: v for k, v in row.items() if k != 'report'})}", file=sys.stderr, flush=True)

    if "dense" not in done:
        cli("compress", MODEL, "--err", "0.3", *WARMUP, "--out", work / "warmup", "--overwrite")
        save("dense", {"ppl": evaluate(MODEL, files, windows)})
    # cheap rows first (light targets share one cached calibration pass), the default before its baselines
    todo = sorted(planned(), key=lambda t: (CompressConfig(**{t[1]: t[2]}).heavy(), "--recover" in t[4],
                                            t[3] != "default recipe"))
    for key, kind, value, label, flags in todo:
        if key in done or not wanted(key):
            continue
        out = work / "ckpt"
        r = cli("compress", MODEL, f"--{kind.replace('_', '-')}", value, *flags, "--out", out, "--overwrite")
        save(key, row(kind, value, label, r, evaluate(str(out), files, windows)))
    return done


def row(kind: str, value: float, label: str, report: dict, ppl: dict) -> dict:
    """A table row from `welore compress --json`'s report and the checkpoint's held-out perplexities."""
    return {"kind": kind, "value": value, "label": label, "err": report["err_achieved"],
            "params_kept": report["params_kept_achieved"], "seconds": report["seconds"],
            "compress_seconds": report["compress_seconds"], "peak_rss_mb": report["peak_rss_mb"],
            "quality": report.get("quality"), "ppl": ppl,
            **({"recovery": {k: v for k, v in report["recovery"].items() if k != "loss_curve"}}
               if report.get("recovery") else {})}


def adopt(work: Path, windows: int, results: Path, key: str, checkpoint: Path, report: Path) -> dict:
    """Row `key` from a checkpoint already compressed by its row's command (`report`: a file whose last line is
    that command's `--json` output), measured on the held-out corpora: a long compression run apart."""
    from welore_core.settings import get_core_settings

    (_, kind, value, label, flags), = [t for t in planned() if t[0] == key]
    rep = json.loads(Path(report).read_text().strip().splitlines()[-1])
    recipe = json.loads((Path(checkpoint) / "welore.json").read_text())["recipe"]
    expected = CompressConfig.from_options(_options(kind, value, flags)).resolve().to_dict()
    if {k: v for k, v in recipe.items() if k != "dtype"} != {k: v for k, v in expected.items() if k != "dtype"}:
        raise SystemExit(f"{checkpoint} was not compressed by row {key!r}'s recipe:\n{recipe}\n{expected}")
    files = corpora(work, Path(get_core_settings().data_dir))
    done = json.loads(results.read_text()) if results.is_file() else {}
    done[key] = {**row(kind, value, label, rep, evaluate(str(checkpoint), files, windows)),
                 "measured": date.today().isoformat()}
    results.write_text(json.dumps(done, indent=1))
    return done


def _options(kind: str, value: float, flags: list) -> dict:
    """A row's flags (each `--name value`) as the flat options of CompressConfig.from_options."""
    opts, it = {kind: value}, iter(map(str, flags))
    for flag in it:
        name = flag[2:].replace("-", "_")
        opts[name] = cfg.OPTIONS[name].type(next(it))
    return opts


SECTION, TITLE = "compression-recipes", "## Compression recipes: quality at equal ERR and at equal parameters\n\n"
NAMES = {"csqa": "CSQA", "pydoc": "pydoc", "pkgdoc": "pkg docs", "cmake": "CMake docs"}


def fmt(rows: dict, windows: int) -> str:
    dense = rows["dense"]["ppl"]
    head = ["target", "recipe", "ERR", "params kept"]
    for c in dense:
        head += [f"ppl {NAMES.get(c, c)}", "× dense"]
    head += ["quality check ×", "s", "peak RSS MB"]
    body = [["dense", "-", "-", "1", *[v for c in dense for v in (f"{dense[c]:.2f}", "1.00×")], "-", "-", "-"]]
    lines = []
    order = [key for key, *_ in planned()]
    for key in sorted((k for k in rows if k != "dense"), key=lambda k: order.index(k) if k in order else len(order)):
        r = rows[key]
        q = r.get("quality") or {}
        body.append([f"{'ERR' if r['kind'] == 'err' else 'params kept'} {r['value']}", r["label"], f"{r['err']:.3f}",
                     f"{r['params_kept']:.3f}",
                     *[v for c in dense for v in ((f"{r['ppl'][c]:.2f}", f"{r['ppl'][c] / dense[c]:.2f}×")
                                                  if c in r["ppl"] else ("-", "-"))],
                     f"{q['ratio']:.2f}×" if q else "-", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:,.0f}"])

    def worst(r: dict) -> tuple[float, str]:
        return max((r["ppl"][c] / dense[c], NAMES.get(c, c)) for c in dense if c in r["ppl"])

    for (kind, value), goal in GOALS.items():
        r = rows.get(f"{kind}={value} | default recipe")
        if r:
            w, where = worst(r)
            lines.append(f"Goal {kind} {value}: default ≤ {goal:g}× dense on every corpus — worst {w:.2f}× ({where}; "
                         f"{'met' if w <= goal else 'not met'}).")
    for kind, value in TARGETS:
        if kind != "params_kept":
            continue
        rs = {lab: rows.get(f"{kind}={value} | {lab}") for lab in ("default recipe", "whitened, WeLore allocation",
                                                                    "whitened, uniform allocation")}
        if all(rs.values()):
            lost = [NAMES.get(c, c) for c in dense if all(c in r["ppl"] for r in rs.values())
                    and not rs["default recipe"]["ppl"][c] < min(rs[b]["ppl"][c] for b in list(rs)[1:])]
            lines.append(f"Goal params kept {value}: default better than both whitened allocations on every corpus — "
                         + ("met." if not lost else f"not met on {', '.join(lost)}."))
    for kind, value, steps in RECOVER:
        r = rows.get(f"{kind}={value} | default recipe + --recover {steps}")
        if r:
            w, where = worst(r)
            base = rows.get(f"{kind}={value} | default recipe") or {}
            stale = (f" This row was measured on {r.get('measured')}, before the default row it builds on "
                     f"({base.get('measured')}): it shows the default recipe of its own date."
                     if r.get("measured", "") < base.get("measured", "") else "")
            lines.append(f"Goal {kind} {value} + --recover {steps}: ≤ {RECOVER_GOAL:g}× dense on every corpus — worst "
                         f"{w:.2f}× ({where}; {'met' if w <= RECOVER_GOAL else 'not met'}).{stale}")
    free, default = rows.get("err=0.1 | data-free WeLore"), rows.get("err=0.1 | default recipe")
    if free and default:  # the run's first calibrated row: it pays the calibration pass
        d_default, d_free = default.get("measured", "?"), free.get("measured", "?")
        when = (f"measured in one run on {d_default}" if d_default == d_free
                else f"the default measured on {d_default}, data-free on {d_free}: two runs, so the ratio is rough")
        lines.append(f"Cost: the default's first `welore compress` (ERR 0.1, cold: one calibration pass and the "
                     f"sensitivity pass) took {default['seconds']:.0f} s against {free['seconds']:.0f} s data-free "
                     f"({default['seconds'] / free['seconds']:.0f}×), {when}; heavy targets (sequential, compensated) "
                     "take the seconds in their rows.")
    missing = [k for k in order if k not in rows]
    if missing:
        lines.append("Not measured yet (`python -m bench.recipes` measures what its --results lacks): "
                     + "; ".join(missing) + ".")
    by_date: dict[str, list[str]] = {}
    for k, r in rows.items():
        by_date.setdefault(r.get("measured", "?"), []).append(k)
    if len(by_date) > 1:  # rows carried from an earlier run (--results keeps them until they are deleted)
        *earlier, latest = sorted(by_date)
        lines.append(f"Rows measured before {latest} (kept in --results; delete a row there to re-measure it; seconds "
                     "compare only within one date, each run having had its own machine and load): "
                     + "; ".join(f"{d}: {len(by_date[d])} rows" for d in earlier)
                     + f". Measured on {latest}: " + "; ".join(by_date[latest]) + ".")
    intro = (f"`python -m bench.recipes` — {machine()}. SmolLM2-135M; perplexity on {windows} windows × 512 tokens "
             "of held-out corpora of domains the calibration text does not hold: CommonsenseQA dev questions, "
             "Python's reference documentation, the descriptions (METADATA) of the Python packages installed "
             "beside welore, and CMake's reference documentation (reStructuredText, Debian's cmake-data; a column "
             "only where it is installed). The damping switch (docs/research/damping.md) was chosen on the first "
             "three; the library source in the calibration text (docs/research/calibration-text.md) was one "
             "variant measured on all four, nothing tuned; the heavy targets' calibration windows "
             "(docs/research/calibration-samples.md) were chosen on all four and checked on a fifth no choice had "
             "seen (GNU info manuals). Default recipe = `welore compress MODEL --err F` with "
             "nothing else: calibrated on the shipped general text (generated documents, Wikipedia, word problems, "
             f"puzzles, Python library source; {cfg.SAMPLES} × 512 tokens), loss allocation (whitened truncation "
             "error weighted by the loss's sensitivity to each matrix, docs/research/allocation-objective.md), "
             "sequential and "
             f"compensated from ERR {cfg.HEAVY_FROM_ERR:g} (params kept {1 - cfg.HEAVY_FROM_ERR:g}), from ERR "
             f"{cfg.HEAVY_CALIBRATION_FROM_ERR:g} (params kept {1 - cfg.HEAVY_CALIBRATION_FROM_ERR:g}) whitening damping "
             f"{cfg.HEAVY_DAMP:g} instead of {cfg.DAMP:g} and {cfg.HEAVY_SAMPLES} calibration windows "
             "(docs/research/calibration-samples.md). `whitened, … allocation` = the same recipe with only `--method` changed. "
             "`quality check ×` = the ratio the command itself reported on its held-out slice. Seconds and peak RSS: "
             "the whole `welore compress` process (load, calibration, compression, quality check, write), with a "
             "spectrum cache fresh at the start of the run: the first calibrated row at a light target pays the "
             "calibration pass, later rows reuse its dense statistics where their recipe can (as a second compression "
             "of the same model does).")
    return "\n\n".join([intro, table(head, body), *lines])


def results_file(windows: int) -> Path:
    """Where the rows measured so far are kept (in the repository: the section re-renders without measuring)."""
    return RESULTS / f"recipes-w{windows}.json"


def quality_section(work: Path, windows: int, results: Path, wanted: Callable[[str], bool] = lambda key: True) -> str:
    from welore_core.settings import get_core_settings

    files = corpora(work, Path(get_core_settings().data_dir))
    return fmt(run_rows(work, files, windows, results, wanted), windows)


def main() -> int:
    import tempfile

    from bench.report import write_section

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--results", type=Path, default=None,
                    help="rows measured so far (default bench/results/recipes-w<windows>.json)")
    ap.add_argument("--only", nargs="*", default=[], help="run only rows whose key contains one of these")
    ap.add_argument("--skip", nargs="*", default=[], help="do not run rows whose key contains one of these")
    ap.add_argument("--adopt", nargs=3, metavar=("KEY", "CHECKPOINT", "REPORT"),
                    help="measure row KEY on CHECKPOINT, compressed apart by the row's command (REPORT: a file whose "
                         "last line is its --json output), then render")
    args = ap.parse_args()
    results = args.results or results_file(args.windows)
    if args.adopt:
        with tempfile.TemporaryDirectory() as d:
            adopt(Path(d), args.windows, results, args.adopt[0], Path(args.adopt[1]), Path(args.adopt[2]))
    with tempfile.TemporaryDirectory() as d:
        os.environ["WELORE_CACHE_DIR"] = str(Path(d) / "cache")  # inherited by every `welore` child
        body = quality_section(Path(d), args.windows, results, lambda key: not args.adopt and (
            not args.only or any(o in key for o in args.only)) and not any(o in key for o in args.skip))
    print(body)
    write_section(SECTION, TITLE + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
