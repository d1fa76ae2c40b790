"""ADMM's block-sparse export on CUDA: ``otofx.admm.to_bsr`` of an ADMM-finished model computes through
torch's BSR kernels and equals the finished (masked dense) model on the GPU, in float32 and in half
precision (blocks of 16, the smallest torch's and torchao's Triton BSR kernels take)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx.admm as A
from otofx.pipeline import outputs_close

DEV = torch.device("cuda")


def _finished_mlp(block=(16, 16)):
    """A 64-128-128-32 MLP trained a few ADMM rounds on CUDA (prune 0.5, unify 0.25), then finished."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32)).to(DEV)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.1)
    opt = A.ADMM(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), block=block, prune=0.5,
                 unify=0.25, rho=1e-2, rho_max=1.0, rounds=4, steps_per_round=5)
    g = torch.Generator(device=DEV).manual_seed(0)
    for _ in range(20):
        x = torch.randn(32, 64, device=DEV, generator=g)
        loss = F.mse_loss(model(x), torch.zeros(32, 32, device=DEV))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return A.finish(model, opt).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bsr_export_equals_masked_dense_on_cuda(dtype):
    finished = _finished_mlp().to(dtype)
    bsr, converted = A.to_bsr(finished)
    assert converted == ["0.weight", "2.weight", "4.weight"]
    for name in ("0", "2", "4"):
        w = bsr.get_submodule(name).weight_bsr
        assert w.layout == torch.sparse_bsr and w.is_cuda and w.dtype == dtype
        assert w.values().shape[0] < (w.shape[0] // 16) * (w.shape[1] // 16)  # pruned blocks are absent
    x = torch.randn(256, 64, device=DEV, dtype=dtype)
    with torch.no_grad():
        want, got = finished(x), bsr(x)
    ok, err = outputs_close(want, got, dtype=dtype, depth=3)
    assert ok, f"{dtype}: BSR export differs from the masked dense model by {err:.3g}"
