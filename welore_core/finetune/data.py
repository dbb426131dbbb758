"""Training data: reading files into documents or prompt/completion examples, the held-out
split, tokenising into sequences (packed for text, completion-only labels otherwise), and a
deterministic step-indexed batch stream (what makes resume exact).

Formats (`data_format`, "auto" detects from the first JSONL object):
  text               `text` (or `passage`) field, or a .txt file: causal LM on every token,
                     documents joined by EOS and packed into windows of seq_len
  prompt_completion  `prompt` + `completion`: loss on the completion tokens (and EOS) only
  boolq              passage + question → " yes"/" no" (objects with passage/question/answer)
  commonsenseqa      question + lettered choices → " A".." E" (objects with question.stem,
                     question.choices, answerKey)
The two tasks also yield multiple-choice examples, scored for accuracy by comparing the
log-likelihood of each answer option.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..corpus import ALIASES, TEXT_FIELDS, iter_jsonl, resolve_data
from ..errors import InvalidArgument, InvalidData

IGNORE = -100  # label of a position that is not scored


@dataclass
class Example:
    """One prompt/completion pair; `options`/`gold` make it a multiple-choice item."""

    prompt: str
    completion: str
    group: str  # examples sharing a group (e.g. one passage) land in the same split
    options: Optional[list[str]] = None
    gold: Optional[int] = None


@dataclass
class Sequence:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids (HF convention); IGNORE where not scored


@dataclass
class Dataset:
    spec: str
    path: str
    format: str  # text | prompt_completion | boolq | commonsenseqa
    train: list[Sequence]
    val: list[Sequence]
    choices: list[Example] = field(default_factory=list)  # held-out multiple-choice items
    split: str = "documents"  # how the held-out part was chosen
    n_train_docs: int = 0
    n_val_docs: int = 0

    def summary(self) -> dict:
        count = lambda seqs: sum(sum(1 for x in s.labels[1:] if x != IGNORE) for s in seqs)
        return {"spec": self.spec, "path": self.path, "format": self.format, "split": self.split,
                "train_docs": self.n_train_docs, "val_docs": self.n_val_docs,
                "train_sequences": len(self.train), "val_sequences": len(self.val),
                "train_target_tokens": count(self.train), "val_target_tokens": count(self.val),
                "choice_examples": len(self.choices)}


# ---------------------------------------------------------------- reading and formatting

def _boolq(obj: dict, where: str) -> Example:
    passage, question, answer = obj.get("passage"), obj.get("question"), obj.get("answer")
    if not isinstance(passage, str) or not isinstance(question, str) or answer is None:
        raise InvalidData(f"{where}: a BoolQ item needs string 'passage' and 'question' and a boolean "
                          f"'answer'; found keys {sorted(obj)}")
    if isinstance(answer, str):
        if answer.strip().lower() not in ("true", "false", "yes", "no"):
            raise InvalidData(f"{where}: 'answer' must be true/false; received {answer!r}")
        answer = answer.strip().lower() in ("true", "yes")
    q = question.strip()
    q = (q[:1].upper() + q[1:]).rstrip("?") + "?"
    options = [" no", " yes"]
    gold = int(bool(answer))
    return Example(f"{passage.strip()}\nQuestion: {q}\nAnswer:", options[gold], passage.strip(), options, gold)


def _commonsenseqa(obj: dict, where: str) -> Example:
    q = obj.get("question")
    key = obj.get("answerKey")
    choices = q.get("choices") if isinstance(q, dict) else None
    if not isinstance(q, dict) or not isinstance(q.get("stem"), str) or not isinstance(choices, list) \
            or not choices or not isinstance(key, str):
        raise InvalidData(f"{where}: a CommonsenseQA item needs question.stem, question.choices "
                          f"[{{label, text}}] and answerKey; found keys {sorted(obj)}")
    try:
        pairs = sorted((str(c["label"]), str(c["text"])) for c in choices)
    except (KeyError, TypeError) as exc:
        raise InvalidData(f"{where}: each choice needs 'label' and 'text'") from exc
    labels = [label for label, _ in pairs]
    if key not in labels:
        raise InvalidData(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    prompt = f"Question: {q['stem'].strip()}\n" + "".join(f"{l}. {t}\n" for l, t in pairs) + "Answer:"
    options = [f" {l}" for l in labels]
    gold = labels.index(key)
    return Example(prompt, options[gold], q["stem"].strip(), options, gold)


def _prompt_completion(obj: dict, where: str) -> Example:
    p, c = obj.get("prompt"), obj.get("completion")
    if not isinstance(p, str) or not isinstance(c, str) or not c:
        raise InvalidData(f"{where}: expected string fields 'prompt' and a non-empty 'completion'; "
                          f"found keys {sorted(obj)}")
    return Example(p, c, p)


def _detect(obj: dict) -> str:
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return "prompt_completion"
    if isinstance(obj.get("passage"), str) and isinstance(obj.get("question"), str) and "answer" in obj:
        return "boolq"
    if isinstance(obj.get("question"), dict) and "answerKey" in obj:
        return "commonsenseqa"
    if any(isinstance(obj.get(f), str) for f in TEXT_FIELDS):
        return "text"
    raise InvalidData(f"cannot tell the data format from the first object (keys {sorted(obj)}); expected "
                      "'text', 'prompt'+'completion', BoolQ (passage/question/answer) or CommonsenseQA "
                      "(question.stem/choices, answerKey) objects, or pass data_format explicitly")


FORMATTERS = {"boolq": _boolq, "commonsenseqa": _commonsenseqa, "prompt_completion": _prompt_completion}


def read_data(spec: str, data_format: str = "auto") -> tuple[Path, str, list]:
    """→ (file, format, items): documents (str) for text, Examples otherwise."""
    spec = str(spec)
    if spec in ALIASES:
        spec, forced = ALIASES[spec]
        if data_format not in ("auto", forced):
            raise InvalidArgument(f"data {spec!r} is a {forced} corpus; received data_format={data_format!r}")
        data_format = forced
    path = resolve_data(spec)
    if path.suffix != ".jsonl":
        if path.suffix not in (".txt", ".md", ".text"):
            raise InvalidData(f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or .txt")
        if data_format not in ("auto", "text"):
            raise InvalidArgument(f"{path} is a text file; data_format {data_format!r} needs a .jsonl file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidData(f"{path}: not UTF-8 text ({exc})") from exc
        if not text.strip():
            raise InvalidData(f"{path}: no text found")
        # Blank-line separated paragraphs are the documents (the unit of the held-out split).
        docs = [p for p in text.split("\n\n") if p.strip()]
        return path, "text", docs
    fmt = data_format
    items: list = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if fmt == "auto":
            fmt = _detect(obj)
        if fmt == "text":
            f = next((f for f in TEXT_FIELDS if isinstance(obj.get(f), str)), None)
            if f is None:
                raise InvalidData(f"{where}: expected a string field {' or '.join(map(repr, TEXT_FIELDS))}; "
                                  f"found keys {sorted(obj)}")
            if obj[f].strip():
                items.append(obj[f])
        else:
            items.append(FORMATTERS[fmt](obj, where))
    if not items:
        raise InvalidData(f"{path}: no examples found")
    if fmt == "text":
        items = list(dict.fromkeys(items))  # the same passage under several questions: once
    return path, fmt, items


# ---------------------------------------------------------------- split and tokenise

def _hash01(key: str) -> float:
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)


def split_groups(keys: list[str], val_fraction: float) -> list[bool]:
    """is-held-out per item, by a hash of its group key: stable across runs, seeds and file
    order; equal keys always fall on the same side. Both sides get at least one group."""
    h = [_hash01(k) for k in keys]
    is_val = [x < val_fraction for x in h]
    if len(set(keys)) >= 2:
        if not any(is_val):
            lo = min(h)
            is_val = [x == lo for x in h]
        if all(is_val):
            hi = max(h)
            is_val = [x != hi for x in h]
    return is_val


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pack(tokenizer, docs: list[str], seq_len: int) -> list[Sequence]:
    """Documents joined by EOS and cut into full windows of seq_len (a short corpus: one
    shorter window)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for d in docs:
        stream.extend(_ids(tokenizer, d))
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        return [Sequence(stream, list(stream))] if len(stream) >= 2 else []
    return [Sequence(stream[i * seq_len:(i + 1) * seq_len], stream[i * seq_len:(i + 1) * seq_len])
            for i in range(n)]


def encode_example(tokenizer, ex: Example, seq_len: int) -> Sequence:
    """prompt ids + completion ids + EOS; labels only on the completion and EOS. A too-long
    prompt loses tokens from its start (the question and answer cue sit at its end)."""
    p = _ids(tokenizer, ex.prompt)
    c = _ids(tokenizer, ex.completion)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        c = c + [eos]
    c = c[: seq_len - 1]
    p = p[-(seq_len - len(c)):] if len(p) + len(c) > seq_len else p
    return Sequence(p + c, [IGNORE] * len(p) + c)


def build_dataset(tokenizer, spec: str, *, seq_len: int, val_fraction: float, val_sequences: int,
                  choice_examples: int, data_format: str = "auto") -> Dataset:
    path, fmt, items = read_data(spec, data_format)
    if fmt == "text":
        if len(items) >= 10:
            is_val = split_groups(items, val_fraction)
            train_docs = [d for d, v in zip(items, is_val) if not v]
            val_docs = [d for d, v in zip(items, is_val) if v]
            train, val = pack(tokenizer, train_docs, seq_len), pack(tokenizer, val_docs, seq_len)
            split = "documents"
        else:  # too few documents: hold out the tail of the token stream
            seqs = pack(tokenizer, items, seq_len)
            if len(seqs) < 2:
                raise InvalidData(f"{path}: {len(seqs)} window(s) of {seq_len} tokens; need at least 2 to hold "
                                  "one out for validation. Use more text or a smaller seq_len")
            n_val = max(1, round(len(seqs) * val_fraction))
            train, val = seqs[:-n_val], seqs[-n_val:]
            train_docs, val_docs, split = items, [], "tail"
        if not train or not val:
            raise InvalidData(f"{path}: the training or held-out part holds no full window of {seq_len} tokens; "
                              "use more text, a smaller seq_len or another val_fraction")
        return Dataset(str(spec), str(path), fmt, train, val[:val_sequences], [], split,
                       len(train_docs), len(val_docs))
    is_val = split_groups([e.group for e in items], val_fraction)
    train_ex = [e for e, v in zip(items, is_val) if not v]
    val_ex = [e for e, v in zip(items, is_val) if v]
    if not train_ex or not val_ex:
        raise InvalidData(f"{path}: need at least two distinct examples to hold one out; found {len(items)}")
    train = [encode_example(tokenizer, e, seq_len) for e in train_ex]
    val = [encode_example(tokenizer, e, seq_len) for e in val_ex[:val_sequences]]
    choices = [e for e in val_ex if e.options][:choice_examples]
    return Dataset(str(spec), str(path), fmt, train, val, choices, "examples", len(train_ex), len(val_ex))


# ---------------------------------------------------------------- batches

def collate(seqs: list[Sequence], pad_id: int) -> dict:
    """Right-padded (b, L) tensors; attention_mask only when something is padded."""
    L = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), L), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    padded = bool((mask == 0).any())
    return {"input_ids": ids, "labels": labels, "attention_mask": mask if padded else None,
            "tokens": int(mask.sum()), "targets": int((labels[:, 1:] != IGNORE).sum())}


class BatchStream:
    """Micro-batch j is a pure function of (sequences, batch_size, seed, j): an endless
    stream of per-epoch permutations, so a resumed run sees exactly the same batches."""

    def __init__(self, seqs: list[Sequence], batch_size: int, seed: int, pad_id: int):
        if not seqs:
            raise InvalidData("no training sequences")
        self.seqs, self.batch_size, self.seed, self.pad_id = seqs, batch_size, seed, pad_id
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.seqs), generator=g).tolist()}
        return self._perms[epoch]

    def micro_batch(self, j: int) -> dict:
        n = len(self.seqs)
        picked = []
        for pos in range(j * self.batch_size, (j + 1) * self.batch_size):
            picked.append(self.seqs[self._perm(pos // n)[pos % n]])
        return collate(picked, self.pad_id)


def eval_batches(seqs: list[Sequence], batch_size: int, pad_id: int):
    for i in range(0, len(seqs), batch_size):
        yield collate(seqs[i:i + batch_size], pad_id)
