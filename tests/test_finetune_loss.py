"""The fused, chunked fine-tuning loss against plain computations from full logits:
next-token cross-entropy, and with a teacher (1 − w)·CE + w·KL(teacher ‖ student); values
and gradients, over several chunks."""

from __future__ import annotations

import pytest
import torch

from tiny_llama import make_tiny_llama
from welore_core.finetune.data import IGNORE
from welore_core.finetune.loss import causal_lm_loss


def test_chunked_loss_matches_plain_cross_entropy(monkeypatch):
    from welore_core.finetune import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 256 * 7)  # several chunks
    model = make_tiny_llama(vocab=256).train()
    ids = torch.randint(2, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :10] = IGNORE
    s, n = causal_lm_loss(model, ids, labels)
    s.backward()
    fused = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1),
                                            reduction="sum", ignore_index=IGNORE)
    ref.backward()
    assert n == 3 * 39 - 9
    torch.testing.assert_close(s.detach(), ref.detach(), rtol=1e-5, atol=1e-4)
    for k, p in model.named_parameters():
        torch.testing.assert_close(fused[k], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mix", [1.0, 0.3])
def test_distillation_loss_matches_ce_plus_kl(monkeypatch, mix):
    """With a teacher, the fused loss and its gradients equal (1 − w)·CE + w·KL(teacher ‖ student)
    computed from full logits; the teacher gets no gradient."""
    from welore_core.finetune import loss as loss_mod
    from welore_core.finetune.loss import Teacher

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 256 * 7)
    student, teacher = make_tiny_llama(vocab=256, seed=1).train(), make_tiny_llama(vocab=256, seed=2)
    ids = torch.randint(2, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :7] = IGNORE
    t_hidden = teacher.model(input_ids=ids).last_hidden_state.detach()
    s, n = causal_lm_loss(student, ids, labels, teacher=Teacher(t_hidden, teacher.lm_head.weight, mix))
    s.backward()
    fused = {k: p.grad.clone() for k, p in student.named_parameters()}
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad()
    keep = labels[:, 1:].reshape(-1) != IGNORE
    logq = torch.log_softmax(student(input_ids=ids).logits[:, :-1].reshape(-1, 256)[keep], -1)
    logp = torch.log_softmax(teacher.lm_head(t_hidden)[:, :-1].reshape(-1, 256)[keep], -1)
    ce = -logq.gather(1, labels[:, 1:].reshape(-1)[keep][:, None]).sum()
    kl = (logp.exp() * (logp - logq)).sum()
    ref = (1 - mix) * ce + mix * kl
    ref.backward()
    assert n == 2 * 29 - 6
    torch.testing.assert_close(s.detach(), ref.detach(), rtol=1e-5, atol=1e-4)
    for k, p in student.named_parameters():
        torch.testing.assert_close(fused[k], p.grad, rtol=1e-4, atol=1e-5)
