"""The model's own class when its forward cannot take every new width: the search that keeps the zero
rows of the groups it cannot express (``OTO._module_keeping_rows``), and the blame it starts from
(``otofx.verify.first_wrong_module``)."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from otofx.verify import Blame, first_wrong_module
from helpers import max_rel_diff, randomize, zero_random_rows


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# the blame
# ---------------------------------------------------------------------------------------------


class _Two(nn.Module):
    def __init__(self, scale: float = 1.0, part: int = 4):
        super().__init__()
        self.proj, self.inner, self.out = nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3)
        self.scale, self.part = scale, part

    def forward(self, x):
        h = self.proj(x)
        a, b = torch.split(h, [self.part, 8 - self.part], dim=-1)
        h = self.inner(torch.cat([a, b * self.scale], -1))
        return self.out(h)


def test_blame_names_the_module_that_raised_and_the_call_it_read_last():
    torch.manual_seed(0)
    ref = _Two()
    bad = _Two(part=5)
    bad.load_state_dict(ref.state_dict())
    bad.inner[0] = nn.Linear(7, 8)  # a narrower layer: the forward raises inside it
    x = torch.randn(2, 6)
    assert first_wrong_module(ref, ref, (x,)) is None
    assert first_wrong_module(ref, bad, (x,)) == Blame("inner.0", None)
    # NB: the top module's own code raises (a split into sizes that do not add up): blamed with its
    # last finished child
    worse = _Two(part=9)
    worse.load_state_dict(ref.state_dict())
    assert first_wrong_module(ref, worse, (x,)) == Blame("", "proj")


def test_blame_names_the_first_module_whose_outputs_differ():
    torch.manual_seed(0)
    ref, wrong = _Two(), _Two()
    wrong.load_state_dict(ref.state_dict())
    with torch.no_grad():
        wrong.inner[0].bias.add_(1.0)  # inner.0 computes something else; inner and out follow
    assert first_wrong_module(ref, wrong, (torch.randn(2, 6),)) == Blame("inner.0", None)


def test_blame_ignores_removed_zero_channels():
    """A copy without a channel that is zero in the reference has the same sums: not blamed."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        ref[0].weight[2].zero_()
        ref[0].bias[2] = 0.0
    small = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    keep = [0, 1, 3, 4, 5]
    with torch.no_grad():
        small[0].weight.copy_(ref[0].weight[keep])
        small[0].bias.copy_(ref[0].bias[keep])
        small[2].weight.copy_(ref[2].weight[:, keep])
        small[2].bias.copy_(ref[2].bias)
    assert first_wrong_module(ref, small, (torch.randn(3, 4),)) is None


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------


class PartialBlock(nn.Module):
    """FasterNet's partial convolution: the first ``part`` channels of the stream are convolved, the
    rest pass; the split sizes are ints held by the module, so its own forward cannot take a stream
    that lost channels unevenly between the two parts."""

    def __init__(self, c: int, part: int, hidden: int):
        super().__init__()
        self.part, self.rest = part, c - part
        self.pconv = nn.Conv2d(part, part, 3, padding=1)
        self.mlp1, self.mlp2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        a, b = torch.split(x, [self.part, self.rest], dim=1)
        y = torch.cat([self.pconv(a), b], 1)
        return x + self.mlp2(F.relu(self.mlp1(y)))


class HeadSplit(nn.Module):
    """LeViT's attention: one projection viewed as heads and split into q, k, v by ints the module
    holds (the head count under a name otofx does not know as a width, key and value widths)."""

    def __init__(self, c: int, heads: int, kd: int, vd: int):
        super().__init__()
        self.n_split, self.kd, self.vd = heads, kd, vd
        self.qkv = nn.Linear(c, heads * (2 * kd + vd))
        self.proj = nn.Linear(heads * vd, c)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.n_split, -1).split([self.kd, self.kd, self.vd], dim=3)
        a = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * self.kd ** -0.5, -1)
        o = torch.einsum("bhnm,bmhd->bnhd", a, v).reshape(b, n, -1)
        return x + self.proj(o)


class PartialNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(PartialBlock(16, 4, 96), PartialBlock(16, 4, 96))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class HeadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.attn = HeadSplit(16, 4, 4, 8)
        self.mlp1, self.mlp2 = nn.Linear(16, 64), nn.Linear(64, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.attn(self.emb(x))
        h = h + self.mlp2(F.gelu(self.mlp1(h)))
        return self.head(h)


def _zeroed(model, x, seed=1):
    torch.manual_seed(0)
    randomize(model.eval())
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=seed)
    return oto


def test_a_split_by_held_sizes_keeps_the_stream_in_the_own_class(caplog):
    """The partial conv's split cannot take the stream narrowed: the own class keeps the stream's
    zero rows (its two parts are two groups; blamed at the blocks) and removes the MLP and
    partial-conv widths; the graph removes all. The widths kept along the way go again."""
    model, x = PartialNet(), torch.randn(2, 3, 8, 8)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert type(small) is PartialNet, caplog.text
    msg = caplog.text
    assert "blocks.0" in msg and "keeps the 8 zero row(s) of 2 group(s)" in msg and "bug in otofx" not in msg, msg
    assert small.stem.out_channels == 16 and small.blocks[0].mlp1.out_channels == 48
    assert small.blocks[0].pconv.out_channels == 2
    graph = oto.compress(form="graph")
    assert n_params(graph) < n_params(small) < n_params(model)
    other = torch.randn(3, 3, 11, 7)
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4
        assert max_rel_diff(model(other), graph(other)) < 1e-4


def test_heads_split_by_held_widths_keep_their_rows_and_the_rest_goes(caplog):
    """LeViT's split of q, k and v by held widths: the own class keeps the attention's heads (blamed
    at the attention, whose code read the projection last), and removes the stream and the MLP width."""
    model, x = HeadNet(), torch.randn(2, 5, 6)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert type(small) is HeadNet, caplog.text
    assert "(at attn;" in caplog.text, caplog.text
    assert small.attn.qkv.out_features == model.attn.qkv.out_features
    assert small.emb.out_features == 8 and small.mlp1.out_features == 32
    with torch.no_grad():
        y = torch.randn(3, 9, 6)
        assert max_rel_diff(model(y), small(y)) < 1e-4


def test_auto_gives_the_graph_when_the_own_class_would_keep_most_rows(caplog):
    """Below half of what the graph form removes, ``compress()`` returns the graph (and says what the
    own class would keep); ``form='module'`` returns the own class all the same."""
    model = PartialNet()
    for b in model.blocks:  # a narrow MLP: the stream is most of what there is to remove
        b.mlp1, b.mlp2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
    x = torch.randn(2, 3, 8, 8)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert isinstance(small, torch.fx.GraphModule)
    assert "of the parameters the graph form removes (below 0." in caplog.text, caplog.text
    own = oto.compress(form="module")
    assert type(own) is PartialNet and n_params(small) < n_params(own) < n_params(model)
    with torch.no_grad():
        assert max_rel_diff(model(x), own(x)) < 1e-4


def test_rows_that_are_not_zero_are_never_kept():
    """A plan removing rows that are not zero (SCOP's pruning of the lowest rows) cannot keep them:
    the own class is not offered and the graph form removes them."""
    model, x = HeadNet(), torch.randn(2, 5, 6)
    torch.manual_seed(0)
    randomize(model.eval())
    oto = otofx.OTO(model, x)
    from otofx.passes.prune import plan_rows

    plan = plan_rows(oto.zigset, [torch.arange(z.rows // 2) for z in oto.zigset.zigs])
    graph = oto.compress(form="auto", plan=plan, verify=False)
    assert isinstance(graph, torch.fx.GraphModule)


def test_timm_levit_keeps_its_own_class():
    """timm's LeViT splits its q/k/v by held widths: its own class keeps the heads' rows and removes
    the rest (0.35 of the parameters at half of every group's rows zeroed; the graph 0.25)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=128).eval()
    x = torch.randn(2, 3, 128, 128)
    oto = _zeroed(model, x)
    model.train()
    model.eval()  # NB: drops the attention-bias cache made from the weights before they were zeroed
    small = oto.compress()
    assert type(small) is type(model)
    assert n_params(small) < 0.4 * n_params(model)
    with torch.no_grad():
        y = torch.randn(3, 3, 128, 128)
        assert max_rel_diff(model(y), small(y)) < 1e-4
