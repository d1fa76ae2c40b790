"""Shared test helpers.

* :func:`randomize` -- random BN statistics, norm affines, biases and constant-initialised
  parameters, so an exactness check cannot pass on near-constant activations (OTO.md section 1).
* :func:`zero_rows` / :func:`zero_random_rows` -- zero chosen rows of the ZIGs, or a random subset
  of the rows of every group.
* :func:`assert_exact` -- the zeroed full model and ``oto.compress()`` agree in eval mode to
  ``1e-4 * max(1, max|y|)``, and the compressed model has strictly fewer parameters.
* :func:`snapshot` -- a comparable fingerprint of a model's state_dict and training flags.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch.utils._pytree import tree_flatten

from otofx.passes.nodes import get_path

RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Making checks non-vacuous
# ---------------------------------------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Randomise what default initialisation leaves trivial, in place; returns ``model``.

    * BN/InstanceNorm running statistics: mean in [-1, 1], var in [0.5, 2] (not 0 and 1);
    * every bias: uniform in [-0.5, 0.5] (not 0);
    * every parameter initialised to one constant (norm weights, PReLU slopes, layer-scale gammas):
      uniform in [0.5, 1.5];
    * every other parameter is left as initialised (already random).
    """
    g = torch.Generator().manual_seed(seed)

    def u(t, lo, hi):
        t.copy_((torch.rand(t.shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(t.dtype))

    with torch.no_grad():
        for m in model.modules():
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and rm.is_floating_point():
                u(rm, -1.0, 1.0)
            if isinstance(rv, torch.Tensor) and rv.is_floating_point():
                u(rv, 0.5, 2.0)
            for name, p in m.named_parameters(recurse=False):
                if not p.is_floating_point() or p.numel() == 0:
                    continue
                if name == "bias" or name.endswith("_bias") or name.startswith("bias"):
                    u(p, -0.5, 0.5)
                elif p.numel() == 1 or bool((p == p.reshape(-1)[0]).all()):
                    u(p, 0.5, 1.5)
    return model


def build(factory, seed: int = 0):
    """A rule example ``(model, input)`` from ``factory``, its warnings silenced, with randomised weights."""
    import warnings

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, x = factory()
    randomize(model, seed)
    return model, x


# ---------------------------------------------------------------------------------------------
# Zeroing rows
# ---------------------------------------------------------------------------------------------


def zero_rows(model: torch.nn.Module, oto, rows_per_group) -> int:
    """Zero ``rows_per_group[z]`` (row indices) of every group z of ``oto``; returns how many rows."""
    total = 0
    with torch.no_grad():
        for zig, rows in zip(oto.groups, rows_per_group):
            rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
            if rows.numel() == 0:
                continue
            total += int(rows.numel())
            for name, dim, idx in zig.params:
                p = get_path(model, name)
                p.data.movedim(dim, 0)[idx[rows].reshape(-1)] = 0
    return total


def zero_random_rows(model: torch.nn.Module, oto, seed: int = 0, fraction: float = 0.5) -> list:
    """Zero a random ``floor(rows * fraction)`` rows of every group; returns the rows per group."""
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for zig in oto.groups:
        k = int(zig.rows * fraction)
        chosen.append(torch.randperm(zig.rows, generator=g)[:k].sort().values)
    zero_rows(model, oto, chosen)
    return chosen


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def eval_flags(module: torch.nn.Module):
    """Eval mode by setting every ``training`` flag directly, restored afterwards.

    NB: not ``module.eval()``: a ``torch.export`` GraphModule raises on ``eval()``.
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = False
        yield module
    finally:
        for m, f in flags:
            m.training = f


def _eval_outputs(module: torch.nn.Module, inputs, kwargs=None):
    with torch.no_grad(), eval_flags(module):
        return module(*inputs, **(kwargs or {}))


def max_rel_diff(ref, got) -> float:
    """max|ref - got| / max(1, max|ref|) over all tensor leaves (inf on a structure/shape mismatch)."""
    fr, _ = tree_flatten(ref)
    fg, _ = tree_flatten(got)
    assert len(fr) == len(fg), f"output structure differs: {len(fr)} vs {len(fg)} leaves"
    worst = 0.0
    for a, b in zip(fr, fg):
        if not isinstance(a, torch.Tensor):
            assert a == b
            continue
        got_shape = getattr(b, "shape", b)
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, f"output shape differs: {a.shape} vs {got_shape}"
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            assert torch.equal(a, b)
            continue
        a64, b64 = a.double(), b.double()
        diff = (a64 - b64).abs().max().item()
        worst = max(worst, diff / max(1.0, a64.abs().max().item()))
    return worst


def _as_inputs(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def assert_exact(model: torch.nn.Module, oto, x, *, smaller: bool = True, small=None, ref_kwargs=None):
    """The zeroed full ``model`` and ``oto.compress()`` agree in eval mode on ``x``; returns the small model.

    Tolerance is OTO.md's: max|diff| <= 1e-4 * max(1, max|y|). With ``smaller`` (the default) the
    compressed model must have strictly fewer parameters than ``model``. ``ref_kwargs`` go to the
    full model's call (``use_cache=False`` for a Hugging Face model, captured without its cache), and
    to the compressed model's too when it is the model's own class (``compress()``'s module form).
    """
    if small is None:
        small = oto.compress()
    inputs = _as_inputs(x)
    ref = _eval_outputs(model, inputs, ref_kwargs)
    got = _eval_outputs(small, inputs, None if isinstance(small, torch.fx.GraphModule) else ref_kwargs)
    err = max_rel_diff(ref, got)
    assert err <= RTOL, f"compressed model differs from the zeroed full model: relative error {err:.3g}"
    # non-vacuous: the reference output must not be identically zero
    leaves = [t for t in tree_flatten(ref)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    assert any(t.abs().max().item() > 0 for t in leaves if t.numel()), "reference output is all zero"
    if smaller:
        assert n_params(small) < n_params(model), (
            f"compressed model is not smaller: {n_params(small)} vs {n_params(model)} parameters")
    return small


def fresh_like(x, seed: int = 1):
    """Another input of the same structure: new random floats; integer tensors (indices) are kept."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(x, (tuple, list)):
        return type(x)(fresh_like(v, seed + i) for i, v in enumerate(x))
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x


def assert_hub_refuses_and_otofx_loads(model: torch.nn.Module, small: torch.nn.Module, folder, x) -> None:
    """``small`` (a compressed Hugging Face model of ``model``'s class) saved by ``save_pretrained``:
    ``from_pretrained`` refuses the checkpoint's shapes; ``otofx.save``/``otofx.load`` give back a
    model whose first output on ``x`` is ``small``'s, bit for bit."""
    import pytest

    import otofx

    small.save_pretrained(folder / "hf")
    with pytest.raises(Exception, match="(?i)size|shape"):
        type(model).from_pretrained(folder / "hf")
    otofx.save(small, folder / "otofx")
    back = otofx.load(folder / "otofx")
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], small(x)[0], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Non-mutation
# ---------------------------------------------------------------------------------------------


def snapshot(model: torch.nn.Module) -> tuple:
    """Every state_dict entry (name, dtype, shape, content hash) and every module's training flag."""
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        data = t.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else ""
        out.append((name, str(data.dtype), tuple(t.shape), digest))
    out.extend((name, m.training) for name, m in model.named_modules())
    return tuple(out)


def triton_interpreter_unusable() -> str | None:
    """Why Triton kernels cannot run on the interpreter here, or None when they can."""
    from otofx import kernels

    if not kernels.triton_available():
        return "triton cannot be imported"
    import numpy as np
    import triton

    # NB: triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a Python int with
    # int(array), which numpy 2.4 refuses; CI's torch-2.11 run installs numpy<2.4 to run these tests
    old = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7)
    new_np = tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4)
    if old and new_np:
        return (f"triton {triton.__version__}'s interpreter fails under numpy {np.__version__} (needs numpy<2.4); "
                "compiled Triton runs in tests/gpu")
    return None
