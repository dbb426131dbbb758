"""The later rounds of the calibration benchmark (`python bench/calibration.py
--sequential-study` / `--mixed-study` / `--generated-study` / `--sink-study` /
`--compensate-study` / `--compensated-coft-study` / `--task-coft-study`): each study is a list of
compression rows and of WeLore-COFT rows started from them (each run right after its start),
measured one process per row by bench/calibration.py's `run_child`, written to its own
BENCHMARKS.md section, and resumable row by row (`--resume-study` reuses a row measured with
identical settings; the section names the machine that measured the dense row).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.calibration import GOALS, HEADERS, MODEL, fmt_row, run_child
from bench.report import machine, table, write_section

SEQUENTIAL = {"factorization": "whitened", "sequential": True}
COMPENSATED = {**SEQUENTIAL, "compensate": True}
WHITENED = {"factorization": "whitened"}
MIXED = {"samples": 64, "calib_text": "mixed"}
GENERATED = {"samples": 64, "calib_text": "generated"}
COMPENSATED_MIXED = "whitened, mixed text, sequential, compensated"


def _distilled(batch: int, lr: str = "", text: str = "generated",
               source: str = "whitened, BoolQ text, sequential", named: str = "") -> tuple:
    """A distilled COFT row on the data file `text` (generated: sampled from the dense model) from the
    ERR 0.5 row `source`; `named` names the text in the label (default: the file's key)."""
    return (source, f"150 COFT steps distilled, on {named or text} text, batch {batch}" + (f", lr {lr}" if lr else ""),
            {"teacher": MODEL, **({"lr": float(lr)} if lr else {})}, {"coft_text": text, "coft_batch": batch})


# A study: compression rows (ERR, min_ratio, label, compress_model keyword arguments, extra child
# settings), then COFT rows (label of the ERR 0.5 row it starts from, label, finetune options,
# extra child settings); optional "base" (child settings for every row, the dense one included)
# and "generate" (text to sample from the dense model first: sequences, tokens, batch).
STUDIES = {
    "calibration-sequential": {
        "title": "Calibration-aware WeLore, second round: sequential mode at every ERR, more calibration "
                 "tokens, then WeLore-COFT",
        "flag": "--sequential-study", "results": "sequential-study.json", "notes": "calibration_notes.md",
        "about": "Same model, calibration text and held-out corpora as the first section",
        "rows": [
            (0.1, 0.0, "whitened, weight ranks, sequential", SEQUENTIAL, {}),
            (0.1, 0.0, "whitened, weight ranks, 64 samples", WHITENED, {"samples": 64}),
            (0.1, 0.0, "whitened, weight ranks, 64 samples, damp 1e-3", {**WHITENED, "damp": 1e-3}, {"samples": 64}),
            (0.3, 0.5, "whitened, weight ranks, sequential", SEQUENTIAL, {}),
            (0.3, 0.5, "whitened, weight ranks, 64 samples", WHITENED, {"samples": 64}),
            (0.5, 0.5, "whitened, weight ranks, sequential", SEQUENTIAL, {}),
            (0.5, 0.5, "whitened, weight ranks, sequential, 64 samples", SEQUENTIAL, {"samples": 64}),
            (0.3, 0.5, "whitened, weight ranks, 256 samples", WHITENED, {"samples": 256}),
            (0.5, 0.5, "whitened, weight ranks, sequential, 256 samples", SEQUENTIAL, {"samples": 256}),
        ],
        "coft": [("whitened, weight ranks, sequential, 64 samples", "150 COFT steps", {}, {})],
    },
    "calibration-mixed": {
        "title": "Calibration-aware WeLore, third round: calibration text mixing domains, COFT distilled "
                 "from the dense model",
        "flag": "--mixed-study", "results": "mixed-study.json", "notes": "calibration_mixed_notes.md",
        "about": "Same model and held-out corpora as the first section, and its calibration text (BoolQ passages) "
                 "where a row does not say mixed. **Mixed text** = the BoolQ calibration passages, each followed by "
                 "two SVAMP math word problems and one coin-flip puzzle with their answers (CommonsenseQA, the "
                 "other-domain evaluation text, is not in it)",
        "rows": [
            (0.1, 0.0, "whitened, BoolQ text", WHITENED, {"samples": 64}),
            (0.1, 0.0, "whitened, mixed text", WHITENED, MIXED),
            (0.1, 0.0, "whitened, mixed text, damp 0.1", {**WHITENED, "damp": 0.1}, MIXED),
            (0.3, 0.5, "whitened, BoolQ text", WHITENED, {"samples": 64}),
            (0.3, 0.5, "whitened, mixed text", WHITENED, MIXED),
            (0.5, 0.5, "whitened, BoolQ text, sequential", SEQUENTIAL, {"samples": 64}),
            (0.5, 0.5, "whitened, mixed text, sequential", SEQUENTIAL, MIXED),
            (0.5, 0.5, "whitened, activation ranks, BoolQ text, sequential", {**SEQUENTIAL, "rank_from": "activations"},
             {"samples": 64}),
        ],
        "coft": [
            ("whitened, BoolQ text, sequential", "150 COFT steps", {}, {}),
            ("whitened, BoolQ text, sequential", "150 COFT steps distilled", {"teacher": MODEL}, {}),
            ("whitened, BoolQ text, sequential", "150 COFT steps distilled, on mixed text", {"teacher": MODEL},
             {"coft_text": "mixed"}),
            ("whitened, BoolQ text, sequential", "150 COFT steps distilled, on mixed text, batch 8",
             {"teacher": MODEL}, {"coft_text": "mixed", "coft_batch": 8}),
            ("whitened, BoolQ text, sequential", "150 COFT steps distilled, on mixed text, batch 16",
             {"teacher": MODEL}, {"coft_text": "mixed", "coft_batch": 16}),
        ],
    },
    "calibration-generated": {
        "title": "Calibration-aware WeLore, fourth round: text the model generates itself, for calibration "
                 "and for distilled COFT",
        "flag": "--generated-study", "results": "generated-study.json", "notes": "calibration_generated_notes.md",
        "about": "Same model and held-out corpora as the first section, float32 weights unless a row says bf16. "
                 "**Generated text** = sequences sampled from the dense model itself (bf16), each from a random "
                 "first token at temperature 1 (no evaluation corpus in it); **mixed text** as in the third round",
        "generate": {"sequences": 512, "tokens": 512, "batch": 256},
        "base": {"dtype": "float32"},
        "rows": [
            (0.5, 0.5, "whitened, BoolQ text, sequential", SEQUENTIAL, {"samples": 64}),
            (0.5, 0.5, "whitened, generated text, sequential", SEQUENTIAL, GENERATED),
            (0.1, 0.0, "whitened, mixed text, sequential", SEQUENTIAL, MIXED),
            (0.5, 0.5, "whitened, BoolQ text, sequential, bf16 model", SEQUENTIAL,
             {"samples": 64, "dtype": "bfloat16"}),
        ],
        "coft": [_distilled(16), _distilled(16, "5e-4"), _distilled(64, "1e-3"), _distilled(16, "1e-4"),
                 _distilled(64), _distilled(64, "1e-4"), _distilled(64, "3e-4"), _distilled(128)],
    },
    "calibration-sink": {
        "title": "Calibration-aware WeLore, fifth round: weighting the attention sink in the calibration statistics",
        "flag": "--sink-study", "results": "sink-study.json", "notes": "calibration_sink_notes.md",
        "about": "Same model, held-out corpora and calibration texts (BoolQ passages; mixed text as in the third "
                 "round) as the sections above. **sink weight W** = `--sink-weight W`: the first token of every "
                 "calibration window counts W times in the Gram matrices",
        "rows": [
            (0.1, 0.0, "whitened, mixed text", WHITENED, MIXED),
            (0.1, 0.0, "whitened, mixed text, sink weight 64", {**WHITENED, "sink_weight": 64}, MIXED),
            (0.1, 0.0, "whitened, mixed text, sink weight 512", {**WHITENED, "sink_weight": 512}, MIXED),
            (0.1, 0.0, "whitened, mixed text, sink weight 4096", {**WHITENED, "sink_weight": 4096}, MIXED),
            (0.1, 0.0, "whitened, BoolQ text, sink weight 512", {**WHITENED, "sink_weight": 512}, {"samples": 64}),
            (0.3, 0.5, "whitened, BoolQ text, sink weight 512", {**WHITENED, "sink_weight": 512}, {"samples": 64}),
            (0.3, 0.5, "whitened, mixed text, sink weight 512", {**WHITENED, "sink_weight": 512}, MIXED),
            (0.5, 0.5, "whitened, BoolQ text, sequential", SEQUENTIAL, {"samples": 64}),
            (0.5, 0.5, "whitened, BoolQ text, sequential, sink weight 64", {**SEQUENTIAL, "sink_weight": 64},
             {"samples": 64}),
            (0.5, 0.5, "whitened, BoolQ text, sequential, sink weight 512", {**SEQUENTIAL, "sink_weight": 512},
             {"samples": 64}),
        ],
        "coft": [],  # the sink weight does not help at ERR 0.5 (see the notes): nothing new to fine-tune
    },
    "calibration-compensated": {
        "title": "Calibration-aware WeLore, sixth round: o_proj and down_proj fitted to the dense blocks' outputs",
        "flag": "--compensate-study", "results": "compensate-study.json", "notes": "calibration_compensated_notes.md",
        "about": "Same model, held-out corpora and calibration texts (BoolQ passages; mixed text as in the third "
                 "round) as the sections above. **compensated** = `--sequential --compensate`: each layer's o_proj "
                 "and down_proj are fitted to the dense attention / MLP block's outputs given the layer's other "
                 "matrices already compressed, then truncated whitened",
        "rows": [
            (0.5, 0.5, "whitened, BoolQ text, sequential", SEQUENTIAL, {"samples": 64}),
            (0.5, 0.5, "whitened, BoolQ text, sequential, compensated", COMPENSATED, {"samples": 64}),
            (0.5, 0.5, "whitened, mixed text, sequential, compensated", COMPENSATED, MIXED),
            (0.3, 0.5, "whitened, mixed text", WHITENED, MIXED),
            (0.3, 0.5, "whitened, BoolQ text, sequential, compensated", COMPENSATED, {"samples": 64}),
            (0.3, 0.5, "whitened, mixed text, sequential, compensated", COMPENSATED, MIXED),
            (0.1, 0.0, "whitened, mixed text, sink weight 64", {**WHITENED, "sink_weight": 64}, MIXED),
            (0.1, 0.0, "whitened, mixed text, sequential, compensated, sink weight 64",
             {**COMPENSATED, "sink_weight": 64}, MIXED),
        ],
        "coft": [("whitened, BoolQ text, sequential, compensated", "150 COFT steps distilled, on mixed text",
                  {"teacher": MODEL}, {"coft_text": "mixed"}),
                 ("whitened, mixed text, sequential, compensated", "150 COFT steps distilled, on mixed text",
                  {"teacher": MODEL}, {"coft_text": "mixed"})],
    },
    "calibration-compensated-coft": {
        "title": "Calibration-aware WeLore, seventh round: WeLore-COFT at GPU batch sizes from the compensated start",
        "flag": "--compensated-coft-study", "results": "compensated-coft-study.json",
        "notes": "calibration_compensated_coft_notes.md",
        "about": "Same model and held-out corpora as the first section, float32 weights. The start is the sixth "
                 "round's best ERR 0.5 compression (`--sequential --compensate`, mixed text as in the third round); "
                 "**generated text** as in the fourth round (sampled from the dense model, bf16)",
        "generate": {"sequences": 512, "tokens": 512, "batch": 256},
        "base": {"dtype": "float32"},
        "rows": [(0.5, 0.5, COMPENSATED_MIXED, COMPENSATED, MIXED)],
        "coft": [_distilled(64, source=COMPENSATED_MIXED), _distilled(64, text="mixed", source=COMPENSATED_MIXED),
                 _distilled(64, "1e-4", source=COMPENSATED_MIXED), _distilled(128, source=COMPENSATED_MIXED)],
    },
    "calibration-task-coft": {
        "title": "Calibration-aware WeLore, eighth round: WeLore-COFT on text of the evaluated task",
        "flag": "--task-coft-study", "results": "task-coft-study.json", "notes": "calibration_task_coft_notes.md",
        "about": "Same model and held-out corpora as the first section, float32 weights, and the seventh round's "
                 "start (compensated ERR 0.5 on mixed text). As WeLore fine-tunes per task, COFT is distilled "
                 "here on text of the evaluated task: **CommonsenseQA train** items, formatted like the dev "
                 "items evaluated (none of which it sees); **BoolQ + CommonsenseQA train** = the calibration "
                 "passages, each followed by two of those items",
        "goal_text": "held-out text (CommonsenseQA dev items: of the fine-tuning task, unseen)",
        "base": {"dtype": "float32"},
        "rows": [(0.5, 0.5, COMPENSATED_MIXED, COMPENSATED, MIXED)],
        "coft": [_distilled(8, text="csqa_train", source=COMPENSATED_MIXED, named="CommonsenseQA train"),
                 _distilled(8, text="task_mixed", source=COMPENSATED_MIXED, named="BoolQ + CommonsenseQA train")],
    },
}


def generate_text(args, base: dict, spec: dict, results: dict, measure) -> None:
    """Sample the study's generated text once (kept beside the other data files; --gen-sequences /
    --gen-tokens override the study's size)."""
    path = Path(base["workdir"]) / "generated.jsonl"
    base["files"]["generated"] = str(path)
    gen = {**spec["generate"], **{k: v for k, v in (("sequences", args.gen_sequences),
                                                     ("tokens", args.gen_tokens)) if v}}
    gen["batch"] = min(gen["batch"], gen["sequences"])
    cfg = {**base, "label": "generated", "generate": gen}
    if not path.is_file():
        results.pop("generated", None)
    measure("generated", cfg)


def run_study(args, base: dict, name: str) -> int:
    """Run (or with --resume-study, complete) one study into its own BENCHMARKS.md section."""
    spec = STUDIES[name]
    base = {**base, **spec.get("base", {})}
    workdir = Path(base["workdir"])
    saved = workdir / spec["results"]
    results: dict = json.loads(saved.read_text()) if args.resume_study and saved.is_file() else {}

    def measure(key: str, cfg: dict) -> dict:
        """The row's result: from the saved results with --resume-study (same settings), else run. The
        `files` map is left out of the comparison: a row names the files it reads in its own keys, so a
        data file added for another row does not rerun it."""
        old = results.get(key)
        if old is None or "failed" in old or {**old.get("settings", {}), "files": None} != {**cfg, "files": None}:
            results[key] = {**run_child(cfg), "settings": cfg}
            print(key, results[key], flush=True)
        return results[key]

    if "generate" in spec:
        generate_text(args, base, spec, results, measure)
    dense = measure("dense", {**base, "label": "dense"})
    rows, coft_rows = [fmt_row(dense, dense)], []
    samples = {extra.get("samples", args.samples) for *_, extra in spec["rows"]}
    fixed = all("samples" in extra for *_, extra in spec["rows"])  # rows name their own sample count
    coft = f" --coft-batch {args.coft_batch} --coft-lr {args.coft_lr}" if spec["coft"] else ""
    command = (f"`python bench/calibration.py {spec['flag']}{'' if fixed else f' --samples {args.samples}'} "
               f"--windows {args.windows}{coft}`")
    if len(samples) == 1:
        command += f" ({samples.pop()} calibration windows × {args.seq_len} tokens in every row)"

    def save(notes=()):
        body = [f"## {spec['title']}", "",
                f"{command} — {dense.get('machine') or machine()}. {spec['about']}. Evaluated on {args.windows} "
                f"windows × {args.eval_seq_len} tokens per corpus (compare ratios within this table). `(n new)`: the SVDs a row "
                "computed; 0 when an earlier run had cached them (its seconds are then mostly loading).", "",
                table(HEADERS, rows)]
        if coft_rows:
            body += ["", f"Then WeLore-COFT: {args.coft_steps} steps × {args.coft_batch} × {args.coft_seq_len} tokens "
                     f"of the row's calibration text, lr {args.coft_lr} (unless a row names its text, batch or rate), "
                     f"`--precision {args.coft_precision}`; "
                     f"*distilled* = `--teacher {MODEL}` (loss: KL to the dense model's next-token distribution):", "",
                     table(HEADERS, coft_rows), "",
                     "Training speed (bf16 autocast, this machine): " + "; ".join(
                         f"{r['label']}: {r['coft']['tokens_per_s']:.0f} tokens/s, {r['coft']['train_seconds']:.0f} s"
                         for k, r in results.items()
                         if k.startswith("coft/") and (r.get("coft") or {}).get("tokens_per_s")) + "."]
        write_section(name, "\n".join(body) + "\n\n" + "\n\n".join(notes))
        saved.write_text(json.dumps(results, indent=2, default=str))

    for err, mr, label, kw, extra in spec["rows"]:
        cfg = {**base, **extra, "label": label, "err": err, "min_ratio": mr, "kw": kw}
        rows.append(fmt_row(measure(f"{err}/{label}", cfg), dense, err, mr))
        save()
        # the COFT rows that start from this compression, right after it
        for source, tuned, options, more in spec["coft"] if args.coft_steps else ():
            if source != label or err != 0.5:  # (COFT starts from the ERR 0.5 row of that label)
                continue
            tuned = tuned.replace("150 COFT steps", f"{args.coft_steps} COFT steps")  # labels name the default
            r = measure(f"coft/{source}/{tuned}", {
                **cfg, "label": f"{source} + {tuned}", "coft_steps": args.coft_steps,
                "coft_batch": args.coft_batch, "coft_seq_len": args.coft_seq_len, **more,
                "coft_options": {"lr": args.coft_lr, "precision": args.coft_precision, **options}})
            start = fmt_row(results[f"{err}/{source}"], dense, err, mr)
            coft_rows += ([] if start in coft_rows else [start]) + [fmt_row(r, dense, err, mr)]
            save()
    notes = []
    for err, goal in GOALS.items():
        ratios = [r.get("ppl_csqa", float("inf")) / dense["ppl_csqa"] for k, r in results.items()
                  if k.startswith(f"{err}/")]
        if not ratios:  # not measured in this study
            continue
        notes.append(f"Goal ERR {err}: ≤ {goal}× dense on other-domain text — best here {min(ratios):.3f}× "
                     f"({'met' if min(ratios) <= goal else 'not met'}).")
    tuned = [r.get("ppl_csqa", float("inf")) / dense["ppl_csqa"] for k, r in results.items() if k.startswith("coft/")]
    if tuned:
        notes.append(f"Goal ERR 0.5 + {args.coft_steps} COFT steps: ≤ 2× dense on "
                     f"{spec.get('goal_text', 'other-domain text')} — best here "
                     f"{min(tuned):.3f}× ({'met' if min(tuned) <= 2 else 'not met'}).")
    notes_file = Path(__file__).with_name(spec["notes"])
    if notes_file.is_file():
        notes.append(notes_file.read_text().strip())
    save(notes)
    return 0
