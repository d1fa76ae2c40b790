"""Targeted checks of rule algebra beyond the example sweep of ``test_rules.py``.

(a) a bias (an additive constant) makes the axes a layer passes through not zero with their rows:
    linear, conv, embedding, grouped_mm, at the rule level and end to end (MLP-Mixer's token mixing);
(b) pixel shuffle / unshuffle rows are blocks of r * r channels;
(c) every ATen resample and grid sampler overload is bound, so export and symbolic_trace agree.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import assert_exact, build, fresh_like, randomize, zero_random_rows, zero_rows
from otofx.passes.channels import AxisLabels, Ctx, ParamRef, true_mask
from otofx.passes.registry import RULES, form_for
import rule_examples as R

pytestmark = pytest.mark.usefixtures("single_thread")

aten = torch.ops.aten


def groups_with(oto, name: str, dim: int) -> list:
    return [z for z in oto.groups if any(n == name and d == dim for n, d, _ in z.params)]


def index(zig, name: str, dim: int) -> torch.Tensor:
    idx = [i for n, d, i in zig.params if n == name and d == dim]
    assert len(idx) == 1, f"{name} dim {dim} listed {len(idx)} times"
    return idx[0]


# =============================================================================================
# (a) a bias is a constant added along the axes the layer passes through
# =============================================================================================


def _lab(ctx: Ctx, *shape) -> AxisLabels:
    """An activation whose every axis is a channel, zero with its rows."""
    return AxisLabels(tuple(ctx.fresh(n) for n in shape), tuple(true_mask(n) for n in shape))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_bias_clears_the_passed_axes(bias):
    root = nn.Module()
    root.l = nn.Linear(5, 5, bias=bias)
    ctx = Ctx(root)
    x = _lab(ctx, 2, 8, 5)
    out = RULES["linear"].analyze(ctx, input=x, weight=ParamRef("l.weight"),
                                  bias=ParamRef("l.bias") if bias else None, meta=torch.empty(2, 8, 5))
    assert out.zero[-1].all(), "the layer's own axis is zero with its rows"
    for d in (0, 1):
        assert out.zero[d].all() != bias, f"axis {d}: zero with its rows only without a bias"
        assert out.ids[d] is x.ids[d]


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bias_clears_the_batch_axis(bias):
    root = nn.Module()
    root.c = nn.Conv1d(3, 4, 3, padding=1, bias=bias)
    ctx = Ctx(root)
    x = _lab(ctx, 6, 3, 5)
    out = RULES["conv"].analyze(ctx, input=x, weight=ParamRef("c.weight"), bias=ParamRef("c.bias") if bias else None,
                                meta=torch.empty(6, 4, 5))
    assert out.zero[1].all()
    assert out.zero[0].all() != bias


def test_embedding_index_axes_are_never_zero():
    root = nn.Module()
    root.e = nn.Embedding(10, 4)
    ctx = Ctx(root)
    idx = _lab(ctx, 2, 8)
    out = RULES["embedding"].analyze(ctx, input=idx, weight=ParamRef("e.weight"), meta=torch.empty(2, 8, 4))
    assert not out.zero[0].any() and not out.zero[1].any(), "index 0 reads the table's row 0, not zeros"
    assert out.zero[2].all()


def test_grouped_mm_bias_clears_the_rows_and_pins_them():
    ctx = Ctx(nn.Module())
    x, w, b = _lab(ctx, 6, 8), _lab(ctx, 3, 8, 4), _lab(ctx, 3, 4)
    out = RULES["grouped_mm"].analyze(ctx, input=x, other=w, bias=b, meta=torch.empty(6, 4))
    assert not out.zero[0].any(), "the bias is added to every row"
    assert out.zero[1].all()
    assert ctx.uf.pinned(x.ids[0]).all(), "offs cut the rows into groups by position"


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("form", ["graph", "module", "auto"])
def test_token_mixing_bias_keeps_the_normalised_channels(norm, form):
    """The audit's repro: a Linear(T, T) with a bias over the tokens, then a norm over the channels.
    Every compress() form is exact (the graph form used to raise VerificationError). An RMS norm keeps
    a's channels; a layer norm fills the bias's constant back in (tests/test_mixer.py), so they are rows."""
    factory = {"layer_norm": R.token_mixing_linear_bias_layer_norm,
               "rms_norm": R.token_mixing_linear_bias_rms_norm}[norm]
    model, x = build(factory)
    oto = otofx.OTO(model, x)
    if norm == "rms_norm":
        assert not groups_with(oto, "a.weight", 0), "a's channels reach the norm as the token layer's bias"
        assert any(p.reason == f"{norm} normalises over this axis" for p in oto.pinned)
    else:
        assert groups_with(oto, "a.weight", 0) and not any("normalises" in p.reason for p in oto.pinned)
    assert groups_with(oto, "b.weight", 0), "the head's hidden layer stays prunable"
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form=form)
    assert_exact(model, oto, fresh_like(x), small=small)


def test_token_mixing_bias_without_norm_keeps_the_rows():
    """The bias reaches the next layer only through its zeroed columns: a's channels stay rows, and
    removing them (with b's columns) is exact."""
    model, x = build(R.token_mixing_linear_bias_rows_stay)
    oto = otofx.OTO(model, x)
    (z,) = groups_with(oto, "a.weight", 0)
    assert z.rows == 8 and torch.equal(index(z, "b.weight", 1), index(z, "a.weight", 0))
    assert not any(n.startswith("tok.") for n, _, _ in z.params)
    zero_rows(model, oto, [torch.tensor([1, 4, 6]) if g is z else torch.tensor([], dtype=torch.long)
                           for g in oto.groups])
    small = assert_exact(model, oto, fresh_like(x))
    assert small.a.out_features == 5


# =============================================================================================
# (b) pixel shuffle
# =============================================================================================


def test_pixel_shuffle_rows_are_blocks_of_r_squared():
    model, x = build(R.pixel_shuffle_upsampler)
    oto = otofx.OTO(model, x)
    (z,) = groups_with(oto, "c2.weight", 0)
    assert z.rows == 4
    assert index(z, "c2.weight", 0).sort(1).values.tolist() == np.arange(16).reshape(4, 4).tolist()
    assert index(z, "c3.weight", 1).reshape(-1).tolist() == [0, 1, 2, 3]
    zero_rows(model, oto, [torch.tensor([2]) if g is z else torch.tensor([], dtype=torch.long) for g in oto.groups])
    small = assert_exact(model, oto, fresh_like(x))
    assert small.c2.out_channels == 12 and small.c3.in_channels == 3


def test_pixel_unshuffle_spreads_a_channel_over_r_squared():
    model, x = build(R.pixel_unshuffle_downsampler)
    oto = otofx.OTO(model, x)
    (z,) = groups_with(oto, "c1.weight", 0)
    assert z.rows == 6
    assert index(z, "c2.weight", 1).sort(1).values.tolist() == np.arange(24).reshape(6, 4).tolist()
    zero_rows(model, oto, [torch.tensor([0, 5])])
    small = assert_exact(model, oto, fresh_like(x))
    assert small.c1.out_channels == 4 and small.c2.in_channels == 16


def test_pixel_shuffle_forms_are_bound():
    for t in (nn.PixelShuffle, nn.PixelUnshuffle, F.pixel_shuffle, F.pixel_unshuffle, aten.pixel_shuffle.default,
              aten.pixel_unshuffle.default):
        assert form_for(t).rule == "pixel_shuffle", t


# =============================================================================================
# (c) resampling under torch.export
# =============================================================================================

_RESAMPLE = ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
             "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
             "upsample_bicubic2d", "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")


@pytest.mark.parametrize("name", _RESAMPLE)
def test_every_aten_resample_is_bound(name):
    packet = getattr(aten, name)
    for ov in ("default", "vec"):
        if hasattr(packet, ov):
            assert form_for(getattr(packet, ov)).rule == "resample", f"{name}.{ov}"


def test_every_grid_sampler_is_bound():
    for name in ("grid_sampler", "grid_sampler_2d", "grid_sampler_3d", "cudnn_grid_sampler"):
        assert form_for(getattr(aten, name).default).rule == "grid_sample", name
    assert form_for(F.grid_sample).rule == "grid_sample"


class _Resampled(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(F.interpolate(torch.relu(self.c1(x)), **self.kw))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_antialias_export_matches_symbolic_trace(mode):
    """The audit's repro: F.interpolate(antialias=True) is aten._upsample_*_aa under torch.export."""
    kw = dict(scale_factor=0.5, mode=mode, antialias=True)
    rows = {}
    for frontend in ("symbolic_trace", "export"):
        model = randomize(_Resampled(**kw)).eval()
        x = torch.randn(2, 3, 8, 8)
        oto = otofx.OTO(model, x, frontend=frontend)
        assert [p.reason for p in oto.pinned] == ["model output"], oto.pinned
        rows[frontend] = [z.rows for z in oto.groups]
        zero_random_rows(model, oto, seed=1)
        assert_exact(model, oto, fresh_like(x), small=oto.compress(verify=frontend != "export"))
    assert rows["export"] == rows["symbolic_trace"] == [8]


def test_grid_sample_flow_pins_the_coordinates_only():
    model, x = build(R.grid_sample_flow_field)
    oto = otofx.OTO(model, x)
    assert not groups_with(oto, "flow.weight", 0), "the flow conv's outputs are coordinates"
    (z,) = groups_with(oto, "c1.weight", 0)
    assert z.rows == 8 and torch.equal(index(z, "flow.weight", 1), index(z, "c2.weight", 1))


# =============================================================================================
# known gaps outside linalg.py: the same flaw in rules owned elsewhere (norm.py, attention.py)
# =============================================================================================


class _ChannelsAsTokens(nn.Module):
    """a's 8 channels put on a non-channel axis of ``mid`` (LayerNorm(T), BatchNorm1d(T), the query
    tokens of a cross-attention), then an RMS norm over them: ``mid`` adds a constant there."""

    def __init__(self, mid):
        super().__init__()
        self.a, self.mid, self.norm, self.b = nn.Linear(6, 8), mid, nn.RMSNorm(8), nn.Linear(8, 3)
        self.kv = nn.Linear(6, 5) if isinstance(mid, nn.MultiheadAttention) else None

    def forward(self, x):  # x [N, 5, 6]
        h = self.a(x).transpose(1, 2)  # [N, 8, 5]
        if isinstance(self.mid, nn.MultiheadAttention):
            kv = self.kv(x)
            h = self.mid(h, kv, kv, need_weights=False)[0]
        elif isinstance(self.mid, nn.BatchNorm1d):
            h = self.mid(h.transpose(1, 2)).transpose(1, 2)
        else:
            h = self.mid(h)
        return self.b(self.norm(h.transpose(1, 2)))


# NB: norms (a bias, -mean/std) and attention (a softmax average of values) add a constant along the axes
# they pass through: a zero channel there is not zero after them
@pytest.mark.parametrize("mid", ["layer_norm", "batch_norm", "cross_attention"])
def test_constant_adding_ops_clear_passed_zero_masks(mid):
    layer = {"layer_norm": lambda: nn.LayerNorm(5), "batch_norm": lambda: nn.BatchNorm1d(5),
             "cross_attention": lambda: nn.MultiheadAttention(5, 1, batch_first=True)}[mid]()
    model = randomize(_ChannelsAsTokens(layer)).eval()
    x = torch.randn(2, 5, 6)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, fresh_like(x), small=oto.compress(form="graph", verify=False), smaller=False)


def test_a_crop_at_a_run_time_bound_pins_only_the_cropped_axes():
    # x[:, :, :h, :w - 1] with h, w read off a shape: the channels pass (timm's Swin, DaViT and PiT lost
    # every width to "indexed by a tensor or computed value")
    from otofx.passes.rules.indexing import getitem  # noqa: F401 - the rule under test

    m, x = R.indexing.slice_at_a_size_read_at_run_time()
    oto = otofx.OTO(randomize(m.eval()), x)
    assert [z.rows for z in oto.groups] == [8]
    zero_random_rows(oto.model, oto, seed=0)
    assert_exact(m, oto, x)
