"""Build welore_core/data/general.jsonl, the calibration text that ships with welore, and
general-heldout.jsonl, the same mix of other items, on which every compression's quality check runs
(run once by a maintainer; the outputs are committed, the sources are not).

general.jsonl interleaves three kinds of text, so that whitening keeps the directions many domains use:
- text a language model wrote: SmolLM2-135M-Instruct (Apache-2.0) sampling 64 documents of 520
  tokens (temperature 1, top-p 0.95), each from a random first token (as in LLM-QAT's data-free
  calibration) — prose, code, maths, lists, dialogue, in the proportions of its training mix;
- three kinds of real text: encyclopaedic prose (Wikipedia passages as distributed with BoolQ,
  CC BY-SA 3.0), arithmetic word problems (SVAMP, MIT licence) and short state-tracking puzzles
  (the coin-flip task of Wei et al., synthetic);
- passages of Python library source (NumPy, SymPy, NetworkX: BSD-3-Clause, installed with torch),
  code with its docstrings, the technical register the other two lack.
Each generated document is followed by real records of about the same length and one source passage
(~2,000 characters), so every prefix (calibration takes the first windows) holds all three. After
them come 256 more generated documents (four batches of 64, seeds 2-5), past the windows calibration
reads by default (128 x 512 tokens at most), for `--recover`, which distils on the whole file: its
150 steps x 2,048 tokens then pass over the text 1.2 times instead of 2.4, the added half in the
model's own mix of domains (docs/research/recovery-text.md). Only the
first half of the BoolQ passages is used, so the second half stays unseen. general-heldout.jsonl is
built the same way from other items: 8 documents generated from another seed, interleaved with
unseen passages, problems, puzzles and source passages drawn with another seed, so that the quality
check (its first 4 × 512 tokens) sees the model's own mix of domains (code, lists, dialogue) too, not
only the real kinds whose siblings were calibrated on. Each record is {"text", "source"}.
Attribution: welore_core/data/LICENSE-general.md. Why the generated half: with it the ratio to the dense
perplexity halved on domains neither half holds (Python docs 12.2× → 6.8× at params kept 0.8;
docs/research/calibration-rounds.md, round 9); why the source: software documentation 10–30 % better
at ERR 0.3/0.5, CommonsenseQA level (docs/research/calibration-text.md).

Usage: python scripts/build_calibration_text.py [--data ../shared/data] [--generated FILE]
                                                [--generated-heldout FILE] [--generated-recovery FILE]
  --generated FILE  reuse generated documents (JSONL, `text`) instead of sampling them (~4 min per 64
                    documents on 2 cores; the three kinds take ~22 min in all)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELDOUT_DOCS = 8  # generated documents of the held-out file (another seed than the calibration's)
RECOVERY_SEEDS = (2, 3, 4, 5)  # one batch of 64 generated documents each, appended for --recover
SOURCE_PACKAGES = ("networkx", "sympy", "numpy")  # BSD-3-Clause, installed with torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--passages", type=int, default=250, help="BoolQ passages to take (from the first half)")
    p.add_argument("--heldout", type=int, default=25, help="passages of the held-out file (the next ones)")
    p.add_argument("--out", type=Path, default=ROOT / "welore_core" / "data")
    p.add_argument("--generated", type=Path, default=None, help="generated documents to reuse (JSONL)")
    p.add_argument("--generated-heldout", type=Path, default=None,
                   help="generated documents of the held-out file to reuse (JSONL)")
    p.add_argument("--generated-recovery", type=Path, default=None,
                   help="generated documents appended for --recover to reuse (JSONL)")
    args = p.parse_args()
    rows = [json.loads(line) for line in (args.data / "boolq" / "boolq_dev.jsonl").read_text().splitlines() if line.strip()]
    seen, passages = set(), []
    for r in rows[: len(rows) // 2]:
        if r["passage"] not in seen:
            seen.add(r["passage"])
            passages.append(f"{r['title'].title()}. {r['passage']}")
    heldout, passages = passages[args.passages:args.passages + args.heldout], passages[: args.passages]
    svamp = [f"{o['Body'].strip()} {o['Question'].strip()} Answer: {o['Answer']:g}"
             for o in json.loads((args.data / "svamp" / "SVAMP.json").read_text())]
    coins = [f"{o['question']} Answer: {o['answer']}"
             for o in json.loads((args.data / "coin_flip" / "coin_flip.json").read_text())["examples"]]
    n = len(passages)
    real = mix(passages, svamp[:2 * n], coins[:n])
    generated = read_generated(args.generated) if args.generated else generate()
    recovery = (read_generated(args.generated_recovery) if args.generated_recovery
                else [d for seed in RECOVERY_SEEDS for d in generate(seed=seed)])
    write(args.out / "general.jsonl", interleave(generated, real, source_passages(len(generated), seed=0))
          + [{"text": t, "source": "smollm2-generated"} for t in recovery])
    unseen = read_generated(args.generated_heldout) if args.generated_heldout else generate(docs=HELDOUT_DOCS, seed=1)
    write(args.out / "general-heldout.jsonl",
          interleave(unseen, mix(heldout, svamp[2 * n:], coins[n:]), source_passages(len(unseen), seed=1)))
    return 0


def read_generated(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def generate(docs: int = 64, tokens: int = 520, seed: int = 0) -> list[str]:
    """`docs` documents sampled by SmolLM2-135M-Instruct, each from a random non-special first token."""
    import torch

    from welore_core.loading import load_model

    torch.manual_seed(seed)
    lm = load_model("smollm2-135m", device="cpu")
    special, g, first = set(lm.tokenizer.all_special_ids), torch.Generator().manual_seed(seed), []
    while len(first) < docs:
        t = int(torch.randint(100, lm.model.config.vocab_size, (1,), generator=g))
        if t not in special:
            first.append(t)
    ids = torch.tensor(first).view(docs, 1)
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=0.95,
                                max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=lm.tokenizer.eos_token_id)
    return [lm.tokenizer.decode(row, skip_special_tokens=True) for row in out]


def source_passages(count: int, seed: int, chars: int = 2000) -> list[str]:
    """`count` passages of about `chars` characters (whole lines) of NumPy/SymPy/NetworkX source (not tests),
    each from a random line of a random module."""
    import importlib.util
    import random

    files = sorted(p for pkg in SOURCE_PACKAGES
                   for p in Path(importlib.util.find_spec(pkg).submodule_search_locations[0]).rglob("*.py")
                   if "test" not in str(p) and p.stat().st_size > 4000)
    rng, out = random.Random(seed), []
    while len(out) < count:
        lines = rng.choice(files).read_text(errors="ignore").splitlines(keepends=True)
        text = "".join(lines[rng.randrange(0, max(1, len(lines) - 40)):])[:chars]
        if len(text) >= chars // 2:
            out.append(text[: text.rfind("\n") + 1])
    return out


def interleave(generated: list[str], real: list[dict], source: list[str]) -> list[dict]:
    """Each generated document, then real records of about its length and one source passage (the rest of
    the real ones last)."""
    out, i = [], 0
    for text, code in zip(generated, source, strict=True):
        out.append({"text": text, "source": "smollm2-generated"})
        size = 0
        while size < len(text) and i < len(real):
            out.append(real[i])
            size += len(real[i]["text"])
            i += 1
        out.append({"text": code, "source": "python-source"})
    return out + real[i:]


def mix(passages: list[str], svamp: list[str], coins: list[str]) -> list[dict]:
    """Each passage followed by two word problems and one puzzle: every prefix holds all three kinds."""
    out = []
    for i, passage in enumerate(passages):
        out.append({"text": passage, "source": "wikipedia"})
        out += [{"text": t, "source": "svamp"} for t in svamp[2 * i:2 * i + 2]]
        out += [{"text": t, "source": "coin_flip"} for t in coins[i:i + 1]]
    return out


def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{path}: {len(records)} records, {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    raise SystemExit(main())
