"""MLP-Mixer's residual stream is a group: a layer norm fills back the constants its removed channels hold.

A Mixer block mixes tokens with an MLP along the token axis (``norm1 -> transpose -> Linear(T, T')
-> act -> Linear(T', T) -> transpose -> + x``). Its biases are shared by every channel, so a stream
channel whose row is zero comes out of the token MLP as ``fc2(act(b1)) + b2`` per token: not zero,
but the same for every input. The next LayerNorm counts it in its mean and variance, so removing it
with the old divisor alone is not exact (that pinned the stream: timm's mixer_s32_224 kept 0.54 of
its parameters). The analysis now tracks such constant channels (``AxisLabels.const``), and the
compressed norm gets their values (read off one run of the zeroed model, ``passes.prune.constant_fills``)
as its ``fill``: ``layer_norm_kept_divisor(..., fill=)`` in the graph, ``PrunedLayerNorm.fill`` in the
model's own class. Covered: timm's layout, a channels-first stream whose norms are transposed around
``F.layer_norm``, lucidrains' ``Conv1d(T, T', 1)`` token mixing, timm's mixer_s32_224 and gMLP-mixer
(GLU token MLP), dropout that stops the constants, and compressing twice.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import assert_exact, max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedLayerNorm, layer_norm_kept_divisor

pytestmark = pytest.mark.usefixtures("single_thread")

SIDE, PATCH, DIM, TOKEN_HIDDEN, CHANNEL_HIDDEN = 16, 4, 16, 8, 32
TOKENS = (SIDE // PATCH) ** 2


# ---------------------------------------------------------------------------------------------
# the kept divisor with filled constants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1, 5), (1, 1), (3, 5)])
def test_kept_divisor_with_a_fill_is_layer_norm_over_the_filled_input(dtype, lead):
    """The pooled mean and variance of the kept entries and the fill are the full norm's."""
    g = torch.Generator().manual_seed(0)
    old, new = 12, 7
    x = torch.randn(3, 5, new, generator=g, dtype=torch.float64) * 3 + 4
    fill = torch.randn(*lead, old - new, generator=g, dtype=torch.float64) * 2 - 1
    w, b = torch.rand(new, generator=g, dtype=torch.float64) + 0.5, torch.rand(new, generator=g, dtype=torch.float64)
    full = torch.cat([x, fill.expand(3, 5, old - new)], -1)
    ref = F.layer_norm(full, (old,), eps=1e-6)[..., :new] * w + b
    got = layer_norm_kept_divisor(x.to(dtype), (new,), w.to(dtype), b.to(dtype), 1e-6, old=old, new=new,
                                  fill=fill.to(dtype))
    assert got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.1}[dtype]
    assert (got.double() - ref).abs().max() <= tol * ref.abs().max()
    with pytest.raises(ValueError, match="fill holds"):
        layer_norm_kept_divisor(x, (new,), w, b, 1e-6, old=old + 1, new=new, fill=fill)
    if lead[1] > 1:  # constants read per token fit inputs of that many tokens only
        with pytest.raises(ValueError, match="do not broadcast"):
            layer_norm_kept_divisor(x[:, :1], (new,), w, b, 1e-6, old=old, new=new, fill=fill)


# ---------------------------------------------------------------------------------------------
# hand-written Mixers
# ---------------------------------------------------------------------------------------------


class TokenMLP(nn.Module):
    def __init__(self, layout: str, drop: float = 0.0):
        super().__init__()
        layer = (lambda i, o: nn.Conv1d(i, o, 1)) if layout == "conv1d" else nn.Linear
        self.fc1, self.fc2 = layer(TOKENS, TOKEN_HIDDEN), layer(TOKEN_HIDDEN, TOKENS)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """One Mixer block. ``timm``: stream [B, T, C], the token MLP between two transposes.
    ``conv1d`` (lucidrains' mlp-mixer-pytorch): a ``Conv1d(T, T', 1)`` reads the normed [B, T, C] as
    it is. ``channels_first``: stream [B, C, T], each layer norm transposed around ``F.layer_norm``,
    the token MLP a Linear over the last axis, the channel MLP ``Conv1d(C, C', 1)``s."""

    def __init__(self, layout: str, drop: float = 0.0):
        super().__init__()
        self.layout = layout
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.tokens = TokenMLP(layout, drop)
        if layout == "channels_first":
            self.fc1, self.fc2 = nn.Conv1d(DIM, CHANNEL_HIDDEN, 1), nn.Conv1d(CHANNEL_HIDDEN, DIM, 1)
        else:
            self.fc1, self.fc2 = nn.Linear(DIM, CHANNEL_HIDDEN), nn.Linear(CHANNEL_HIDDEN, DIM)

    def _norm(self, norm, x):
        w, b = norm.weight, norm.bias
        return F.layer_norm(x.transpose(1, 2), (DIM,), w, b, norm.eps).transpose(1, 2)

    def forward(self, x):
        if self.layout == "timm":
            x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        if self.layout == "conv1d":
            x = x + self.tokens(self.norm1(x))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        x = x + self.tokens(self._norm(self.norm1, x))
        return x + self.fc2(F.gelu(self.fc1(self._norm(self.norm2, x))))


class Mixer(nn.Module):
    def __init__(self, layout: str = "timm", depth: int = 2, drop: float = 0.0):
        super().__init__()
        self.layout = layout
        self.stem = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.blocks = nn.Sequential(*[Block(layout, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 10)

    def forward(self, x):
        x = self.stem(x).flatten(2)  # [B, C, T]
        if self.layout != "channels_first":
            x = x.transpose(1, 2)
        x = self.blocks(x)
        if self.layout == "channels_first":
            x = x.transpose(1, 2)
        return self.head(self.norm(x).mean(1))


def _mixer(layout="timm", **kw):
    torch.manual_seed(0)
    return randomize(Mixer(layout, **kw)).eval(), torch.randn(2, 3, SIDE, SIDE)


def _stream(oto):
    return next((z for z in oto.groups if any(n == "stem.weight" and d == 0 for n, d, _ in z.params)), None)


def _exact_in_train_mode(model, small, x):
    full, comp = copy.deepcopy(model).double().train(), copy.deepcopy(small).double().train()
    err = max_rel_diff(full(x.double()), comp(x.double()))
    assert err <= 1e-4, f"train mode (float64): relative error {err:.3g}"


@pytest.mark.parametrize("layout", ["timm", "conv1d", "channels_first"])
def test_mixer_stream_is_a_group_and_compresses_exactly(layout):
    model, x = _mixer(layout)
    oto = otofx.OTO(model, x)
    stream = _stream(oto)
    assert stream is not None and stream.rows == DIM, [p.reason for p in oto.pinned]
    assert not any("normalises" in p.reason for p in oto.pinned)
    # every norm after the first token MLP reads the bias constants: 2 per block but block 0's norm1, the final norm
    assert len(oto.zigset.fills) == 2 * len(model.blocks)
    zero_random_rows(model, oto, seed=1)
    # NB: the channels-first norms are F.layer_norm calls in the forward: only the graph keeps their divisor
    for form in ("graph",) if layout == "channels_first" else ("graph", "module"):
        small = assert_exact(model, oto, torch.randn(3, 3, SIDE, SIDE), small=oto.compress(form=form))
        _exact_in_train_mode(model, small, torch.randn(2, 3, SIDE, SIDE))
        assert n_params(small) < 0.4 * n_params(model)
    if layout != "channels_first":
        assert type(small) is Mixer and small.stem.out_channels == DIM // 2
        norm = small.blocks[1].norm1
        assert isinstance(norm, PrunedLayerNorm) and norm.fill is not None and norm.fill.shape[-1] == DIM // 2


def test_the_fill_is_the_token_mlp_bias_path():
    """With the stream's rows zero, every removed channel at block 0's norm2 holds fc2(gelu(b1)) + b2
    per token: the fill, cut to one batch entry."""
    model, x = _mixer(depth=1)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=2)
    small = oto.compress(form="module")
    t = model.blocks[0].tokens
    with torch.no_grad():
        k = t.fc2(F.gelu(t.fc1.bias))  # [T]
    fill = small.blocks[0].norm2.fill
    assert fill.shape == (1, TOKENS, DIM // 2)
    assert torch.allclose(fill, k[None, :, None].expand_as(fill), atol=1e-6)
    assert small.blocks[0].norm1.fill is None  # the stem's zero channels: nothing to fill


@pytest.mark.parametrize("frontend", ["export", "dynamo"])
def test_mixer_stream_is_a_group_through_aten_captures(frontend):
    model, x = _mixer()
    oto = otofx.OTO(model, x, frontend=frontend)
    assert _stream(oto) is not None and len(oto.zigset.fills) == 4
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, torch.randn(3, 3, SIDE, SIDE), small=oto.compress(form="graph"))


def test_dropout_stops_the_constants():
    """Dropout of a constant is not constant in training: with p > 0 in the token MLP the stream
    stays pinned by its norms; with p = 0 it is a group."""
    model, x = _mixer(drop=0.1)
    oto = otofx.OTO(model, x)
    assert _stream(oto) is None
    assert any(p.reason == "layer_norm normalises over this axis" for p in oto.pinned)
    assert not oto.zigset.fills


@pytest.mark.parametrize("form", ["graph", "module"])
def test_compressing_twice_grows_the_fill(form):
    """A compressed Mixer compressed again: each norm keeps its first width and appends the constants
    of the channels removed this time to those it holds."""
    model, x = _mixer()
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1, fraction=0.25)
    small = oto.compress(form=form)
    oto2 = otofx.OTO(small, x)
    assert DIM - DIM // 4 in [z.rows for z in oto2.groups] and len(oto2.zigset.fills) == 4
    zero_random_rows(small, oto2, seed=3, fraction=0.5)
    smaller = assert_exact(small, oto2, torch.randn(3, 3, SIDE, SIDE), small=oto2.compress(form=form))
    _exact_in_train_mode(small, smaller, torch.randn(2, 3, SIDE, SIDE))
    fills = {n: b for n, b in smaller.named_buffers() if n.endswith("fill")}
    assert len(fills) == 4 and all(b.shape == (1, TOKENS, DIM - (DIM - DIM // 4) // 2) for b in fills.values())
    if form == "module":
        norm = smaller.blocks[1].norm2
        assert isinstance(norm, PrunedLayerNorm) and norm.full_width == DIM


def test_mixer_with_fills_saves_and_loads(tmp_path):
    model, x = _mixer()
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    otofx.save(small, tmp_path / "mixer")
    back = otofx.load(tmp_path / "mixer", model=_mixer()[0])
    fill = back.blocks[1].norm1.fill
    assert isinstance(back.blocks[1].norm1, PrunedLayerNorm) and torch.equal(fill, small.blocks[1].norm1.fill)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixer_s32_224", "gmixer_12_224"])
def test_timm_mixers_keep_a_quarter_in_their_own_class(name):
    """mixer_s32_224 (8 blocks, width 512) and gMLP-mixer (GLU MLPs: the token MLP's halves are
    chunked and multiplied): the stream is a group, exact in eval and train mode, own class."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10, img_size=64, drop_rate=0.0,
                                        drop_path_rate=0.0)).eval()
    x = torch.randn(2, 3, 64, 64)
    oto = otofx.OTO(model, x)
    assert model.embed_dim in [z.rows for z in oto.groups]
    assert [p.reason for p in oto.pinned] == ["model output"]
    zero_random_rows(model, oto, seed=1)
    small = assert_exact(model, oto, torch.randn(3, 3, 64, 64))
    assert type(small) is type(model)
    assert 0.24 <= n_params(small) / n_params(model) <= 0.3
    _exact_in_train_mode(model, small, torch.randn(2, 3, 64, 64))
