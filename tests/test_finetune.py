"""Fine-tuning on tiny seeded models: which parameters train (counts match the formulas),
frozen ones unchanged bit for bit, loss decreases, resume equals an uninterrupted run,
cancellation leaves a loadable checkpoint or none, completion-only masking, data formats,
distillation from a teacher, the output format and the command line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_llama import make_tiny_llama, train_tokenizer as _tokenizer
from welore_core.corpus import builtin_names
from welore_core.errors import Cancelled, InvalidArgument, InvalidData, OutputExists
from welore_core.finetune import FinetuneConfig, finetune_checkpoint
from welore_core.finetune.data import (IGNORE, BatchStream, Example, build_dataset, encode_example, pack,
                                       read_data, split_groups)
from welore_core.finetune.loss import causal_lm_loss
from welore_core.finetune.methods import apply_method, count_parameters
from welore_core.finetune.trainer import lr_at
from welore_core.lowrank import LowRankLinear

WORDS = "the cat dog sat ran on under a mat rug big small red blue and then".split()
FAST = dict(seq_len=64, batch_size=4, val_sequences=4, choice_examples=8)


def _toy_docs(n=60, seed=0):
    rnd = random.Random(seed)
    docs = []
    for _ in range(n):
        docs.append(" ".join(f"the {rnd.choice(WORDS[:3])} {rnd.choice(WORDS[3:])} on the mat."
                             for _ in range(rnd.randint(4, 9))))
    return docs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dense Llama directory with a real tokenizer, its WeLore-compressed checkpoint,
    and a learnable toy corpus."""
    from welore_core.compression.config import CompressConfig
    from welore_core.compression.pipeline import compress_checkpoint
    from welore_core.spectrum import SpectrumCache

    root = tmp_path_factory.mktemp("ft")
    docs = _toy_docs()
    corpus = root / "toy.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = _tokenizer(docs)
    model = make_tiny_llama(vocab=320)
    dense = root / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    comp = root / "comp"
    compress_checkpoint(str(dense), comp, CompressConfig(err=0.4674, min_ratio=0.5, calibration=None),
                        cache=SpectrumCache(root / "cache"))
    return {"root": root, "dense": str(dense), "comp": str(comp), "data": str(corpus), "tok": tok}


def _load(path):
    from welore_core.loading import load_model
    return load_model(str(path), device="cpu", dtype=torch.float32)


# ---------------------------------------------------------------- which parameters train

def test_welore_trains_exactly_lrc_factors_and_norms(tiny):
    model = _load(tiny["comp"]).model
    apply_method(model, FinetuneConfig(method="welore"))
    lrcs = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lrcs
    cfg = model.config
    expected_names = {f"{n}.{f}" for n in lrcs for f in ("A", "B")}
    norm_names = {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(norm_names) == 2 * cfg.num_hidden_layers + 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_names | norm_names
    lrc_params = sum(m.rank * (m.in_features + m.out_features) for m in lrcs.values())
    norm_params = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    counts = count_parameters(model)
    assert counts["trainable"] == lrc_params + norm_params
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied head counted once

    model = _load(tiny["comp"]).model
    apply_method(model, FinetuneConfig(method="welore", freeze_norms=True))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected_names
    assert count_parameters(model)["trainable"] == lrc_params


def test_full_and_lora_counts(tiny):
    model = _load(tiny["comp"]).model
    apply_method(model, FinetuneConfig(method="full"))
    c = count_parameters(model)
    assert c["trainable"] == c["total"] == sum(p.numel() for p in model.parameters())

    dense = _load(tiny["dense"]).model
    cfg = dense.config
    base_total = sum(p.numel() for p in dense.parameters())
    peft_model = apply_method(dense, FinetuneConfig(method="lora", lora_rank=4))
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down (out, in)
    per_layer = sum(4 * (m + n) for m, n in shapes)
    c = count_parameters(peft_model)
    assert c["trainable"] == cfg.num_hidden_layers * per_layer
    assert c["total"] == base_total + c["trainable"]


def test_method_mismatches_say_how_to_fix(tiny):
    with pytest.raises(InvalidArgument, match="Compress it first"):
        apply_method(_load(tiny["dense"]).model, FinetuneConfig(method="welore"))
    with pytest.raises(InvalidArgument, match="--method welore"):
        apply_method(_load(tiny["comp"]).model, FinetuneConfig(method="lora"))


# ---------------------------------------------------------------- training runs

def test_coft_frozen_unchanged_trained_changed_and_output_format(tiny, tmp_path):
    out = tmp_path / "coft"
    r = finetune_checkpoint(tiny["comp"], out, data=tiny["data"], steps=3, lr=1e-2, **FAST)
    before = load_file(str(Path(tiny["comp"]) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    meta_in = json.loads((Path(tiny["comp"]) / "welore.json").read_text())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lrc_keys = {f"{n}.{f}" for n in meta_in["factored"] for f in ("A", "B")}
    norm_keys = {k for k in before if "norm" in k}
    assert changed == lrc_keys | norm_keys  # everything else bit-for-bit identical

    meta = json.loads((out / "welore.json").read_text())
    assert meta["kind"] == "finetuned" and meta["factored"] == meta_in["factored"]
    assert meta["tau"] == meta_in["tau"]  # the compression record is kept
    t = meta["training"]
    assert t["status"] == "complete" and t["step"] == 3 and t["method"] == "welore"
    assert t["base_model"]["spec"] == tiny["comp"] and t["data"]["sha256"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(r))
    assert not (out / "trainer_state.pt").exists()
    for key in ("params", "memory", "throughput", "loss_curve", "val"):
        assert key in r
    m = r["memory"]
    n_tensors = 2 * len(meta_in["factored"]) + len(norm_keys)
    assert m["grad_bytes"] == m["trainable_param_bytes"] == 4 * r["params"]["trainable"]
    assert m["optimizer_state_bytes"] == 2 * m["trainable_param_bytes"] + 4 * n_tensors  # exp_avg, exp_avg_sq, step
    assert len(r["loss_curve"]) == 3 and r["throughput"]["timed_steps"] == 1

    # the output is a WeLore checkpoint like any other: it loads and fine-tunes again
    again = finetune_checkpoint(str(out), tmp_path / "again", data=tiny["data"], steps=1, **FAST)
    meta2 = json.loads((tmp_path / "again" / "welore.json").read_text())
    assert meta2["training_history"][0]["step"] == 3 and again["steps"] == 1


@pytest.mark.parametrize("method", ["full", "lora"])
def test_baselines_train_what_they_should(tiny, tmp_path, method):
    src = tiny["comp"] if method == "full" else tiny["dense"]
    out = tmp_path / method
    r = finetune_checkpoint(src, out, data=tiny["data"], method=method, steps=2, lr=1e-2, lora_rank=4, **FAST)
    before = load_file(str(Path(src) / "model.safetensors"))
    after = _load(out).model.state_dict()
    if method == "full":
        assert all(not torch.equal(before[k], after[k]) for k in before)
        assert r["params"]["trainable"] == r["params"]["total"]
    else:  # adapters merged into the target matrices; nothing else moved; output loads as dense
        assert json.loads((out / "welore.json").read_text())["factored"] == {}
        for k in before:
            target = any(k.endswith(f"{s}.weight") for s in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"))
            assert torch.equal(before[k], after[k]) != target, k


def test_loss_decreases_on_a_learnable_corpus(tiny, tmp_path):
    r = finetune_checkpoint(tiny["comp"], tmp_path / "o", data=tiny["data"], steps=25, lr=3e-3, **FAST)
    curve = [loss for _, loss, _ in r["loss_curve"]]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    assert r["val"]["after"]["loss"] < r["val"]["before"]["loss"] - 0.3
    assert r["val_perplexity_after"] < r["val_perplexity_before"]


def test_bf16_precision_on_cpu_learns_and_keeps_fp32_weights(tiny, tmp_path):
    """`--precision bf16` (autocast) on the CPU: the loss still falls, the checkpoint keeps
    fp32 weights, and the frozen ones are unchanged bit for bit."""
    out = tmp_path / "bf16"
    r = finetune_checkpoint(tiny["comp"], out, data=tiny["data"], steps=25, lr=3e-3, precision="bf16", **FAST)
    assert r["config"]["precision"] == "bf16"
    assert r["val"]["after"]["loss"] < r["val"]["before"]["loss"] - 0.3
    before = load_file(str(Path(tiny["comp"]) / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in after.values())
    for k, t in before.items():
        lrc_factor = k.endswith((".A", ".B"))
        norm = "norm" in k
        assert torch.equal(t, after[k]) == (not (lrc_factor or norm)), k


def test_resume_equals_uninterrupted_run(tiny, tmp_path):
    kw = dict(data=tiny["data"], steps=6, lr=5e-3, save_every=2, **FAST)
    full = finetune_checkpoint(tiny["comp"], tmp_path / "a", **kw)

    seen = []
    def progress(ev):
        if ev.stage == "train":
            seen.append(ev.done)
    out = tmp_path / "b"
    with pytest.raises(Cancelled):
        finetune_checkpoint(tiny["comp"], out, progress=progress, should_stop=lambda: len(seen) >= 5, **kw)
    assert seen == [1, 2, 3, 4, 5]  # stopped before step 6 began
    meta = json.loads((out / "welore.json").read_text())
    assert meta["training"]["status"] == "partial" and meta["training"]["step"] == 4
    _load(out)  # the partial checkpoint is a complete, loadable checkpoint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging debris

    resumed = finetune_checkpoint(tiny["comp"], out, resume=True, **kw)
    assert resumed["resumed_at"] == [4]
    assert resumed["loss_curve"] == full["loss_curve"]
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val"]["after"] == {**full["val"]["after"], "seconds": resumed["val"]["after"]["seconds"]}

    # resuming a finished run does nothing; changed settings are refused
    assert finetune_checkpoint(tiny["comp"], out, resume=True, **kw)["already_complete"]
    with pytest.raises(InvalidArgument, match="lr"):
        finetune_checkpoint(tiny["comp"], out, resume=True, **{**kw, "lr": 1e-3})


def test_cancel_before_any_checkpoint_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "c"
    calls = []
    with pytest.raises(Cancelled):
        finetune_checkpoint(tiny["comp"], out, data=tiny["data"], steps=5, **FAST,
                            should_stop=lambda: calls.append(1) or len(calls) > 3)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_protected(tiny, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExists):
        finetune_checkpoint(tiny["comp"], out, data=tiny["data"], steps=1, **FAST)
    with pytest.raises(OutputExists):
        finetune_checkpoint(tiny["comp"], out, data=tiny["data"], steps=1, resume=True, **FAST)
    assert (out / "keep.txt").read_text() == "user data"


def test_grad_accumulation_equals_bigger_batch(tiny):
    """Two micro-batches of 2 give the same step as one batch of 4 (loss normalised per step)."""
    from welore_core.finetune.data import collate
    ds = build_dataset(tiny["tok"], tiny["data"], seq_len=64, val_fraction=0.1, val_sequences=4, choice_examples=0)
    lm = _load(tiny["comp"]).model
    seqs = ds.train[:4]
    b4 = collate(seqs, 0)
    s, n = causal_lm_loss(lm, b4["input_ids"], b4["labels"])
    (s / n).backward()
    g_full = {k: p.grad.clone() for k, p in lm.named_parameters() if p.grad is not None}
    lm.zero_grad()
    parts = [collate(seqs[:2], 0), collate(seqs[2:], 0)]
    total = sum(p["targets"] for p in parts)
    for p in parts:
        s, _ = causal_lm_loss(lm, p["input_ids"], p["labels"])
        (s / total).backward()
    for k, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, g_full[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- distillation (the loss itself: test_finetune_loss.py)

def test_distilling_from_a_teacher_teaches_what_it_knows(tiny, tmp_path):
    """COFT with only the KL to a teacher (distill_weight 1: the labels are never used): a dense
    model fine-tuned on the corpus teaches the compressed one, whose held-out loss falls; a teacher with another vocabulary is refused before anything is written."""
    teacher = finetune_checkpoint(tiny["dense"], tmp_path / "teacher", data=tiny["data"], method="full",
                                  steps=25, lr=3e-3, **FAST)
    r = finetune_checkpoint(tiny["comp"], tmp_path / "kd", data=tiny["data"], steps=25, lr=3e-3,
                            teacher=str(tmp_path / "teacher"), **FAST)
    assert r["config"]["teacher"] == str(tmp_path / "teacher") and r["config"]["distill_weight"] == 1.0
    assert teacher["val"]["after"]["loss"] < r["val"]["after"]["loss"] < r["val"]["before"]["loss"] - 0.3
    other = tmp_path / "other"
    make_tiny_llama(vocab=500).save_pretrained(other)
    with pytest.raises(InvalidArgument, match="same tokenizer"):
        finetune_checkpoint(tiny["comp"], tmp_path / "bad", data=tiny["data"], steps=1, teacher=str(other), **FAST)
    assert not (tmp_path / "bad").exists()


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = FinetuneConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


# ---------------------------------------------------------------- data

def test_completion_only_masking_on_tokens(tiny):
    tok = tiny["tok"]
    ex = Example("the cat sat on the mat.\nQuestion: big?\nAnswer:", " yes", "g")
    seq = encode_example(tok, ex, seq_len=64)
    p = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    c = tok(" yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert seq.input_ids == p + c
    assert seq.labels == [IGNORE] * len(p) + c
    short = encode_example(tok, ex, seq_len=len(c) + 3)  # the prompt loses its start, not the answer
    assert short.input_ids == p[-3:] + c and short.labels[3:] == c


def test_packing_joins_documents_with_eos(tiny):
    tok = tiny["tok"]
    docs = _toy_docs(5)
    seqs = pack(tok, docs, 16)
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [t for s in seqs for t in s.input_ids] == stream[: len(seqs) * 16]
    assert all(len(s.input_ids) == 16 and s.labels == s.input_ids for s in seqs)


def test_split_is_stable_and_disjoint():
    keys = [f"doc {i}" for i in range(200)] + ["doc 3"] * 5
    a, b = split_groups(keys, 0.2), split_groups(list(reversed(keys)), 0.2)
    assert a == list(reversed(b))  # a property of each key, not of order
    assert len({v for k, v in zip(keys, a) if k == "doc 3"}) == 1
    assert 0.1 < sum(a) / len(a) < 0.3
    assert any(split_groups(["x", "y"], 0.01)) and not all(split_groups(["x", "y"], 0.99))


def test_batch_stream_is_a_function_of_the_step(tiny):
    ds = build_dataset(tiny["tok"], tiny["data"], seq_len=64, val_fraction=0.1, val_sequences=4, choice_examples=0)
    s1, s2 = BatchStream(ds.train, 3, seed=7, pad_id=0), BatchStream(ds.train, 3, seed=7, pad_id=0)
    late = s2.micro_batch(40)["input_ids"]
    for j in range(41):
        b = s1.micro_batch(j)
    assert torch.equal(b["input_ids"], late)
    assert not torch.equal(BatchStream(ds.train, 3, seed=8, pad_id=0).micro_batch(40)["input_ids"], late)


def test_builtin_task_formatters(tiny, data_dir):
    path, fmt, items = read_data("boolq")
    assert fmt == "boolq" and items[0].options == [" no", " yes"]
    assert items[0].prompt.endswith("?\nAnswer:") and items[0].completion in (" yes", " no")
    assert items[0].prompt.startswith(items[0].group[:50])
    _, fmt, items = read_data("commonsenseqa")
    assert fmt == "commonsenseqa" and items[0].options == [" A", " B", " C", " D", " E"]
    assert "\nA. " in items[0].prompt and items[0].completion == items[0].options[items[0].gold]
    _, fmt, docs = read_data("boolq-passages")
    assert fmt == "text" and len(docs) == len(set(docs)) and isinstance(docs[0], str)
    ds = build_dataset(tiny["tok"], "commonsenseqa-dev", seq_len=96, val_fraction=0.1, val_sequences=8,
                       choice_examples=5)
    assert len(ds.choices) == 5 and ds.format == "commonsenseqa"
    assert all(sum(x != IGNORE for x in s.labels) >= 2 for s in ds.train[:20])  # answer letter + EOS
    for name in builtin_names():  # the names `welore finetune --data` lists are the names it reads
        assert read_data(name)[2], name


def test_prompt_completion_and_txt_and_bad_data(tiny, tmp_path):
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"q{i}:", "completion": f" a{i}"}) + "\n" for i in range(30)))
    ds = build_dataset(tiny["tok"], str(pc), seq_len=32, val_fraction=0.2, val_sequences=8, choice_examples=0)
    assert ds.format == "prompt_completion" and ds.train and ds.val
    txt = tmp_path / "t.txt"
    txt.write_text(" ".join(_toy_docs(20)))
    ds = build_dataset(tiny["tok"], str(txt), seq_len=32, val_fraction=0.1, val_sequences=8, choice_examples=0)
    assert ds.split == "tail" and ds.train and ds.val
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(InvalidData, match=r"bad.jsonl:2: .*completion"):
        read_data(str(bad))
    with pytest.raises(InvalidData, match="cannot tell the data format"):
        odd = tmp_path / "odd.jsonl"
        odd.write_text(json.dumps({"foo": 1}) + "\n")
        read_data(str(odd))


# ---------------------------------------------------------------- command line, imports

def test_cli_json(tiny, tmp_path):
    from welore_core.cli import main

    out = tmp_path / "cli"
    args = [tiny["comp"], "--data", tiny["data"], "--method", "welore", "--steps", "2", "--seq-len", "64",
            "--batch-size", "2", "--val-sequences", "2", "--out", str(out), "--json"]
    proc = subprocess.run([sys.executable, "-m", "welore_core.cli", "finetune", *args], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["method"] == "welore" and result["out"] == str(out)
    assert "train" in proc.stderr  # the progress bar
    assert main(["finetune", *args]) == 2  # out exists now: a one-line error, exit 2
    distilled = main(["finetune", *args[:-3], "--out", str(tmp_path / "kd"), "--teacher", tiny["dense"],
                      "--distill-weight", "0.5", "--json"])
    assert distilled == 0
    config = json.loads((tmp_path / "kd" / "metrics.json").read_text())["config"]
    assert config["teacher"] == tiny["dense"] and config["distill_weight"] == 0.5


def test_core_never_imports_the_web_stack():
    code = ("import sys, welore_core.finetune, welore_core.cli.finetune; "
            "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'redis') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_choice_accuracy_picks_the_most_likely_option(tiny):
    """Accuracy compares the summed log-likelihood of each option's tokens given the prompt."""
    from welore_core.finetune.metrics import choice_accuracy

    tok = tiny["tok"]
    model = _load(tiny["dense"]).model
    exs = [Example(f"the cat sat on the mat {i}. Answer:", "", f"g{i}", [" yes", " no", " red mat"], g)
           for i, g in enumerate([0, 1, 2, 0, 2])]

    def loglik(prompt, option):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        o = tok(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + o])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        return sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(o))

    expected = sum(max(range(3), key=lambda k: loglik(e.prompt, e.options[k])) == e.gold for e in exs)
    r = choice_accuracy(model, tok, exs, seq_len=64, pad_id=tok.pad_token_id, device=torch.device("cpu"),
                        batch_size=4)
    assert r["examples"] == 5 and r["correct"] == expected
