"""PrunedMultiheadAttention against nn.MultiheadAttention, option by option.

* With every head kept it is the stock module: same outputs and attention weights for every
  layout (batch first or not, unbatched), projection form (packed self-attention, packed with
  key is value, packed with three inputs, separate kdim/vdim weights), bias_k/bias_v,
  add_zero_attn, masks (bool/float, 2D/3D, key padding), need_weights/average_attn_weights and the
  is_causal hint, in eval and in training mode (gradients too).
* With heads removed it equals the stock module whose heads are zeroed (a per-head mask follows
  the heads left; per-head weights are the kept heads' rows).
* Self-attention makes no copies: one packed projection, views into q/k/v, the attention kernel
  and the out projection (counted with a TorchDispatchMode, not timed).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import randomize
from otofx.passes.modules import PrunedMultiheadAttention

E, H, L, S, B = 16, 4, 5, 6, 3
HD = E // H

pytestmark = pytest.mark.usefixtures("single_thread")


def _mha(batch_first=True, kdim=None, bias_kv=False, zero_attn=False, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim, add_bias_kv=bias_kv,
                              add_zero_attn=zero_attn)
    return randomize(m.eval(), seed)


def _inputs(case, batch_first, kdim=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    if case.get("unbatched"):
        shape = lambda n, e: (n, e)  # noqa: E731
    q = torch.randn(shape(L, E), generator=g)
    form = case.get("form", "self")
    if form == "self":
        return q, q, q
    kv = kdim or E
    k = torch.randn(shape(S, kv), generator=g)
    v = k if form == "kv" else torch.randn(shape(S, kv), generator=g)
    return q, k, v


def _masks(case, n_keys, seed=2):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    am = case.get("attn_mask")
    if am == "bool2d":
        kw["attn_mask"] = torch.rand(L, n_keys, generator=g) < 0.3
        kw["attn_mask"][:, 0] = False  # no fully masked row (NaN either way)
    elif am == "float3d":
        kw["attn_mask"] = torch.randn((1 if case.get("unbatched") else B) * H, L, n_keys, generator=g)
    elif am == "causal":
        kw["attn_mask"] = torch.ones(L, n_keys, dtype=torch.bool).triu(1)
        kw["is_causal"] = True
    kpm = case.get("kpm")
    if kpm is not None:
        m = torch.rand(n_keys, generator=g) < 0.3 if case.get("unbatched") else torch.rand(B, n_keys, generator=g) < 0.3
        m[..., 0] = False
        kw["key_padding_mask"] = m if kpm == "bool" else torch.zeros(m.shape).masked_fill(m, -1e4)
    return kw


CASES = {
    "self": {},
    "self_seq_first": {"batch_first": False},
    "self_unbatched": {"unbatched": True},
    "kv_cross": {"form": "kv"},
    "three_inputs_seq_first": {"form": "qkv", "batch_first": False},
    "kdim_separate": {"form": "qkv", "kdim": 7},
    "kdim_kv_same_tensor": {"form": "kv", "kdim": 7, "batch_first": False},
    "bias_kv_zero_attn_masks": {"form": "kv", "bias_kv": True, "zero_attn": True, "attn_mask": "bool2d",
                                "kpm": "bool"},
    "float3d_mask_float_kpm": {"attn_mask": "float3d", "kpm": "float"},
    "float3d_mask_unbatched": {"attn_mask": "float3d", "unbatched": True, "kpm": "float"},
    "causal_hint": {"attn_mask": "causal"},
    "causal_hint_kpm_seq_first": {"attn_mask": "causal", "kpm": "bool", "batch_first": False},
    "weights_averaged": {"need_weights": True, "attn_mask": "bool2d"},
    "weights_per_head_bias_kv": {"need_weights": True, "average": False, "bias_kv": True, "form": "qkv",
                                 "kpm": "bool"},
}


def _call(m, case, batch_first):
    q, k, v = _inputs(case, batch_first, case.get("kdim"))
    n_keys = L if case.get("form", "self") == "self" else S
    kw = _masks(case, n_keys)
    return m(q, k, v, need_weights=case.get("need_weights", False),
             average_attn_weights=case.get("average", True), **kw), (q, k, v)


def _pruned_copy(mha):
    src = copy.deepcopy(mha)
    return PrunedMultiheadAttention(src, mha.num_heads, mha.head_dim, torch.arange(mha.num_heads), mha.num_heads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_all_heads_kept_is_the_stock_module(name):
    case = CASES[name]
    bf = case.get("batch_first", True)
    mha = _mha(bf, case.get("kdim"), case.get("bias_kv", False), case.get("zero_attn", False))
    ours = _pruned_copy(mha)
    # eval without grad: the stock module takes its fused path where it can
    with torch.no_grad():
        (ref, ref_w), _ = _call(mha, case, bf)
        (got, got_w), _ = _call(ours, case, bf)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if ref_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, ref_w, rtol=1e-5, atol=1e-6)
    # training mode (dropout 0), with gradients of the inputs and every parameter
    mha.train()
    ours.train()
    (ref, _), xs = _call(mha, case, bf)
    ref.square().sum().backward()
    (got, _), _ = _call(ours, case, bf)
    got.square().sum().backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    theirs = dict(mha.named_parameters())
    for pname, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[pname].grad, rtol=1e-4, atol=1e-5, msg=pname)


def _zero_and_slice(mha, drop):
    """(stock module with heads ``drop`` zeroed, PrunedMultiheadAttention without them)."""
    keep = torch.tensor([h for h in range(H) if h not in drop], dtype=torch.long)
    dense = copy.deepcopy(mha)
    src = copy.deepcopy(mha)
    with torch.no_grad():
        if dense._qkv_same_embed_dim:
            dense.in_proj_weight.view(3, H, HD, -1)[:, drop] = 0
            src.in_proj_weight = nn.Parameter(mha.in_proj_weight.view(3, H, HD, -1)[:, keep].reshape(-1, E))
        else:
            for part in ("q", "k", "v"):
                w = getattr(dense, f"{part}_proj_weight")
                w.view(H, HD, -1)[drop] = 0
                kept = getattr(mha, f"{part}_proj_weight").view(H, HD, -1)[keep]
                setattr(src, f"{part}_proj_weight", nn.Parameter(kept.reshape(len(keep) * HD, -1)))
        dense.in_proj_bias.view(3, H, HD)[:, drop] = 0
        src.in_proj_bias = nn.Parameter(mha.in_proj_bias.view(3, H, HD)[:, keep].reshape(-1))
        dense.out_proj.weight.view(E, H, HD)[:, drop] = 0
        src.out_proj.weight = nn.Parameter(mha.out_proj.weight.view(E, H, HD)[:, keep].reshape(E, -1))
        for b in ("bias_k", "bias_v"):
            t = getattr(mha, b)
            if t is not None:
                getattr(dense, b).view(H, HD)[drop] = 0
                setattr(src, b, nn.Parameter(t.view(1, 1, H, HD)[:, :, keep].reshape(1, 1, -1)))
    return dense, PrunedMultiheadAttention(src, len(keep), HD, keep, H).eval(), keep


@pytest.mark.parametrize("name", ["self", "self_seq_first", "kdim_separate", "float3d_mask_float_kpm",
                                  "weights_per_head_bias_kv", "causal_hint"])
def test_heads_removed_equal_zeroed_heads(name):
    case = CASES[name]
    bf = case.get("batch_first", True)
    mha = _mha(bf, case.get("kdim"), case.get("bias_kv", False), case.get("zero_attn", False))
    dense, small, keep = _zero_and_slice(mha, [1, 2])
    with torch.no_grad():
        (ref, ref_w), _ = _call(dense, case, bf)
        (got, got_w), _ = _call(small, case, bf)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if case.get("need_weights") and not case.get("average", True):
        torch.testing.assert_close(got_w, ref_w[:, keep], rtol=1e-5, atol=1e-6)


def test_every_head_removed_leaves_the_out_bias():
    mha = _mha()
    dense, small, _ = _zero_and_slice(mha, list(range(H)))
    x = torch.randn(B, L, E)
    with torch.no_grad():
        ref, _ = dense(x, x, x, need_weights=False)
        got, _ = small(x, x, x, need_weights=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", [(B, L, E), (L, E)], ids=["batched", "unbatched"])
def test_self_attention_makes_no_copies(shape):
    """One packed projection, views, the attention kernel, the out projection: no clone/copy."""
    mha = _mha(batch_first=True)
    dense, small, _ = _zero_and_slice(mha, [0, 3])
    x = torch.randn(shape)
    with torch.no_grad(), _Ops() as seen:
        small(x, x, x, need_weights=False)
    copies = [op for op in seen.ops if op in ("clone", "copy_", "_to_copy", "contiguous", "cat")]
    assert not copies, seen.ops
    assert sum(op in ("addmm", "mm", "linear") for op in seen.ops) == 2, seen.ops  # in and out projections
    assert any("scaled_dot_product" in op for op in seen.ops), seen.ops


def test_dropout_applies_in_training_only():
    mha = _mha()
    mha.dropout = 0.5
    ours = _pruned_copy(mha)
    x = torch.randn(B, L, E)
    with torch.no_grad():
        ours.eval()
        a, _ = ours(x, x, x, need_weights=False)
        b, _ = ours(x, x, x, need_weights=False)
        ours.train()
        torch.manual_seed(0)
        c, _ = ours(x, x, x, need_weights=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)
