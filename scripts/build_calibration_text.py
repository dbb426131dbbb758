"""Build welore_core/data/general.jsonl, the calibration text that ships with welore, and
general-heldout.jsonl, the same mix of other items, on which every compression's quality check runs
(run once by a maintainer; the outputs are committed, the sources are not).

It interleaves three kinds of real text so that whitening keeps the directions several domains use:
encyclopaedic prose (Wikipedia passages as distributed with BoolQ, CC BY-SA 3.0), arithmetic word
problems (SVAMP, MIT licence) and short state-tracking puzzles (the coin-flip task of Wei et al.,
synthetic). Each record is {"text", "source"}. Only the first half of the BoolQ passages is used,
so the second half stays unseen. Attribution: welore_core/data/LICENSE-general.md.

Usage: python scripts/build_calibration_text.py [--data ../shared/data] [--passages 700]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--passages", type=int, default=250, help="BoolQ passages to take (from the first half)")
    p.add_argument("--heldout", type=int, default=25, help="passages of the held-out file (the next ones)")
    p.add_argument("--out", type=Path, default=ROOT / "welore_core" / "data")
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
    write(args.out / "general.jsonl", mix(passages, svamp[:2 * n], coins[:n]))
    write(args.out / "general-heldout.jsonl", mix(heldout, svamp[2 * n:], coins[n:]))
    return 0


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
