"""Layer norms written out by hand, and layer norm modules of the user's own class.

The official ConvNeXt (and SAM's ``LayerNorm2d``, Restormer's, Cohere's) normalise channels-first
tensors by hand: ``u = x.mean(1, keepdim=True)``, ``s = (x - u).pow(2).mean(1, keepdim=True)``,
``(x - u) / sqrt(s + eps)``, then a per-channel affine. A channel zero with its row still counts in
both means, and its ``x - u`` is ``-u``: the graph keeps the old divisor of u and adds the removed
channels' ``u ** 2`` back into s (``var``/``std`` spelled out are rewritten the same way); the own
class replaces a module that computes the norm alone (written out, or ``F.layer_norm`` of its
tensors) by ``PrunedOwnLayerNorm``, which keeps the names of its weight and bias. A norm written into
a larger forward keeps its zero rows in the own class; the graph form removes them.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import fresh_like, max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedOwnLayerNorm


class ConvNeXtLayerNorm(nn.Module):
    """The official ConvNeXt code's LayerNorm (channels_last: F.layer_norm; channels_first: by hand)."""

    def __init__(self, c, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps, self.data_format, self.normalized_shape = eps, data_format, (c,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class VarFirstLayerNorm(nn.Module):
    """vit-pytorch's channel LayerNorm (CvT, Twins-SVT, ScalableViT): channels-first, ``var`` computed before
    the mean it is centred by, parameters shaped [1, C, 1, 1]."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g, self.b = nn.Parameter(torch.ones(1, c, 1, 1)), nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class VarLayerNorm(nn.Module):
    """Restormer's ``WithBias_LayerNorm`` (channels-last, ``var`` spelled out), its parameters named gamma/beta."""

    def __init__(self, c):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        sigma = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(sigma + 1e-5) * self.gamma + self.beta


class Float32LayerNorm(nn.Module):
    """Cohere's: in float32, ``rsqrt``, a weight and no bias."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        mean = x.mean(-1, keepdim=True)
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) * torch.rsqrt(variance + 1e-5)
        return (self.weight.to(torch.float32) * x).to(dtype)


class StdPlusEps(nn.Module):
    """``(x - u) / (std + eps)``: not a layer norm's function (eps outside the root), so no module replaces it."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - u) / (x.std(1, keepdim=True) + 1e-3) + self.bias[:, None, None]


class Block(nn.Module):
    def __init__(self, c, norm):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = norm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return x + self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """Stem, a channels-first norm, two blocks, a norm and a downsampling conv, one more block, a head."""

    def __init__(self, first=lambda c: ConvNeXtLayerNorm(c, data_format="channels_first"), inner=ConvNeXtLayerNorm):
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(3, 16, 4, 4), first(16)
        self.blocks = nn.Sequential(Block(16, inner), Block(16, inner))
        self.down_norm, self.down = first(16), nn.Conv2d(16, 32, 2, 2)
        self.last = Block(32, inner)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.blocks(self.n0(self.stem(x)))
        x = self.last(self.down(self.down_norm(x)))
        return self.head(x.mean((2, 3)))


class InlineNorm(nn.Module):
    """The stem's norm written into the model's own forward (no module computes it alone)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.gamma, self.beta = nn.Parameter(torch.ones(16)), nn.Parameter(torch.zeros(16))
        self.block = Block(16, ConvNeXtLayerNorm)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6) * self.gamma[:, None, None] + self.beta[:, None, None]
        return self.head(self.block(x).mean((2, 3)))


def _setup(model, seed=0):
    torch.manual_seed(seed)
    model = randomize(model.eval(), seed)
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=seed)
    return model, x, oto


def _stem_group(oto) -> bool:
    return any(any(name == "stem.weight" and dim == 0 for name, dim, _ in z.params) for z in oto.groups)


def _check(model, small, x):
    for inp in (x, fresh_like(x), torch.randn(3, 3, 48, 40)):
        with torch.no_grad():
            ref, got = model(inp), small(inp)
        assert max_rel_diff(ref, got) <= 1e-4
    assert n_params(small) < n_params(model)


VARIANTS = {
    "convnext": lambda: ConvNeXtish(),
    "var, gamma/beta": lambda: ConvNeXtish(inner=VarLayerNorm),
    "float32, no bias": lambda: ConvNeXtish(inner=Float32LayerNorm),
    "var before mean, channels first": lambda: ConvNeXtish(first=VarFirstLayerNorm),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_written_layer_norm_frees_its_channels_and_the_own_class_swaps_the_module(variant):
    model, x, oto = _setup(VARIANTS[variant]())
    assert _stem_group(oto), oto.report()
    assert not [p for p in oto.pinned if p.op != "output"], oto.report()
    small = oto.compress()
    assert type(small) is ConvNeXtish
    norms = [small.n0, small.down_norm, small.blocks[0].norm, small.blocks[1].norm, small.last.norm]
    assert all(isinstance(m, PrunedOwnLayerNorm) for m in norms), [type(m).__name__ for m in norms]
    # NB: the state dict keeps its keys (gamma/beta stay gamma/beta)
    assert set(small.state_dict()) == set(model.state_dict())
    _check(model, small, x)
    graph = oto.compress(form="graph")
    assert n_params(graph) == n_params(small)
    _check(model, graph, x)
    small.train()
    model.train()
    _check(model, small, x)


def test_own_layer_norm_saves_and_loads(tmp_path):
    model, x, oto = _setup(ConvNeXtish())
    small = oto.compress()
    otofx.save(small, tmp_path / "m")
    back = otofx.load(tmp_path / "m", ConvNeXtish())
    assert isinstance(back.n0, PrunedOwnLayerNorm) and back.n0.width == small.n0.width
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x), rtol=0, atol=0)


def test_compressed_again_keeps_the_first_divisor():
    model, x, oto = _setup(ConvNeXtish())
    for form in ("module", "graph"):
        small = oto.compress(form=form)
        again = otofx.OTO(small, x)
        assert _stem_group(again) or form == "graph", again.report()
        zero_random_rows(small, again, seed=3, fraction=0.3)
        smaller = again.compress(form=form)
        assert n_params(smaller) < n_params(small)
        for inp in (x, torch.randn(3, 3, 48, 40)):
            with torch.no_grad():
                assert max_rel_diff(small(inp), smaller(inp)) <= 1e-4


def test_half_precision():
    model, x, oto = _setup(ConvNeXtish(inner=Float32LayerNorm))
    small = oto.compress()
    with torch.no_grad():
        ref, got = model.to(torch.bfloat16)(x.bfloat16()), small.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert max_rel_diff(ref.float(), got.float()) <= 5e-2


@pytest.mark.parametrize("factory", [InlineNorm, lambda: ConvNeXtish(first=StdPlusEps)],
                         ids=["inline", "std plus eps"])
def test_a_norm_no_module_computes_alone_keeps_its_rows_in_the_own_class(factory, caplog):
    model, x, oto = _setup(factory())
    assert _stem_group(oto), oto.report()
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert "keeps" in caplog.text
    assert small.stem.weight.shape[0] == 16  # NB: the stem's zero rows stay
    _check(model, small, x)
    graph = oto.compress(form="graph")
    assert n_params(graph) < n_params(small)
    _check(model, graph, x)


class OlmoNorm(nn.Module):
    """OLMo's layer norm: no weight, no bias, in float32."""

    def __init__(self, c):
        super().__init__()
        self.normalized_shape = (c,)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, None, None, eps=1e-5).to(x.dtype)


class PreNorm(nn.Module):
    """A pre-norm MLP stack on a residual stream whose norms have no weight: the linear layers that read
    them cancel a removed channel's ``-mean / std``."""

    def __init__(self, norm, residual_norm: bool = False):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.n1, self.n2, self.final = norm(16), norm(16), norm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.fc3, self.fc4 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 50)
        self.residual_norm = residual_norm

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(self.n1(h))))
        h = h + self.fc4(F.gelu(self.fc3(self.n2(h))))
        # NB: a weightless norm's output added to the stream: its removed channels are not zero there
        h = self.n2(h) + h if self.residual_norm else h
        return self.head(self.final(h))


@pytest.mark.parametrize("norm", [OlmoNorm, lambda c: nn.LayerNorm(c, elementwise_affine=False)],
                         ids=["olmo", "nn.LayerNorm without affine"])
def test_a_layer_norm_without_weight_read_by_linear_layers_frees_the_stream(norm):
    torch.manual_seed(0)
    model = randomize(PreNorm(norm).eval(), 0)
    ids = torch.randint(0, 50, (2, 7))
    oto = otofx.OTO(model, ids)
    assert any(any(name == "emb.weight" and dim == 1 for name, dim, _ in z.params) for z in oto.groups), oto.report()
    zero_random_rows(model, oto)
    small = oto.compress()
    assert type(small) is PreNorm and isinstance(small.n1, PrunedOwnLayerNorm)
    assert small.emb.weight.shape[1] < 16
    for form, m in (("module", small), ("graph", oto.compress(form="graph"))):
        for inp in (ids, torch.randint(0, 50, (3, 11))):
            with torch.no_grad():
                assert max_rel_diff(model(inp), m(inp)) <= 1e-4, form


def test_a_layer_norm_without_weight_added_to_the_stream_keeps_it():
    torch.manual_seed(0)
    model = randomize(PreNorm(OlmoNorm, residual_norm=True).eval(), 0)
    ids = torch.randint(0, 50, (2, 7))
    oto = otofx.OTO(model, ids)
    assert not any(any(name == "emb.weight" and dim == 1 for name, dim, _ in z.params) for z in oto.groups)
    zero_random_rows(model, oto)
    small = oto.compress()
    with torch.no_grad():
        assert max_rel_diff(model(ids), small(ids)) <= 1e-4


def test_the_probe_reads_a_module_on_another_device():
    """own_norm_replacement runs its copy on the CPU: a module on the meta device (or a GPU) is read the same."""
    from otofx.passes.resize import own_norm_replacement

    want = {"dim": 1, "weight": "weight", "bias": "bias", "eps": 1e-6}
    for m in (ConvNeXtLayerNorm(16, data_format="channels_first"),
              ConvNeXtLayerNorm(16, data_format="channels_first").to("meta")):
        assert own_norm_replacement(m, (2, 16, 5, 5), 16, 1e-6) == want
    assert own_norm_replacement(VarLayerNorm(16).to(torch.bfloat16), (2, 3, 16), 16, 1e-5) == \
        {"dim": -1, "weight": "gamma", "bias": "beta", "eps": 1e-5}
    assert own_norm_replacement(StdPlusEps(16), (2, 16, 5, 5), 16, 1e-3) is None
