"""The calibrated compression on a GPU gives what it gives on the CPU (skipped without CUDA;
CI has none, the device checks run it)."""

from __future__ import annotations

import pytest
import torch

from welore_core.compression.calibration import Calibration
from welore_core.compression.factorize import truncated
from welore_core.compression.model import compress_model
from welore_core.compression.whiten import gram_root, transformed_svd
from welore_core.spectrum import SpectrumCache

from recipes import calibrated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_whitened_full_rank_reproduces_W_on_the_gpu():
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(300, 48, generator=g, dtype=torch.float64) @ torch.randn(48, 48, generator=g,
                                                                             dtype=torch.float64)).cuda()
    W = torch.randn(32, 48, generator=g, dtype=torch.float64).cuda()
    U, S, Vh = transformed_svd(W, gram_root(X.T @ X))
    assert U.is_cuda and S.is_cuda
    torch.testing.assert_close(truncated(U, S, Vh, 32), W, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sequential,compensate", [(False, False), (True, False), (True, True)])
def test_calibrated_compression_on_the_gpu_matches_the_cpu(tiny_llama, tmp_path, sequential, compensate):
    t = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    calib = Calibration(t, "random", "0" * 64, t.shape[0])
    out = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama().to(device)
        recipe = calibrated(err=0.4, min_ratio=0.0, sequential=sequential, compensate=compensate)
        report = compress_model(model, recipe, calib, tolerance=0.05, cache=SpectrumCache(tmp_path / device))
        assert all(p.device.type == device for p in model.parameters())
        with torch.no_grad():
            out[device] = (report, model(input_ids=t.to(device)).logits.cpu())
    (cpu, cpu_logits), (gpu, gpu_logits) = out["cpu"], out["cuda"]
    assert [m.kept_rank for m in gpu.matrices] == [m.kept_rank for m in cpu.matrices]
    assert gpu.n_lrc == cpu.n_lrc > 0
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-3, atol=1e-3)
