"""What rounding every kept rank to a multiple costs: the loss allocation's own estimate at a target.

`stats`: one calibration pass of the default recipe (the dense pass and the sensitivities, both cached in
the spectrum cache, so the real compression reuses them) saved as the allocator's inputs; `estimate`: for
each multiple, the allocation's objective Σ c_W·Σ_{i≥k} σ_i² (estimated loss increase, relative to the
unrounded allocation), its distinct factored shapes and the budget it reached.

    python -m bench.rank_multiple stats --err 0.5 --stats /work/wt/cache/alloc/stats-err0.5.pt
    python -m bench.rank_multiple estimate --stats /work/wt/cache/alloc/stats-err0.5.pt [--write]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

MULTIPLES = (1, 8, 16, 32, 64)


class _Captured(Exception):
    pass


def gather(model: str, err, params_kept, path: str) -> None:
    """Run the default recipe's compression up to its allocation and save what the allocation sees."""
    from welore_core.compression import model as cm
    from welore_core.compression.calibration import load_calibration
    from welore_core.compression.config import CompressConfig
    from welore_core.loading import load_model

    config = CompressConfig(err=err, params_kept=params_kept).resolve()
    loaded = load_model(model)
    calib = load_calibration(loaded.tokenizer, config.calibration)
    captured = {}

    def allocate(spectra, method, err, params_kept, min_ratio, tolerance=None, weights=None, **kw):
        captured.update(values=[v.double() for v in spectra.values], shapes=list(spectra.shapes),
                        names=list(spectra.names), weights=list(weights), min_ratio=min_ratio,
                        err=err, params_kept=params_kept, recipe=config.to_dict())
        raise _Captured

    cm.allocate = allocate
    t0 = time.perf_counter()
    try:
        cm.compress_model(loaded.model, config, calib)
    except _Captured:
        pass
    torch.save(captured, path)
    print(f"saved {len(captured['values'])} spectra and weights to {path} in {time.perf_counter() - t0:.0f} s")


def objective(alloc, values, weights) -> float:
    from welore_core.compression.allocation import loss_terms
    return sum(float(loss_terms(S, w)[p.kept]) for p, S, w in zip(alloc.plans, values, weights))


def estimate(path: str, multiples=MULTIPLES, target: dict | None = None) -> list[list]:
    """Rows per multiple; `target` ({"err": v} or {"params_kept": v}) replaces the saved one (the same
    calibration serves every target of the same heavy/light class)."""
    from welore_core.compression.allocation import allocate_loss

    st = torch.load(path)
    if target:
        st = {**st, "err": None, "params_kept": None, **target}
    values, shapes, weights = st["values"], st["shapes"], st["weights"]
    total = sum(w * float((S ** 2).sum()) for S, w in zip(values, weights))
    weights = [w / total for w in weights]
    rows, base = [], None
    for mult in multiples:
        alloc = allocate_loss(values, shapes, weights, err=st["err"], params_kept=st["params_kept"],
                              min_ratio=st["min_ratio"], rank_multiple=mult)
        obj = objective(alloc, values, weights)
        base = obj if base is None else base
        factored = [p for p in alloc.plans if p.factored]
        shapes_f = {(p.shape, p.kept) for p in factored}
        rows.append([mult, f"{alloc.err:.4f}", f"{alloc.params_kept:.4f}", f"{obj:.5f}", f"{obj / base:.3f}",
                     len(factored), len(shapes_f), len({p.kept for p in factored})])
    return rows


HEADER = ["multiple", "ERR", "params kept", "est. loss increase", "vs multiple 1", "factored", "distinct shapes",
          "distinct ranks"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("stats", "estimate"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--err", type=float)
    ap.add_argument("--params-kept", type=float)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--write", action="store_true", help="estimate both targets → BENCHMARKS.md § rank-multiple")
    a = ap.parse_args(argv)
    if a.what == "stats":
        gather(a.model, a.err, a.params_kept, a.stats)
        return 0
    target = {"err": a.err} if a.err is not None else {"params_kept": a.params_kept} if a.params_kept else None
    if not a.write:
        rows = estimate(a.stats, target=target)
        print(" | ".join(HEADER))
        for r in rows:
            print(" | ".join(map(str, r)))
        return 0
    from bench.report import machine, table, write_section

    body = (f"## Rank multiple: what rounding the ranks costs (`python -m bench.rank_multiple`)\n\n{machine()}. "
            "SmolLM2-135M, the default recipe's calibration at ERR 0.5 (128 windows, damping 0.3; the same serves "
            "params kept 0.6): the loss allocation's own objective Σ c_W·Σ_{i≥k} σ_i² (estimated loss increase) per "
            "rank multiple, against the unrounded allocation; distinct shapes = distinct (out×in, rank) of the "
            "factored matrices.\n\n")
    for t in ({"err": 0.5}, {"params_kept": 0.6}):
        kind, value = next(iter(t.items()))
        body += f"{kind} {value}:\n\n" + table(HEADER, estimate(a.stats, target=t)) + "\n\n"
    body += READING
    print(body)
    write_section("rank-multiple", body.rstrip())
    return 0


READING = (
    "Reading: at ERR 0.5 the allocation keeps many matrices at their min_ratio cap (287 of 576 ranks for gate/up/down, "
    "95 of 192 for k/v; both factored), and a multiple of 32 rounds them down to 256 and 64. Scaled by the unrounded "
    "default's measured log-perplexity increase (ppl ratio r ⇒ r^(estimate ratio − 1)), multiple 8 projects to "
    "+1.0–1.6 % perplexity on the held-out corpora, 16 to +2.3–3.8 %, 32 to +5.4–8.9 %, 64 to +4.7–7.7 % (k/v, of "
    "rank below 4·64, are not rounded). At params kept 0.6 every multiple costs under 1.2 % of the estimate. The "
    "per-GEMM speed gain of alignment is already there at 8 (§ factor-speed). "
    "Default: 8; the measured perplexity of the ERR 0.5 default: § compression-recipes.")


if __name__ == "__main__":
    sys.exit(main())
