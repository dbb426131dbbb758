"""Where a factored linear layer stops paying: F.linear(x, W) against F.linear(F.linear(x, A), B), 1 thread.

For each real shape (SmolLM2-135M's and Llama-3-8B's out×in), dtype and batch, the speed-up of the
factors over the dense matrix at ranks k whose stored size k·(m+n) is a fraction ρ of m·n; and, per
rank multiple, the speed of the factors at multiples of it against neighbouring unrounded ranks.
Writes BENCHMARKS.md § factor-speed and its rows to bench/results/factor-speed.json
(`python -m bench.factor_speed [--quick] [--render]`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.report import RESULTS, machine, table, write_section

SMOL = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
RATIOS = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # ρ = k·(m+n)/(m·n)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BATCHES = (1, 8)


def race(dense, factored, budget: float) -> tuple[float, float]:
    """Seconds per call of `dense` and of `factored`: calls timed one by one, alternating, and the 10th
    percentile of each taken (a shared machine's preemptions land in the slow tail, not in the ratio)."""
    for _ in range(3):
        dense()
        factored()
    d, f = [], []
    t_end = time.perf_counter() + budget
    while time.perf_counter() < t_end or len(d) < 15:
        t0 = time.perf_counter()
        dense()
        t1 = time.perf_counter()
        factored()
        f.append(time.perf_counter() - t1)
        d.append(t1 - t0)
    return _low(d), _low(f)


def _low(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 10]


def rank_at(m: int, n: int, ratio: float, multiple: int = 8) -> int:
    return max(multiple, int(ratio * m * n / (m + n)) // multiple * multiple)


def operands(m: int, n: int, k: int, dtype: torch.dtype, batch: int):
    x, W = torch.randn(batch, n, dtype=dtype), torch.randn(m, n, dtype=dtype) / n ** 0.5
    A, B = torch.randn(k, n, dtype=dtype) / n ** 0.5, torch.randn(m, k, dtype=dtype) / k ** 0.5
    return (lambda: F.linear(x, W)), (lambda: F.linear(F.linear(x, A), B))


def speedup(m: int, n: int, k: int, dtype: torch.dtype, batch: int, budget: float) -> tuple[float, float]:
    """(dense seconds, dense/factored) at rank k."""
    with torch.inference_mode():
        d, f = race(*operands(m, n, k, dtype, batch), budget)
    return d, d / f


def break_even_rows(shapes, budget: float) -> list[list]:
    rows = []
    for (m, n) in shapes:
        for dname, dtype in DTYPES.items():
            for b in BATCHES:
                res = [speedup(m, n, rank_at(m, n, r), dtype, b, budget) for r in RATIOS]
                dense = min(d for d, _ in res)
                rows.append([f"{m}×{n}", dname, b, f"{dense * 1e6:.0f}"] + [f"{s:.2f}×" for _, s in res])
                print(rows[-1], flush=True)
    return rows


OFFSETS = (-33, -32, -17, -16, -9, -8, -1, 0)  # ranks R+d around R, a multiple of 64: aligned to 32, 16, 8, 64


def multiple_rows(shapes, budget: float) -> list[list]:
    """Per shape, dtype and batch: the factors' speed-up over dense at ranks R+d around R (the multiple of 64
    nearest half the break-even rank), so that a multiple's rank sits beside an unaligned one a step below."""
    rows = []
    for (m, n) in shapes:
        R = rank_at(m, n, 0.5, 64)
        for dname, dtype in DTYPES.items():
            for b in BATCHES:
                cells = [speedup(m, n, R + d, dtype, b, budget)[1] for d in OFFSETS]
                rows.append([f"{m}×{n}", dname, b, R] + [f"{c:.2f}×" for c in cells])
                print(rows[-1], flush=True)
    return rows


RESULTS_FILE = RESULTS / "factor-speed.json"
READING = (
    "Reading (the rule `stores_factors`, FACTOR_BREAK_EVEN = 0.75): in fp32 the factors beat the dense matrix at "
    "every SmolLM2 shape up to ρ = 0.625 (1.11–1.32× at batch 1, 1.30–1.60× at batch 8) and are about even at ρ = "
    "0.75 (0.96–1.12× at batch 1, 1.22–1.28× at batch 8); from ρ = 0.875 they lose at batch 1. So an LRC is stored "
    "as factors only below ρ = 0.75 (the A factors of q/k/v and gate/up, fused into one GEMM, make the small shapes "
    "cheaper still), else as its truncated dense Ŵ, and the budgets count it at m·n. In bf16 (PyTorch's CPU "
    "kernels) a small GEMM costs more than in fp32 (192×576: 21 µs against 9 µs), so two calls lose at 192×576 at "
    "every ρ, and at 576×576 at batch 1: a kernel cost no storage rule removes. The Llama-8B rows (weights of 16–235 MB, memory-"
    "bound) were measured beside other work on a 2-core machine and vary from cell to cell (ratios above 1× at ρ = 1 "
    "are that noise); they agree that ρ ≤ 0.75 pays. Rank alignment: at batch 8 in fp32 a multiple of 8 runs "
    "4–34 % faster than one rank fewer (192×576: 1.91× against 1.60×), and multiples of 16, 32 or 64 gain no more "
    "consistently (576×576: +5–10 % for each); at batch 1 and in bf16 alignment moves less than 5 %.")


def render(rows: dict) -> str:
    return (f"## Factor speed: when factors beat the dense matrix (`python -m bench.factor_speed`)\n\n"
            f"Machine: {rows['machine']}; 1 thread. Each cell: dense F.linear(x, W) seconds / factored "
            "F.linear(F.linear(x, A), B) seconds (above 1×: the factors are faster), each the 10th percentile of calls "
            "timed one by one, alternating, at the rank k (a multiple of 8) whose stored size k·(m+n) is the fraction "
            "ρ of m·n; x is batch × in. Dense µs: one dense call.\n\n"
            + table(["out×in", "dtype", "batch", "dense µs"] + [f"ρ={r:g}" for r in RATIOS], rows["break_even"])
            + "\n\n" + READING + " (The rank-alignment table, measured by this bench too, is in "
            "docs/research/rank-multiple.md.)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 shapes only, shorter timings")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--render", action="store_true", help=f"re-render the section from {RESULTS_FILE.name}")
    a = ap.parse_args(argv)
    if a.render:
        rows = json.loads(RESULTS_FILE.read_text())
    else:
        torch.set_num_threads(1)
        budget = 0.1 if a.quick else 0.25
        shapes = SMOL if a.quick else SMOL + LLAMA8B
        rows = {"machine": machine(), "break_even": break_even_rows(shapes, budget),
                "alignment": multiple_rows(shapes, budget)}
    body = render(rows)
    print(body)
    if not a.no_write:
        if not a.render:
            RESULTS_FILE.write_text(json.dumps(rows, indent=1))
        write_section("factor-speed", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
