"""ConvNeXt V2's Global Response Normalization (GRN) leaves the MLP's hidden channels prunable.

``Gx = ||x||_2`` over the spatial axes, ``Nx = Gx / (mean of Gx over the channels + eps)``, out =
``gamma * (x * Nx) + beta + x``. A channel zero with its row (fc1's row) has ``Gx = 0``: it adds
nothing to the channel sum and its output is beta's entry, in its row. So each channel is a row: the
graph keeps the mean's old divisor (the reduce rule's fix) and the model's own class gets
``PrunedGlobalResponseNorm`` in place of timm's ``GlobalResponseNorm`` and Hugging Face's
``ConvNextV2GRN``. A GRN written into another forward (the official code's own ``GRN`` class, a
user's block) would divide by the new count: the own class keeps those zero rows, the graph removes them.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedGlobalResponseNorm


def _grn(x, gamma, beta, channels_last: bool, eps: float):
    """The reference GRN (the official ConvNeXt V2 code, either layout)."""
    spatial, ch, shape = ((1, 2), -1, (1, 1, 1, -1)) if channels_last else ((2, 3), 1, (1, -1, 1, 1))
    g = torch.norm(x, p=2, dim=spatial, keepdim=True)
    n = g / (g.mean(dim=ch, keepdim=True) + eps)
    return gamma.reshape(shape) * (x * n) + beta.reshape(shape) + x


@settings(max_examples=30, deadline=None, derandomize=True)
@given(old=st.integers(2, 24), frac=st.floats(0.05, 1.0), channels_last=st.booleans(), param_dims=st.sampled_from([1, 4]),
       eps=st.sampled_from([1e-6, 0.5]), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16,
                                                                 torch.float16]))
def test_pruned_grn_is_the_grn_of_the_zero_padded_input(old, frac, channels_last, param_dims, eps, dtype):
    new = max(1, min(old, round(old * frac)))
    g = torch.Generator().manual_seed(old * 31 + new)
    x = torch.randn(2, 5, 4, new, generator=g, dtype=torch.float64)
    gamma, beta = (torch.randn(new, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _grn(torch.cat([x, torch.zeros(2, 5, 4, old - new, dtype=torch.float64)], -1),
               torch.cat([gamma, torch.zeros(old - new, dtype=torch.float64)]),
               torch.cat([beta, torch.zeros(old - new, dtype=torch.float64)]), True, eps)[..., :new]
    shape = (new,) if param_dims == 1 else (1, 1, 1, new) if channels_last else (1, new, 1, 1)
    m = PrunedGlobalResponseNorm.empty(channels=new, full_channels=old, channels_last=channels_last, eps=eps,
                                       param_dims=param_dims, dtype=dtype)
    with torch.no_grad():
        m.weight.copy_(gamma.reshape(shape)), m.bias.copy_(beta.reshape(shape))
    xin = x.to(dtype) if channels_last else x.to(dtype).permute(0, 3, 1, 2)
    got = m(xin)
    got = got if channels_last else got.permute(0, 2, 3, 1)
    assert got.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 5e-2
    assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max())


# =============================================================================================
# the analysis: every spelling of the GRN frees its channels
# =============================================================================================


class OfficialGRN(nn.Module):
    """The official ConvNeXt V2 (FCMAE) GRN class, NHWC: a class otofx does not know."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * Nx) + self.beta + x


class Block(nn.Module):
    """ConvNeXt V2's block (NHWC MLP): the GRN a module (``grn``) or written into this forward."""

    def __init__(self, dim: int, grn):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.grn = grn(4 * dim) if isinstance(grn, type) else grn
        if grn is None:
            self.gamma, self.beta = nn.Parameter(torch.zeros(4 * dim)), nn.Parameter(torch.zeros(4 * dim))

    def forward(self, x):
        y = F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))
        if isinstance(self.grn, nn.Module):
            y = self.grn(y)
        else:
            gx = y.norm(2, dim=(1, 2), keepdim=True)
            nx = gx / (gx.mean(-1, keepdim=True) + 1e-6)
            y = y * nx if self.grn == "plain" else y + self.beta + self.gamma * (y * nx)
        return x + self.fc2(y).permute(0, 3, 1, 2)


class Net(nn.Module):
    def __init__(self, grn=None):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.blocks = nn.Sequential(Block(8, grn), Block(8, grn))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _timm_grn(channels_last: bool):
    GlobalResponseNorm = pytest.importorskip("timm.layers.grn").GlobalResponseNorm

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 8) if channels_last else nn.Conv2d(3, 8, 1)
            self.grn = GlobalResponseNorm(8, channels_last=channels_last)
            self.fc2 = nn.Linear(8, 4) if channels_last else nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = x.permute(0, 2, 3, 1) if channels_last else x
            return self.fc2(self.grn(F.gelu(self.fc1(x))))

    return Mlp()


def _hf_grn():
    pytest.importorskip("transformers")
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.grn, self.fc2 = nn.Linear(3, 8), ConvNextV2GRN(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(self.grn(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))))

    return Mlp()


def _official():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.grn, self.fc2 = nn.Linear(3, 8), OfficialGRN(8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(self.grn(F.gelu(self.fc1(x.permute(0, 2, 3, 1)))))

    return Mlp()


FORMS = {"timm_nhwc": lambda: _timm_grn(True), "timm_nchw": lambda: _timm_grn(False), "hf": _hf_grn,
         "official": _official}


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_grn_spelling_frees_its_channels(form, frontend):
    """timm's (either layout), Hugging Face's and the official GRN, symbolically traced or exported:
    the 8 hidden channels are one group of 8 rows whose slices hold gamma and beta, none pinned."""
    torch.manual_seed(0)
    model = randomize(FORMS[form]()).eval()
    x = torch.randn(2, 3, 5, 6)
    oto = otofx.OTO(model, x, frontend=frontend)
    assert oto.frontend == frontend
    (z,) = [z for z in oto.groups if z.rows == 8]
    assert {"grn.weight", "grn.bias"} <= {n for n, _, _ in z.params} or \
        {"grn.gamma", "grn.beta"} <= {n for n, _, _ in z.params}
    assert not [p for p in oto.pinned if "mean" in p.reason]
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph", verify=frontend != "export")
    other = torch.randn_like(x)
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4


def test_a_channel_mean_that_divides_no_norm_stays_pinned():
    """The channel mean of a spatial 1-norm (no GRN) counts every channel in its divisor: pinned."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 8), nn.Linear(8, 4)

        def forward(self, x):
            y = self.fc1(x.permute(0, 2, 3, 1))
            g = y.norm(p=1, dim=(1, 2), keepdim=True)
            return self.fc2(y * (g / (g.mean(-1, keepdim=True) + 1e-6)))

    oto = otofx.OTO(M(), torch.randn(2, 3, 5, 5))
    assert not oto.groups and any("mean over this axis" in p.reason for p in oto.pinned)


# =============================================================================================
# timm's and Hugging Face's ConvNeXt V2: graph and own class
# =============================================================================================


def _convnextv2_atto():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return randomize(timm.create_model("convnextv2_atto", pretrained=False, num_classes=10)).eval()


@pytest.fixture(scope="module")
def timm_small():
    """convnextv2_atto (random weights, randomised gamma/beta/biases), half of every group's rows zero,
    compressed to its own class and to the graph."""
    model = _convnextv2_atto()
    x = torch.randn(2, 3, 64, 64)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    return model, x, oto, oto.compress(), oto.compress(form="graph")


def test_timm_convnextv2_compresses_its_mlp_widths_to_its_own_class(timm_small):
    model, x, oto, small, graph = timm_small
    assert not [p for p in oto.pinned if "mean" in p.reason]
    assert type(small) is type(model)
    grns = [m for m in small.modules() if isinstance(m, PrunedGlobalResponseNorm)]
    assert len(grns) == 12 and all(m.num_channels * 2 == m.full_channels and not m.channels_last for m in grns)
    assert small.stages[0].blocks[0].mlp.fc1.out_channels == 80
    assert n_params(small) < 0.3 * n_params(model) and n_params(graph) == n_params(small)
    other = torch.randn(3, 3, 96, 64)
    with torch.no_grad():
        ref = model(other)
        assert max_rel_diff(ref, small(other)) < 1e-4 and max_rel_diff(ref, graph(other)) < 1e-4
    model.train(), small.train()
    try:
        assert max_rel_diff(model(other), small(other)) < 1e-4
    finally:
        model.eval(), small.eval()


def test_timm_convnextv2_compressed_again_keeps_the_first_divisor(timm_small):
    _, x, _, small, _ = timm_small
    small = copy.deepcopy(small)  # NB: its rows are zeroed here; the other tests read the fixture's
    oto2 = otofx.OTO(small, x)
    assert not [p for p in oto2.pinned if "mean" in p.reason]
    zero_random_rows(small, oto2, seed=2)
    smaller, graph2 = oto2.compress(), oto2.compress(form="graph")
    grn = smaller.stages[0].blocks[0].mlp.grn
    assert isinstance(grn, PrunedGlobalResponseNorm) and grn.full_channels == 160 and grn.num_channels == 40
    with torch.no_grad():
        ref = small(x)
        assert max_rel_diff(ref, smaller(x)) < 1e-4 and max_rel_diff(ref, graph2(x)) < 1e-4


def test_timm_convnextv2_saves_and_loads(timm_small, tmp_path):
    """otofx.save/load (no pickle) and torch.save/torch.load (pickle) of the own class; torch.save of the graph."""
    _, x, _, small, graph = timm_small
    otofx.save(small, tmp_path / "safe")
    back = otofx.load(tmp_path / "safe", model=_convnextv2_atto())
    assert isinstance(back.stages[3].blocks[1].mlp.grn, PrunedGlobalResponseNorm)
    torch.save(small, tmp_path / "own.pt")
    torch.save(graph, tmp_path / "graph.pt")
    own, gm = (torch.load(tmp_path / f, weights_only=False) for f in ("own.pt", "graph.pt"))
    with torch.no_grad():
        want = small(x)
        for m in (back, own, gm):
            assert torch.equal(m(x), want)


def _hf(cls_name: str):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ConvNextV2Config(num_channels=3, hidden_sizes=[16, 32, 48], depths=[1, 1, 1], num_stages=3,
                                        num_labels=5)
    torch.manual_seed(0)
    return randomize(getattr(transformers, cls_name)(cfg)).eval()


@pytest.mark.parametrize("cls_name,kept", [("ConvNextV2Model", 0.5), ("ConvNextV2ForImageClassification", 0.3)])
def test_hf_convnextv2_compresses_to_its_own_class(cls_name, kept, caplog, tmp_path, spatial_capture_to_its_end):
    """Hugging Face's ConvNextV2GRN (NHWC, [1, 1, 1, C] tensors, eps written into its forward) becomes
    PrunedGlobalResponseNorm; its layer norms (``data_format``) become PrunedLayerNorm(2d). The bare
    model's last width is its output's (pinned). otofx.save/load rebuild it from its config."""
    model = _hf(cls_name)
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    said = [r.getMessage() for r in caplog.records if r.name == "otofx"]
    assert type(small) is type(model) and not said, said
    grns = [m for m in small.modules() if isinstance(m, PrunedGlobalResponseNorm)]
    assert len(grns) == 3 and all(m.channels_last and m.weight.shape == (1, 1, 1, m.num_channels) for m in grns)
    assert n_params(small) < kept * n_params(model)
    graph = oto.compress(form="graph", verify=False)
    other = torch.randn(3, 3, 40, 32)
    with torch.no_grad():
        ref = model(other)
        assert max_rel_diff(ref, small(other)) < 1e-4 and max_rel_diff(ref, graph(other)) < 1e-4
    otofx.save(small, tmp_path / "hf")
    back = otofx.load(tmp_path / "hf")
    assert sum(isinstance(m, PrunedGlobalResponseNorm) for m in back.modules()) == 3
    with torch.no_grad():
        assert torch.equal(back(other)[0], small(other)[0])


# =============================================================================================
# a GRN the own class cannot replace: the official class, one written into a block's forward
# =============================================================================================


@pytest.mark.parametrize("grn", [None, "plain", OfficialGRN], ids=["inline", "inline_no_affine", "official_class"])
def test_a_grn_written_into_a_forward_keeps_its_width_in_the_own_class(grn, caplog):
    """Its own forward would divide by the new channel count: the own class keeps the GRN's zero rows
    (and narrows the rest), the graph removes them. Checked with gamma zero (its initial value, where
    any divisor gives x + beta, so no value check could tell) and then gamma set in both models; a GRN
    without gamma and beta (``x * Nx``) too."""
    torch.manual_seed(0)
    model = randomize(Net(grn)).eval()
    gammas = [n for n, _ in model.named_parameters() if n.endswith("gamma")]
    x = torch.randn(2, 3, 12, 12)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [8, 32, 32]
    zero_random_rows(model, oto, seed=1)
    with torch.no_grad():
        for n in gammas:
            model.get_parameter(n).zero_()
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert type(small) is Net and any("GRN" in r.getMessage() for r in caplog.records if r.name == "otofx")
    assert small.blocks[0].fc1.out_features == 32 and small.stem.out_channels == 4  # the stream narrowed
    for form in ("module", "auto"):
        assert oto.compress(form=form).blocks[1].fc1.out_features == 32
    graph = oto.compress(form="graph")
    assert n_params(graph) < n_params(small) < n_params(model)
    with torch.no_grad():
        for n in gammas:
            g = torch.randn(model.get_parameter(n).shape) * model.get_parameter(n.replace("gamma", "beta")).ne(0)
            model.get_parameter(n).copy_(g)
            small.get_parameter(n).copy_(g)
    graph = oto.compress(form="graph")
    other = torch.randn(3, 3, 10, 14)
    with torch.no_grad():
        ref = model(other)
        assert ref.abs().max() > 0
        assert max_rel_diff(ref, small(other)) < 1e-4 and max_rel_diff(ref, graph(other)) < 1e-4
