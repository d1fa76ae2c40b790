"""Shared test helpers: non-trivial statistics, zeroing rows, exactness, snapshots."""
from __future__ import annotations

import hashlib

import torch

import otofx


def randomize_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BN running stats, norm affines and biases, so exactness checks are not vacuous."""
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None:
                u(m.running_mean, -1, 1)
                u(m.running_var, 0.5, 2)
            for name, p in m.named_parameters(recurse=False):
                if name == "bias":
                    u(p, -0.5, 0.5)
                elif name == "weight" and p.ndim == 1:
                    u(p, 0.5, 1.5)


def zero_rows(oto: otofx.OTO, fraction: float = 0.5, seed: int = 0) -> list:
    """Zero a random ``fraction`` of the rows of every group; returns the chosen rows per group."""
    g = torch.Generator().manual_seed(seed)
    params = dict(oto.model.named_parameters())
    chosen = []
    with torch.no_grad():
        for z in oto.groups:
            rows = torch.randperm(z.rows, generator=g)[: int(z.rows * fraction)]
            chosen.append(rows)
            for name, dim, index in z.params:
                params[name].movedim(dim, 0)[index[rows].reshape(-1)] = 0
    return chosen


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def assert_exact(model: torch.nn.Module, oto: otofx.OTO, *inputs, smaller: bool = True):
    """compress() equals the zeroed full model (OTO.md's tolerance) and is smaller; returns it."""
    small = oto.compress(verify=False)
    with torch.no_grad(), otofx.eval_mode(model), otofx.eval_mode(small):
        ref = model(*inputs)
        got = small(*inputs)
    ok, err = otofx.outputs_close(ref, got)
    assert ok, f"compressed model differs: relative error {err:.3g}"
    if smaller:
        assert n_params(small) < n_params(model), "compressed model is not smaller"
    return small


def snapshot(model: torch.nn.Module) -> tuple:
    """A comparable fingerprint of every parameter, buffer and training flag."""
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        data = t.detach().cpu().contiguous()
        out.append((name, str(data.dtype), tuple(data.shape), hashlib.sha1(data.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()))
    out.extend((name, m.training) for name, m in model.named_modules())
    return tuple(out)
