"""A position table added into a stream whose channels are removed (diffusers' DiT, SD3, PixArt).

A patch embedding plus a sin-cos position table (a buffer, not a parameter) makes the stream; its
removed channels hold the table's values, not zeros, and the layer norms reading them get those values
as their ``fill`` (as MLP-Mixer's do, ``test_mixer.py``). Two things follow in the model's own class:

* an ``nn.LayerNorm`` without weights (DiT's ``elementwise_affine=False``) is a ``PrunedOwnLayerNorm``,
  which takes the fill too (it used to raise "no module of the model computes it");
* a fill read at the example's positions is right at that size only. Where the model takes other
  sizes (its table is recomputed for the input's grid, or cropped from a larger one), the own class
  keeps the widths holding the table (``OTO._sizes_taken``, ``OTO._check_positions``); where it does
  not (a fixed table), they go, and the fill holds the example's positions.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import assert_exact, max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedLayerNorm, PrunedOwnLayerNorm

pytestmark = pytest.mark.usefixtures("single_thread")

DIM, PATCH, SIDE = 16, 2, 8


def sincos(dim: int, gh: int, gw: int) -> torch.Tensor:
    """A 2-D sin-cos position table [1, gh * gw, dim] (half the channels per axis)."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                            indexing="ij")
    parts = [f(a.reshape(-1, 1) * omega) for a in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, 1).float()[None]


class TinyDiT(nn.Module):
    """Patch embedding + sin-cos table, one pre-norm MLP block, a final norm and a head. ``recompute``:
    the table is rebuilt for another grid (diffusers' PatchEmbed), so the model takes any even size;
    else it is fixed to the example's grid. ``affine``: the norms' weights."""

    def __init__(self, recompute: bool, affine: bool):
        super().__init__()
        self.recompute, self.grid = recompute, SIDE // PATCH
        self.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.register_buffer("pos", sincos(DIM, self.grid, self.grid), persistent=False)
        self.norm1 = nn.LayerNorm(DIM, elementwise_affine=affine, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(DIM, 32), nn.Linear(32, DIM)
        self.norm2 = nn.LayerNorm(DIM, elementwise_affine=affine, eps=1e-6)
        self.head = nn.Linear(DIM, 5)

    def forward(self, x):
        h = self.proj(x)
        gh, gw = h.shape[-2], h.shape[-1]
        pos = self.pos
        if self.recompute and (gh != self.grid or gw != self.grid):
            pos = sincos(self.pos.shape[-1], gh, gw)
        h = h.flatten(2).transpose(1, 2) + pos
        h = h + self.fc2(F.gelu(self.fc1(self.norm1(h))))
        return self.head(self.norm2(h)).mean(1)


def _model(recompute: bool, affine: bool):
    torch.manual_seed(0)
    model = randomize(TinyDiT(recompute, affine).eval())
    return model, torch.randn(1, 3, SIDE, SIDE)


def _stream(oto):
    return next((i for i, z in enumerate(oto.groups) if any(n == "proj.weight" for n, _, _ in z.params)), None)


@pytest.mark.parametrize("affine", [False, True])
def test_a_fixed_table_is_filled_in_the_own_class(affine):
    """The table fits one grid: the stream goes, and its norms hold the example's positions."""
    model, x = _model(recompute=False, affine=affine)
    oto = otofx.OTO(model, x)
    assert _stream(oto) is not None
    zero_random_rows(model, oto, seed=1)
    small = assert_exact(model, oto, torch.randn(3, 3, SIDE, SIDE), small=oto.compress(form="module"))
    assert type(small) is TinyDiT and small.proj.out_channels == DIM // 2
    norm = small.norm2
    assert isinstance(norm, PrunedLayerNorm if affine else PrunedOwnLayerNorm)
    assert norm.fill is not None and norm.fill.shape == (1, (SIDE // PATCH) ** 2, DIM // 2)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 2 * SIDE, 2 * SIDE))  # the model takes the example's grid only


@pytest.mark.parametrize("affine", [False, True])
def test_a_recomputed_table_keeps_the_stream_in_the_own_class(affine, caplog):
    """The model takes other sizes, where the table (and so what the removed channels hold) differs: the
    own class keeps the stream's zero rows, says why, removes the rest, and is exact at every size."""
    model, x = _model(recompute=True, affine=affine)
    oto = otofx.OTO(model, x)
    stream = _stream(oto)
    assert stream is not None
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress(form="module")
    assert "position table" in caplog.text
    assert type(small) is TinyDiT and small.proj.out_channels == DIM
    assert small.fc1.out_features < 32 and n_params(small) < n_params(model)
    assert all(getattr(m, "fill", None) is None for m in small.modules())
    for side in (SIDE, 2 * SIDE, 12):
        xs = torch.randn(2, 3, side, side)
        with torch.no_grad():
            assert max_rel_diff(model(xs), small(xs)) <= 1e-4, side


def test_the_fill_of_a_norm_without_weights_saves_and_loads(tmp_path):
    model, x = _model(recompute=False, affine=False)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=2)
    small = oto.compress(form="module")
    otofx.save(small, tmp_path / "dit")
    back = otofx.load(tmp_path / "dit", model=_model(recompute=False, affine=False)[0])
    assert isinstance(back.norm1, PrunedOwnLayerNorm) and torch.equal(back.norm1.fill, small.norm1.fill)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_a_table_cropped_from_a_larger_one_keeps_the_stream():
    """SD3's way: the table is cut from a larger grid's, centred, for each input size (same token count
    at another aspect: other values, same shape), so a fill would be silently wrong, not refused."""

    class Cropped(TinyDiT):
        def __init__(self):
            super().__init__(recompute=False, affine=True)
            self.register_buffer("big", sincos(DIM, 8, 8), persistent=False)

        def forward(self, x):
            h = self.proj(x)
            gh, gw = h.shape[-2], h.shape[-1]
            top, left = (8 - gh) // 2, (8 - gw) // 2
            pos = self.big.reshape(1, 8, 8, DIM)[:, top:top + gh, left:left + gw].reshape(1, gh * gw, DIM)
            h = h.flatten(2).transpose(1, 2) + pos
            h = h + self.fc2(F.gelu(self.fc1(self.norm1(h))))
            return self.head(self.norm2(h)).mean(1)

    torch.manual_seed(0)
    model = randomize(Cropped().eval())
    oto = otofx.OTO(model, torch.randn(1, 3, SIDE, SIDE))
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    assert small.proj.out_channels == DIM
    for shape in ((2, 3, SIDE, SIDE), (1, 3, 2 * SIDE, 2 * SIDE), (1, 3, 4, 16)):
        xs = torch.randn(shape)
        with torch.no_grad():
            assert max_rel_diff(model(xs), small(xs)) <= 1e-4, shape
