"""Weight standardisation leaves the input channels of the conv that uses it prunable.

timm's ``StdConv2d`` (BiT), ``ScaledStdConv2d`` (NF-nets) and their ``*Same`` forms normalise each
output channel's weight by the mean and variance of its in / groups * kh * kw entries:
``batch_norm(w.reshape(1, out, -1), None, None, training=True)``. A removed input channel's columns
multiply a zero input, but they count in every output channel's statistics: the graph form keeps the
old count and the removed columns' moments (``batch_norm_kept_divisor``, its ``fill`` buffer), the
model's own class gets ``PrunedStdConv2d`` in place of timm's classes. The moments are read at
compression off the model with the plan's rows zeroed: zeros for a conv's own weight columns (they are
in the rows), so no buffer then; constants other than 0 where the standardised values are computed
(``weight + offset``).

Exact means: the compressed model equals the full model with the plan's rows zeroed to 1e-4 relative
in float32, in eval and in train mode, at the example's size and another one.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes import plan_rows
from otofx.passes.modules import PrunedStdConv2d, batch_norm_kept_divisor, pool_moments, removed_moments
from otofx.passes.nodes import get_path

timm_std = pytest.importorskip("timm.layers.std_conv")
StdConv2d, ScaledStdConv2d = timm_std.StdConv2d, timm_std.ScaledStdConv2d
StdConv2dSame, ScaledStdConv2dSame = timm_std.StdConv2dSame, timm_std.ScaledStdConv2dSame

pytestmark = pytest.mark.usefixtures("single_thread")

RTOL = 1e-4


# =============================================================================================
# the function: the full batch statistics from the kept entries, the old count and the moments
# =============================================================================================


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("removed", ["zeros", "values"])
@pytest.mark.parametrize("affine", [False, True])
def test_kept_divisor_is_batch_norm_of_the_full_input(dtype, removed, affine):
    g = torch.Generator().manual_seed(0)
    c, old, new = 6, 45, 18
    full = torch.randn(1, c, old, generator=g, dtype=torch.float64) * 0.05 + torch.randn(1, c, 1, generator=g,
                                                                                         dtype=torch.float64) * 0.1
    keep = torch.randperm(old, generator=g)[:new].sort().values
    gone = torch.tensor([i for i in range(old) if i not in set(keep.tolist())])
    if removed == "zeros":
        full[..., gone] = 0
    w, b = (torch.randn(c, generator=g, dtype=torch.float64) for _ in range(2)) if affine else (None, None)
    ref = F.batch_norm(full, None, None, w, b, training=True, momentum=0.0, eps=1e-6)[..., keep]
    fill = removed_moments(full[..., gone], c)
    assert (fill is None) == (removed == "zeros")
    cast = (lambda t: None if t is None else t.to(dtype))  # noqa: E731
    got = batch_norm_kept_divisor(full[..., keep].to(dtype), None, None, cast(w), cast(b), True, 0.0, 1e-6,
                                  old=old, new=new, fill=cast(fill))
    assert got.dtype == dtype
    # NB: a dtype-fitting bound: half precision rounds the input and the output, not the statistics
    tol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps
    assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max()), (got.double() - ref).abs().max()


def test_pooled_moments_are_the_moments_of_the_union():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(1, 5, 7, generator=g, dtype=torch.float64), torch.randn(1, 5, 3, generator=g,
                                                                              dtype=torch.float64) + 2
    got = pool_moments(removed_moments(a, 5), 7, removed_moments(b, 5), 3)
    assert torch.allclose(got, removed_moments(torch.cat([a, b], -1), 5))
    zeros = pool_moments(None, 4, removed_moments(b, 5), 3)
    assert torch.allclose(zeros, removed_moments(torch.cat([torch.zeros(1, 5, 4, dtype=torch.float64), b], -1), 5))
    assert pool_moments(None, 4, None, 3) is None


# =============================================================================================
# models
# =============================================================================================


class UserWSConv(nn.Conv2d):
    """A user's own weight-standardised conv: the batch norm written into its forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-5).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OffsetWSConv(nn.Conv2d):
    """A standardisation of ``weight + offset`` (a buffer): a removed column holds the offset, a constant
    other than 0 in the zeroed model, which the graph form fills in by its moments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("offset", torch.randn(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = F.batch_norm((self.weight + self.offset).reshape(1, self.out_channels, -1), None, None, training=True,
                         eps=1e-5)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSNet(nn.Module):
    """BiT's and NF-nets' convs (timm's classes), a batch norm between them, a grouped one, a head;
    ``user``: the last conv a user's own (``UserWSConv``, or ``OffsetWSConv`` for "offset")."""

    def __init__(self, user=False):
        super().__init__()
        self.c1 = StdConv2d(3, 8, 3)
        self.c2 = StdConv2d(8, 16, 3, stride=2)
        self.bn = nn.BatchNorm2d(16)
        self.c3 = ScaledStdConv2d(16, 12, 3, gamma=1.7)
        self.c4 = ScaledStdConv2d(12, 12, 3, groups=3)
        own = {True: UserWSConv, "offset": OffsetWSConv}.get(user)
        self.c5 = own(12, 10, 3, padding=1) if own is not None else StdConv2d(12, 10, 1, bias=True)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.bn(self.c2(y)))
        y = F.gelu(self.c4(F.gelu(self.c3(y))))
        return self.head(torch.relu(self.c5(y)).mean((2, 3)))


class SameNet(nn.Module):
    """The *Same forms: TensorFlow's SAME padding, dynamic at stride 2."""

    def __init__(self):
        super().__init__()
        self.c1 = StdConv2dSame(3, 8, 3, stride=2)
        self.c2 = ScaledStdConv2dSame(8, 12, 3, stride=2)
        self.c3 = StdConv2dSame(12, 6, 3)

    def forward(self, x):
        return self.c3(F.silu(self.c2(F.silu(self.c1(x)))))


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with a mean of their own per output channel (the statistics then matter), random
    gains, biases and batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    randomize(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.add_(torch.randn(m.weight.shape[0], 1, 1, 1, generator=g) * 0.2)
    return model


def _exact(model: nn.Module, small: nn.Module, inputs) -> None:
    """``small`` equals ``model`` on every input, in eval and in train mode (batch statistics)."""
    for train in (False, True):
        model.train(train), small.train(train)
        for x in inputs:
            with torch.no_grad():
                ref, got = model(x), small(x)
            err = max_rel_diff(ref, got)
            assert err <= RTOL, f"{'train' if train else 'eval'} mode, input {tuple(x.shape)}: relative error {err:.3g}"
            assert ref.abs().max() > 0
    model.eval(), small.eval()


def _inputs(side: int = 16):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(2, 3, side, side, generator=g), torch.randn(3, 3, side + 8, side - 4, generator=g)]


def _input_columns(small: nn.Module, model: nn.Module, names) -> dict:
    """``{conv: (input entries per output channel before, after)}``."""
    big = dict(model.named_modules())
    return {n: (big[n].weight[0].numel(), get_path(small, f"{n}.weight")[0].numel()) for n in names}


# =============================================================================================
# the analysis
# =============================================================================================


def test_the_input_channels_of_standardised_convs_are_rows():
    model = _random(WSNet())
    oto = otofx.OTO(model, _inputs()[0])
    assert not any("batch-norm statistics" in p.reason for p in oto.pinned), oto.report()
    reads = {name.rpartition(".")[0] for z in oto.groups for name, dim, _ in z.params if dim == 1}
    # c2, c3 and c5 read their input channels as rows; c4 is grouped (its input is tied to its groups)
    assert {"c2", "c3", "c5"} <= reads, reads


class Tokens(nn.Module):
    """A batch norm in training mode whose statistics average over a last axis of fc1's channels."""

    def __init__(self, shifted: bool):
        super().__init__()
        self.fc1, self.fc2, self.shifted = nn.Linear(6, 8), nn.Linear(8, 3), shifted

    def forward(self, x):  # [B, C, T] -> [B, C, 8], normalised per C
        y = self.fc1(x)
        if self.shifted:  # NB: a channel zero with its row now holds the input's mean: no constant
            y = y + x.mean(-1, keepdim=True)
        return self.fc2(torch.relu(F.batch_norm(y, None, None, training=True)))


def test_batch_statistics_over_channels_that_are_not_constants_stay_pinned():
    oto = otofx.OTO(Tokens(shifted=True), torch.randn(2, 4, 6))
    assert not oto.groups
    assert any("batch-norm statistics" in p.reason for p in oto.pinned)


def test_batch_statistics_over_zero_channels_keep_their_count():
    """The same machinery covers a batch norm of activations whose last axis is a layer's channels:
    a removed channel is zero with its row, for every input."""
    model = _random(Tokens(shifted=False))
    x = torch.randn(2, 4, 6)
    oto = otofx.OTO(model, x)
    assert [z.rows for z in oto.groups] == [8]
    zero_random_rows(model, oto, seed=1)
    for form in ("graph", "auto"):
        small = oto.compress(form=form)
        with torch.no_grad():
            assert max_rel_diff(model(x), small(x)) <= RTOL
        assert n_params(small) < n_params(model)
    # NB: the functional norm in the model's own forward cannot keep its count: the graph form, or
    # the own class with those zero rows kept
    assert isinstance(small, torch.fx.GraphModule)
    own = oto.compress(form="module")
    assert type(own) is Tokens and n_params(own) == n_params(model)


# =============================================================================================
# both forms, exact, smaller where the conv inputs are
# =============================================================================================


@pytest.mark.parametrize("form", ["graph", "module"])
def test_zeroed_rows_both_forms_exact(form):
    model = _random(WSNet())
    xs = _inputs()
    oto = otofx.OTO(model, xs[0])
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form=form)
    assert isinstance(small, torch.fx.GraphModule) == (form == "graph")
    _exact(model, small, xs)
    cols = _input_columns(small, model, ("c2", "c3", "c5"))
    assert all(after < before for before, after in cols.values()), cols
    assert n_params(small) < 0.5 * n_params(model)
    if form == "module":
        assert all(isinstance(small.get_submodule(n), PrunedStdConv2d) for n in ("c2", "c3", "c5"))
        assert isinstance(small.c1, StdConv2d) and not isinstance(small.c1, PrunedStdConv2d)  # reads the image
        assert small.c3.scale == model.c3.scale and small.c3.full_fan_in == 16 * 9
        # NB: the removed columns were zeroed with their rows: their moments are zeros, no buffer
        assert small.c2.fill is None


def _rows_that_are_not_zero(oto, seed: int = 3):
    """A plan removing a random half of every group's rows, none of them zeroed (SCOP's ``prune_lowest``)."""
    g = torch.Generator().manual_seed(seed)
    return plan_rows(oto.zigset, [torch.randperm(z.rows, generator=g)[: z.rows // 2].sort().values for z in oto.groups])


def _zeroed(model: nn.Module, oto, plan) -> nn.Module:
    """A copy of ``model`` with the plan's rows zeroed (the reference of a compressed model)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for z, rows in zip(oto.groups, plan.removed):
            for name, dim, idx in z.params:
                get_path(ref, name).movedim(dim, 0)[idx[rows].reshape(-1)] = 0
    return ref


@pytest.mark.parametrize("form", ["graph", "module"])
def test_rows_that_are_not_zero_count_as_zeroed(form):
    """A plan removing rows that are not zero (a conv's input columns that still hold values): the
    compressed model is the full model with them zeroed, the columns counted as the zeros they are there."""
    model = _random(WSNet())
    xs = _inputs()
    oto = otofx.OTO(model, xs[0])
    plan = _rows_that_are_not_zero(oto)
    small = oto.compress(plan=plan, form=form, verify=False)
    assert isinstance(small, torch.fx.GraphModule) == (form == "graph")
    _exact(_zeroed(model, oto, plan), small, xs)
    assert not any(n.endswith("fill") for n, _ in small.named_buffers())


def test_removed_entries_that_are_constants_count_by_their_moments():
    """``weight + offset`` standardised: a removed column holds the offset in the zeroed model; the
    graph keeps its moments per output channel (a buffer), computed in the zeroed model."""
    model = _random(WSNet(user="offset"))
    xs = _inputs()
    oto = otofx.OTO(model, xs[0])
    assert not any("batch-norm statistics" in p.reason for p in oto.pinned), oto.report()
    for plan in (None, _rows_that_are_not_zero(oto)):
        if plan is None:
            zero_random_rows(model, oto, seed=1)
        small = oto.compress(plan=plan, form="graph", verify=False)
        fills = {n: b for n, b in small.named_buffers() if n.endswith("_fill")}
        assert len(fills) == 1 and next(iter(fills.values())).abs().max() > 0
        assert get_path(small, "c5.weight").shape[1] < 12
        _exact(_zeroed(model, oto, plan) if plan is not None else model, small, xs)


def test_compressed_again_keeps_the_first_count_and_pools_the_moments():
    """The compressed model analysed and compressed again: its first fan-in stays the divisor, and the
    moments of the entries removed now pool with those removed then (the graph form's buffer)."""
    xs = _inputs()
    for form, user in (("module", False), ("graph", "offset")):
        model = _random(WSNet(user=user))
        oto = otofx.OTO(model, xs[0])
        zero_random_rows(model, oto, seed=1)
        small = oto.compress(form=form)
        oto2 = otofx.OTO(small, xs[0])
        assert not any("batch-norm statistics" in p.reason for p in oto2.pinned), oto2.report()
        zero_random_rows(small, oto2, seed=2)
        smaller = oto2.compress(form=form)
        _exact(small, smaller, xs)
        assert n_params(smaller) < n_params(small)
        if form == "module":
            assert smaller.c2.full_fan_in == model.c2.weight[0].numel() and smaller.c2.weight.shape[1] < small.c2.weight.shape[1]
        else:
            before = dict(small.named_buffers())
            grown = [n for n, b in smaller.named_buffers() if n.endswith("_fill") and n in before]
            assert grown and get_path(smaller, "c5.weight").shape[1] < get_path(small, "c5.weight").shape[1]


@pytest.mark.parametrize("cls", [StdConv2d, ScaledStdConv2d, StdConv2dSame, ScaledStdConv2dSame])
def test_pruned_std_conv_is_the_source_over_zero_input_channels(cls):
    """``PrunedStdConv2d`` with ``fill``: timm's conv over an input whose removed channels are zero, its
    weight's columns there counted by their moments, whatever they hold."""
    g = torch.Generator().manual_seed(0)
    src = cls(8, 6, 3, stride=2) if "Same" in cls.__name__ else cls(8, 6, 3, stride=2, bias=True)
    with torch.no_grad():
        src.weight.add_(torch.randn(6, 1, 1, 1, generator=g) * 0.2)
        if hasattr(src, "gain"):
            src.gain.uniform_(0.5, 1.5)
    keep, gone = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 5, 7])
    x = torch.randn(2, 8, 11, 13, generator=g)
    x[:, gone] = 0
    small = copy.deepcopy(src)
    small.weight = nn.Parameter(src.weight.detach()[:, keep].clone())
    small.in_channels = 4
    pruned = PrunedStdConv2d(small, 8 * 9, removed_moments(src.weight.detach()[:, gone].reshape(1, 6, -1), 6))
    with torch.no_grad():
        ref, got = src(x), pruned(x[:, keep])
    assert (ref - got).abs().max() <= 1e-5 * max(1.0, ref.abs().max())
    assert pruned.same_pad == getattr(src, "same_pad", False) and (pruned.gain is not None) == hasattr(src, "gain")


def test_same_padding_forms_both_forms_exact():
    model = _random(SameNet())
    xs = _inputs(17)
    oto = otofx.OTO(model, xs[0])
    assert oto.groups and not any("batch-norm statistics" in p.reason for p in oto.pinned), oto.report()
    zero_random_rows(model, oto, seed=2)
    for form in ("graph", "module"):
        small = oto.compress(form=form)
        # NB: torch.export's graph keeps the image size it was captured at (the dynamic padding reads it)
        _exact(model, small, xs if form == "module" else [xs[0], torch.randn(3, 3, 17, 17)])
        assert get_path(small, "c2.weight").shape[1] < 8
    assert isinstance(small.c2, PrunedStdConv2d) and small.c2.same_pad and small.c2.gain is not None


def test_a_users_own_standardised_conv():
    """The graph form frees the input channels of a conv that standardises its weight in its own
    forward; the model's own class cannot keep its statistics there and keeps those rows."""
    model = _random(WSNet(user=True))
    xs = _inputs()
    oto = otofx.OTO(model, xs[0])
    zero_random_rows(model, oto, seed=1)
    graph = oto.compress(form="graph")
    _exact(model, graph, xs)
    assert get_path(graph, "c5.weight").shape[1] < 12
    auto = oto.compress()
    _exact(model, auto, xs)
    assert type(auto) is WSNet and type(auto.c5) is UserWSConv and auto.c5.weight.shape[1] == 12
    assert isinstance(auto.c3, PrunedStdConv2d) and auto.c3.weight.shape[1] < 16


def test_training_the_compressed_model_keeps_its_constants():
    """Gradients flow through the kept columns (and gains); the removed ones' moments are a buffer."""
    xs = _inputs()
    model = _random(WSNet(user="offset"))
    oto = otofx.OTO(model, xs[0])
    zero_random_rows(model, oto, seed=1)
    for form in ("module", "graph"):
        small = oto.compress(form=form)
        small.train()
        small(xs[0]).square().mean().backward()
        for name in ("c2.weight", "c3.weight", "c3.gain", "c5.weight"):
            assert get_path(small, name).grad is not None and get_path(small, name).grad.abs().max() > 0, name
    fill = [b for n, b in small.named_buffers() if n.endswith("_fill")]
    assert fill and not fill[0].requires_grad and not any(n.endswith("_fill") for n, _ in small.named_parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_does_not_blow_up(dtype):
    model = _random(WSNet())
    xs = _inputs()
    oto = otofx.OTO(model, xs[0])
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    ref = model(xs[0]).detach().double()
    err = {}
    for name, m in (("full", model), ("small", small)):
        low = copy.deepcopy(m).to(dtype)
        with torch.no_grad():
            err[name] = (low(xs[0].to(dtype)).double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    # NB: the compressed model rounds no worse than the full one in the same dtype (a dtype-fitting bound)
    assert err["small"] <= max(2 * err["full"], 16 * torch.finfo(dtype).eps), err


def test_save_load_round_trip(tmp_path):
    model = _random(WSNet())
    xs = _inputs()
    oto = otofx.OTO(model, xs[0])
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    # NB: moments as a compression with constants in the removed columns leaves them (a structure check)
    small.c2.fill = torch.rand(2, small.c2.out_channels)
    otofx.save(small, tmp_path / "ws")
    back = otofx.load(tmp_path / "ws", model=WSNet())
    assert isinstance(back.c2, PrunedStdConv2d) and torch.equal(back.c2.fill, small.c2.fill)
    assert back.c3.scale == small.c3.scale and back.c3.full_fan_in == small.c3.full_fan_in
    _exact(small, back, xs)


# =============================================================================================
# timm: NF-net and BiT
# =============================================================================================


@pytest.mark.parametrize("name", ["nf_regnet_b0", "resnetv2_50x1_bit"])
def test_timm_models_own_class_exact(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10).eval())
    xs = [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 48, 40)]
    oto = otofx.OTO(model, xs[0])
    assert not any("batch-norm statistics" in p.reason for p in oto.pinned), oto.report()
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is type(model)
    assert any(isinstance(m, PrunedStdConv2d) for m in small.modules())
    # NB: every weight between two halved widths keeps a quarter (0.75 and 1.0 when the inputs were pinned)
    assert n_params(small) < 0.35 * n_params(model), n_params(small) / n_params(model)
    _exact(model, small, xs)
