"""scoring.nll_sum and nll_sum_grad: the LM head a block of the vocabulary at a time gives
cross-entropy's sum and its gradient."""

import torch
from torch import nn

from welore_core import scoring


def test_blocked_nll_equals_cross_entropy(monkeypatch):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g) * 3
    t = torch.randint(0, 1000, (37,), generator=g)
    want = float(nn.functional.cross_entropy(h @ w.T, t, reduction="sum"))
    monkeypatch.setattr(scoring, "BLOCK_ELEMENTS", 37 * 300)  # 300 rows a block: 4 blocks, the last short
    assert abs(scoring.nll_sum(h, w, t) - want) < 1e-4 * abs(want)
    wb = w.to(torch.bfloat16)  # a bf16 head, upcast block by block = the fp32 head of the same values
    want_b = float(nn.functional.cross_entropy(h @ wb.float().T, t, reduction="sum"))
    assert abs(scoring.nll_sum(h, wb, t) - want_b) < 1e-4 * abs(want_b)


def test_blocked_nll_gradient_equals_autograd(monkeypatch):
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g) * 3
    t = torch.randint(0, 1000, (37,), generator=g)
    x = h.clone().requires_grad_(True)
    nn.functional.cross_entropy(x @ w.T, t, reduction="sum").backward()
    monkeypatch.setattr(scoring, "BLOCK_ELEMENTS", 37 * 300)  # 4 blocks, the last short
    torch.testing.assert_close(scoring.nll_sum_grad(h, w, t), x.grad, rtol=1e-4, atol=1e-5)
    wb = w.to(torch.bfloat16)  # a bf16 head: the gradient of the fp32 head of the same values
    x = h.clone().requires_grad_(True)
    nn.functional.cross_entropy(x @ wb.float().T, t, reduction="sum").backward()
    torch.testing.assert_close(scoring.nll_sum_grad(h, wb, t), x.grad, rtol=1e-4, atol=1e-5)
