"""GroupNorm(1, C) (PoolFormer, ConvFormer and the other MetaFormers) leaves its channels prunable.

One group normalises every channel together. A zero channel adds nothing to the sums of values and
squares, so when the norm has an affine weight and every channel it normalises is zero with its row,
each channel is a row: the graph keeps the old divisor (``group_norm_kept_divisor``) and the model's
own class gets ``PrunedGroupNorm`` (an ``nn.GroupNorm`` that divides by its old channel count). With
several groups, or no weight, a norm group stays one row. A layer scale kept as
``self.scale.view(self.shape)`` follows the new width (``passes.resize._broadcast_shapes``), and only
such a view shape; a model whose own forward divides by the new width keeps those zero rows in its own
class; the graph form survives ``torch.save``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import otofx
from helpers import assert_hub_refuses_and_otofx_loads, max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedGroupNorm, group_norm_kept_divisor


@settings(max_examples=40, deadline=None, derandomize=True)
@given(old=st.integers(2, 40), frac=st.floats(0.05, 1.0), offset=st.floats(-10.0, 10.0),
       eps=st.sampled_from([1e-6, 1e-5, 0.5]), bias=st.booleans(), spatial=st.integers(0, 2),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_kept_divisor_is_group_norm_over_the_zero_padded_input(old, frac, offset, eps, bias, spatial, dtype):
    new = max(1, min(old, round(old * frac)))
    g = torch.Generator().manual_seed(old * 97 + new)
    shape = (3, new) + (5, 4)[:spatial]
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + offset
    w = torch.rand(new, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(new, generator=g, dtype=torch.float64) - 0.5 if bias else None
    pad = torch.zeros((3, old - new) + shape[2:], dtype=torch.float64)
    zeros = torch.zeros(old - new, dtype=torch.float64)
    ref = F.group_norm(torch.cat([x, pad], 1), 1, torch.cat([w, zeros]), None if b is None else torch.cat([b, zeros]),
                       eps)[:, :new]
    got = group_norm_kept_divisor(x.to(dtype), 1, w.to(dtype), None if b is None else b.to(dtype), eps, old=old,
                                  new=new)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 2e-5 if dtype == torch.float32 else 3e-2
    assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max())


class Scale(nn.Module):
    """timm's layer scale: the shape of its view is an attribute."""

    def __init__(self, dim: int):
        super().__init__()
        self.shape = (dim, 1, 1)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.scale.view(self.shape)


class PoolBlock(nn.Module):
    def __init__(self, dim: int, norm):
        super().__init__()
        self.norm1, self.norm2 = norm(dim), norm(dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.ls1, self.ls2 = Scale(dim), Scale(dim)
        self.fc1, self.fc2 = nn.Conv2d(dim, 2 * dim, 1), nn.Conv2d(2 * dim, dim, 1)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.ls1(self.pool(y) - y)
        return x + self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class PoolFormer(nn.Module):
    def __init__(self, norm=lambda c: nn.GroupNorm(1, c)):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.blocks = nn.Sequential(PoolBlock(16, norm), PoolBlock(16, norm))
        self.down = nn.Conv2d(16, 24, 3, 2, 1)
        self.last = PoolBlock(24, norm)
        self.norm = norm(24)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.last(self.down(self.blocks(self.stem(x))))
        return self.head(self.norm(x).mean((2, 3)))


def _model(norm=None):
    torch.manual_seed(0)
    model = PoolFormer() if norm is None else PoolFormer(norm)
    return randomize(model).eval()


def test_metaformer_channels_are_rows_and_compress_to_its_own_class(caplog, tmp_path):
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups).count(16) >= 1 and 24 in [z.rows for z in oto.groups]
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level("WARNING", logger="otofx"):
        small = oto.compress()
    assert type(small) is PoolFormer and not caplog.records, [r.getMessage() for r in caplog.records]
    assert isinstance(small.norm, PrunedGroupNorm) and small.norm.num_channels == 12 and small.norm.full_channels == 24
    assert small.last.ls1.shape == (12, 1, 1) and n_params(small) < 0.4 * n_params(model)
    other = torch.randn(3, 3, 22, 18)  # another batch and image size
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4
    model.train(), small.train()
    assert max_rel_diff(model(other), small(other)) < 1e-4
    small.eval()
    otofx.save(small, tmp_path / "pf")
    back = otofx.load(tmp_path / "pf", model=_model())
    with torch.no_grad():
        assert torch.equal(back(other), small(other))


def test_compressed_again_keeps_the_first_divisor():
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    oto2 = otofx.OTO(small, x)
    zero_random_rows(small, oto2, seed=2)
    smaller = oto2.compress()
    assert smaller.norm.full_channels == 24 and smaller.norm.num_channels < 12
    with torch.no_grad():
        assert max_rel_diff(model(x), smaller(x)) < 1e-4 or max_rel_diff(small(x), smaller(x)) < 1e-4
        assert max_rel_diff(small(x), smaller(x)) < 1e-4


@pytest.mark.parametrize("norm", ["groups", "no_affine"])
def test_several_groups_or_no_weight_keep_a_norm_group_one_row(norm):
    make = (lambda c: nn.GroupNorm(4, c)) if norm == "groups" else (lambda c: nn.GroupNorm(1, c, affine=False))
    model = _model(make)
    x = torch.randn(2, 3, 16, 16)
    oto = otofx.OTO(model, x)
    rows = [z.rows for z in oto.groups]
    if norm == "groups":  # each of the 4 norm groups is one row (4 or 6 channels each)
        assert 4 in rows
    else:  # one group, no weight: all of a stream's channels are one row
        assert 16 not in rows and 24 not in rows
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    with torch.no_grad():
        assert max_rel_diff(model(x), small(x)) < 1e-4


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12", "convformer_s18"])
def test_timm_metaformers_compress_to_their_own_class(name, caplog):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level("WARNING", logger="otofx"):
        small = oto.compress()
    assert type(small) is type(model) and not caplog.records, [r.getMessage() for r in caplog.records]
    assert n_params(small) < 0.3 * n_params(model)
    other = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4


# =============================================================================================
# held-out audit: functional norms, tuples that hold the width for another reason, pickling
# =============================================================================================


class FunctionalNormNet(nn.Module):
    """conv -> F.group_norm(x, 1, w, b) in the model's own forward (or a GroupNorm subclass with its own) -> conv."""

    def __init__(self, subclass: bool = False):
        super().__init__()
        self.a, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 5, 1)
        self.norm = OwnForwardGroupNorm(1, 8) if subclass else None
        if not subclass:
            self.w, self.b = nn.Parameter(torch.ones(8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        y = self.a(x)
        y = self.norm(y) if self.norm is not None else F.group_norm(y, 1, self.w, self.b, 1e-5)
        return self.c(F.gelu(y))


class OwnForwardGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("subclass", [False, True], ids=["functional", "own_forward"])
def test_a_norm_dividing_by_its_new_width_keeps_the_own_class(subclass, caplog):
    """The own class cannot narrow a width its forward normalises with F.group_norm: it keeps those
    zero rows (as before GroupNorm(1) channels were rows) instead of giving up on the class. That
    width is the model's only group, so the default gives the graph (the own class would remove
    nothing) and ``form='module'`` the own class."""
    torch.manual_seed(0)
    model = randomize(FunctionalNormNet(subclass)).eval()
    x = torch.randn(2, 3, 10, 10)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    assert isinstance(oto.compress(), torch.fx.GraphModule)
    with caplog.at_level("WARNING", logger="otofx"):
        small = oto.compress(form="module")
    assert type(small) is FunctionalNormNet, type(small).__name__
    assert any("GroupNorm(1)" in r.getMessage() for r in caplog.records)
    assert small.a.out_channels == 8  # the normalised width kept its zero rows
    other = torch.randn(3, 3, 7, 9)
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4
    graph = oto.compress(form="graph")  # the graph form removes them
    assert n_params(graph) < n_params(small)
    with torch.no_grad():
        assert max_rel_diff(model(other), graph(other)) < 1e-4


class ScaleRoll(nn.Module):
    """A channel scale, and a roll whose shifts tuple holds the channel count by coincidence."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shifts = (dim, 1)

    def forward(self, x):
        return torch.roll(x * self.scale[:, None, None], self.shifts, (2, 3))


class RollNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.s, self.b = nn.Conv2d(3, 4, 1), ScaleRoll(4), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.s(self.a(x)))


def test_a_tuple_that_is_no_view_shape_keeps_its_value():
    """Only a tuple the graph views one of the module's tensors to follows the width: a roll by
    (4, 1) stays a roll by (4, 1) (on an example 2 rows high a roll by 2 looks the same)."""
    torch.manual_seed(0)
    model = randomize(RollNet()).eval()
    x = torch.randn(1, 3, 2, 5)
    oto = otofx.OTO(model, x)
    z = next(i for i, g in enumerate(oto.groups) if any(n == "s.scale" for n, _, _ in g.params))
    from helpers import zero_rows
    zero_rows(model, oto, [torch.tensor([0, 1]) if i == z else torch.tensor([], dtype=torch.long)
                           for i in range(len(oto.groups))])
    small = oto.compress()
    assert type(small) is RollNet and small.s.scale.shape == (2,) and small.s.shifts == (4, 1)
    other = torch.randn(2, 3, 3, 5)
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4


def test_graph_form_survives_torch_save(tmp_path):
    """fx re-traces an unpickled GraphModule's code: the kept-divisor norm stays one call."""
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph")
    torch.save(small, tmp_path / "g.pt")
    back = torch.load(tmp_path / "g.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(x), small(x)) and max_rel_diff(model(x), back(x)) < 1e-4


def test_hugging_face_poolformer_keeps_its_group_norms_and_from_pretrained_refuses(tmp_path):
    """PoolFormer's norms are ``GroupNorm(1, C)``: in the own class each becomes ``PrunedGroupNorm``
    (the old divisor). No config builds that norm, so its lost widths stay out of the config and
    ``from_pretrained`` of the ``save_pretrained`` folder refuses the checkpoint's shapes instead of
    loading ``nn.GroupNorm`` (which divides by the new width); ``otofx.save``/``load`` give it back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.PoolFormerConfig(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[16, 32],
                                           patch_sizes=[4, 2], strides=[4, 2], padding=[1, 0], num_labels=10)
    torch.manual_seed(0)
    model = randomize(transformers.PoolFormerForImageClassification(config).eval())
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is type(model) and n_params(small) < n_params(model)
    assert any(isinstance(m, PrunedGroupNorm) for m in small.modules())
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_rel_diff(small(other).logits, model(other).logits) < 1e-4
    assert_hub_refuses_and_otofx_loads(model, small, tmp_path, other)
