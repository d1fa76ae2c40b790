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
from helpers import assert_exact, max_rel_diff, randomize, zero_random_rows, zero_rows


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
    rest pass; the split sizes are ints held by the module (``part``, ``rest``), which follow the
    new widths in its own class (the rebuild's literal moves)."""

    def __init__(self, c: int, part: int, hidden: int):
        super().__init__()
        self.part, self.rest = part, c - part
        self.pconv = nn.Conv2d(part, part, 3, padding=1)
        self.mlp1, self.mlp2 = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        a, b = torch.split(x, [self.part, self.rest], dim=1)
        y = torch.cat([self.pconv(a), b], 1)
        return x + self.mlp2(F.relu(self.mlp1(y)))


class WrittenPartialBlock(PartialBlock):
    """The same with the split sizes written into the code: its own forward cannot take a stream
    that lost channels unevenly between the two parts."""

    def forward(self, x):
        a, b = torch.split(x, [4, 12], dim=1)
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
    def __init__(self, block=PartialBlock):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(block(16, 4, 96), block(16, 4, 96))
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


def _copies_made(caplog) -> int:
    """How many re-sized copies ``compress()`` made (each is logged at INFO)."""
    return sum(" rows from a copy of " in r.getMessage() for r in caplog.records)


def test_a_split_by_held_sizes_follows_the_new_widths(caplog):
    """FasterNet's partial conv splits the stream by two ints it holds: in the own class they take
    the sizes of the two parts (as the graph form recounts the split), in the first copy, and the
    own class removes every zero row the graph removes."""
    model, x = PartialNet(), torch.randn(2, 3, 8, 8)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert type(small) is PartialNet, caplog.text
    assert _copies_made(caplog) == 1, caplog.text
    graph = oto.compress(form="graph")
    assert n_params(small) == n_params(graph) < n_params(model)
    for old, new in zip(model.blocks, small.blocks):
        assert new.part == new.pconv.out_channels < old.part
        assert new.part + new.rest == new.mlp1.in_channels < old.part + old.rest
    other = torch.randn(3, 3, 11, 7)
    with torch.no_grad():
        assert max_rel_diff(model(other), small(other)) < 1e-4


def test_a_split_by_sizes_in_the_code_keeps_the_stream_in_the_own_class(caplog):
    """The partial conv's split by sizes written into the code cannot take the stream narrowed: the
    own class keeps the stream's zero rows (its two parts are two groups; blamed at the blocks) and
    removes the MLP and partial-conv widths; the graph removes all. The widths kept along the way
    go again."""
    model, x = PartialNet(WrittenPartialBlock), torch.randn(2, 3, 8, 8)
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
    own class would keep, and in its warning the share it removes); ``form='module'`` returns the own
    class all the same."""
    model = PartialNet(WrittenPartialBlock)
    for b in model.blocks:  # a narrow MLP: the stream is most of what there is to remove
        b.mlp1, b.mlp2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
    x = torch.randn(2, 3, 8, 8)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert isinstance(small, torch.fx.GraphModule)
    assert "of the parameters the graph form removes (below 0." in caplog.text, caplog.text
    # the warning that the graph comes back says why not the own class (it said only the first failure)
    warned = [r.getMessage() for r in caplog.records if "returns a torch.fx GraphModule" in r.getMessage()]
    assert warned and "below OWN_CLASS_SHARE (0.5): form='module' returns it" in warned[-1], warned
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


# ---------------------------------------------------------------------------------------------
# held sizes that follow the new widths (the rebuild's literal moves)
# ---------------------------------------------------------------------------------------------


class InceptionMixer(nn.Module):
    """InceptionNeXt's token mixer: a tuple of split sizes held by the module, three of them the same
    number (``(c - 3 * g, g, g, g)``), each piece losing its own count of channels."""

    def __init__(self, c: int = 16, g: int = 4):
        super().__init__()
        self.split_indexes = (c - 3 * g, g, g, g)
        self.hw, self.w, self.h = (nn.Conv2d(g, g, k, padding=p, groups=g) for k, p in
                                   ((3, 1), ((1, 5), (0, 2)), ((5, 1), (2, 0))))

    def forward(self, x):
        x_id, x_hw, x_w, x_h = torch.split(x, self.split_indexes, dim=1)
        return torch.cat((x_id, self.hw(x_hw), self.w(x_w), self.h(x_h)), dim=1)


class Res2Split(nn.Module):
    """Res2Net's bottleneck: the expanded width split into ``scale`` pieces by one int held as
    ``width``; each piece is its own group, so the pieces end up of different sizes (an int cannot
    say that: it becomes their list)."""

    def __init__(self, c: int = 16, width: int = 6, scale: int = 3):
        super().__init__()
        self.width, self.scale = width, scale
        self.conv1 = nn.Conv2d(c, width * scale, 1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1))
        self.conv3 = nn.Conv2d(width * scale, c, 1)

    def forward(self, x):
        spx = torch.split(F.relu(self.conv1(x)), self.width, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(conv(sp))
            out.append(sp)
        return x + self.conv3(torch.cat(out + [spx[-1]], 1))


class PaddedShortcut(nn.Module):
    """ReXNet's block: the shortcut (``in_channels``, held) is added into the first channels of a
    wider output, the rest pass."""

    def __init__(self, c_in: int = 16, c_out: int = 24):
        super().__init__()
        self.in_channels = c_in
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y[:, 0:self.in_channels] + x, y[:, self.in_channels:]], dim=1)


class HeldSizes(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mixer, self.res2, self.pad = InceptionMixer(), Res2Split(), PaddedShortcut()
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.mixer(h)
        return self.head(self.pad(self.res2(h)).mean((2, 3)))


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export", "dynamo"])
def test_held_split_sizes_tuples_and_slice_bounds_follow_the_new_widths(caplog, frontend):
    """A tuple of sizes whose equal entries move apart, an int split size whose pieces move apart
    (-> a list), and a held slice bound: each follows, in the first copy, and the own class removes
    what the graph removes (each front-end names the module whose forward made a node)."""
    model, x = HeldSizes(), torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    randomize(model.eval())
    oto = otofx.OTO(model, x, frontend=frontend)
    # NB: each piece of a split is a group of its own: 1, 2 or 3 rows zeroed, so that they differ
    zero_rows(model, oto, [torch.arange(min(1 + i % 3, z.rows - 1)) for i, z in enumerate(oto.groups)])
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert type(small) is HeldSizes, caplog.text
    assert _copies_made(caplog) == 1, caplog.text
    assert n_params(small) == n_params(oto.compress(form="graph")) < n_params(model)
    sizes = small.mixer.split_indexes
    assert type(sizes) is tuple and sum(sizes) == small.stem.out_channels and len(set(sizes[1:])) > 1
    assert sizes[1:] == (small.mixer.hw.out_channels, small.mixer.w.out_channels, small.mixer.h.out_channels)
    width = small.res2.width
    assert type(width) is list and sum(width) == small.res2.conv1.out_channels and len(set(width)) > 1
    assert small.pad.in_channels == small.stem.out_channels
    with torch.no_grad():
        other = torch.randn(3, 3, 9, 7)
        assert max_rel_diff(model(other), small(other)) < 1e-4


class ScaledPartialBlock(PartialBlock):
    """A held split size that also scales the output: following the split's new sizes changes the
    scale, which verification must catch (the copy is wrong), so the search keeps those rows."""

    def forward(self, x):
        a, b = torch.split(x, [self.part, self.rest], dim=1)
        y = torch.cat([self.pconv(a), b], 1) * self.part ** -0.5
        return x + self.mlp2(F.relu(self.mlp1(y)))


def test_a_held_size_that_is_also_a_number_is_never_taken_wrong(caplog):
    """The split's sizes follow, the scale with them: the copy differs from the model, verification
    refuses it, and the search keeps rows until the held size stays what it was."""
    model, x = PartialNet(ScaledPartialBlock), torch.randn(2, 3, 8, 8)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress(form="module")
    assert type(small) is PartialNet
    assert "goes wrong at blocks.0" in caplog.text, caplog.text
    assert small.blocks[0].part == model.blocks[0].part
    assert n_params(small) > n_params(oto.compress(form="graph"))
    with torch.no_grad():
        other = torch.randn(3, 3, 11, 7)
        assert max_rel_diff(model(other), small(other)) < 1e-4


# ---------------------------------------------------------------------------------------------
# the search's cost on repeated blocks
# ---------------------------------------------------------------------------------------------


class GluBlock(nn.Module):
    """A GLU MLP whose width is viewed as two halves by sizes written into the code: its own forward
    cannot take the width narrowed (a fault no held size explains: the search keeps its rows)."""

    def __init__(self, c: int = 8, half: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, 2 * half), nn.Linear(half, c)

    def forward(self, x):
        h = self.fc1(x).unflatten(-1, (2, 8))
        return x + self.fc2(F.gelu(h[..., 0, :]) * h[..., 1, :])


class GluStack(nn.Module):
    def __init__(self, depth: int = 8):
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.blocks = nn.Sequential(*(GluBlock() for _ in range(depth)))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(self.emb(x)))


def test_repeated_blocks_keep_their_rows_in_one_step(caplog):
    """The same fault in each of 8 blocks: blamed at the first, the rows of that group are kept in
    every block of the same class, path pattern and shapes at once, and the own class removes the
    stream. Three copies (the first, the one keeping the width in every block, and one without the
    other blocks' widths, a guess that fails), where a search block by block makes nine."""
    model, x = GluStack(), torch.randn(2, 5, 6)
    oto = _zeroed(model, x)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert type(small) is GluStack, caplog.text
    assert _copies_made(caplog) == 3, caplog.text
    assert "in its 7 copies (blocks.*)" in caplog.text, caplog.text
    assert all(b.fc1.out_features == 16 for b in small.blocks) and small.emb.out_features == 4
    with torch.no_grad():
        y = torch.randn(3, 7, 6)
        assert max_rel_diff(model(y), small(y)) < 1e-4


def test_the_layer_norms_constants_are_read_once_per_compress(monkeypatch):
    """MLP-Mixer's constant fills come from a run of the graph: one run serves every copy the search
    makes (here three: the first, the layer norms' widths kept, the blocks' GLU widths kept)."""
    from otofx import verify
    from test_mixer import Block, Mixer, SIDE

    class GluMixerBlock(Block):
        def forward(self, x):
            x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
            h = self.fc1(self.norm2(x)).unflatten(-1, (2, 16))
            return x + self.fc2(F.gelu(h[..., 0, :]) * h[..., 1, :])

    model = Mixer()
    model.blocks = nn.Sequential(*(GluMixerBlock("timm") for _ in range(3)))
    for b in model.blocks:
        b.fc2 = nn.Linear(16, b.fc2.out_features)
    x = torch.randn(2, 3, SIDE, SIDE)
    oto = _zeroed(model, x)
    runs, copies = [], []
    run_eval = verify.run_eval
    monkeypatch.setattr(verify, "run_eval", lambda m, *a, **k: (runs.append(type(m).__name__), run_eval(m, *a, **k))[1])
    small = oto.compress(form="module")
    assert type(small) is Mixer
    assert runs.count("ConstantFills") == 1, runs
    with torch.no_grad():
        y = torch.randn(3, 3, SIDE, SIDE)
        assert max_rel_diff(model(y), small(y)) < 1e-4


class _Update(nn.Module):
    """RAFT's update block: a recurrent state of ``hidden_size`` channels (the size its parent reads)."""

    def __init__(self, hidden: int, ctx: int):
        super().__init__()
        self.hidden_size = hidden
        self.gru = nn.Conv2d(hidden + ctx + 1, hidden, 3, padding=1)
        self.head = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, h, c, corr):
        h = torch.tanh(self.gru(torch.cat([h, c, corr], 1)))
        return h, self.head(h)


class Flow(nn.Module):
    """RAFT's two habits: its forward splits the context by ``self.update.hidden_size`` (an int of a
    child), and it divides the correlation of two feature maps by the square root of their width, read
    off the tensor between module calls. The feature maps' width is a group (a zero channel adds
    nothing to the correlation); the graph keeps the old divisor, the own class would take the new
    one, and no module call shows where: the own-class search finds that group by elimination."""

    def __init__(self, feat: int = 8, hidden: int = 6, ctx: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, feat, 1))
        self.context = nn.Sequential(nn.Conv2d(3, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, hidden + ctx, 1))
        self.update = _Update(hidden, ctx)

    def forward(self, a, b):
        if a.shape[-1] % 2:  # NB: as RAFT's checks (symbolic_trace cannot take them; export reads the width as a number)
            raise ValueError("even image widths only")
        f = self.features(torch.cat([a, b], 0))
        f1, f2 = torch.chunk(f, 2, 0)
        corr = (f1 * f2).sum(1, keepdim=True) / torch.sqrt(torch.tensor(f1.shape[1], dtype=f1.dtype))
        out = self.context(a)
        size = self.update.hidden_size
        h, c = torch.split(out, [size, out.shape[1] - size], dim=1)
        h, c = torch.tanh(h), torch.relu(c)
        flows = []
        for _ in range(2):
            h, d = self.update(h, c, corr)
            flows.append(d)
        return flows


def test_a_width_read_between_calls_is_found_by_elimination(caplog):
    torch.manual_seed(0)
    model = randomize(Flow().eval())
    x = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1, fraction=0.5)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress(form="module")
    assert type(small) is Flow
    assert_exact(model, oto, x, small=small)
    assert_exact(model, oto, (torch.randn(2, 3, 12, 6), torch.randn(2, 3, 12, 6)), small=small)
    # the held size of the child follows; the feature maps keep their width (the divisor's), and only they
    assert small.update.hidden_size == small.update.gru.out_channels < 6
    assert small.features[2].out_channels == 8
    assert small.features[0].out_channels < 12 and small.context[0].out_channels < 10
    assert "found by elimination" in caplog.text
    assert any("keeps the" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # form="auto" takes the own class too (it keeps 4 of the 20 zero rows, few of the parameters)
    auto = oto.compress()
    assert type(auto) is Flow and auto.features[2].out_channels == 8


# ---------------------------------------------------------------------------------------------
# a width a module checks against what it reads or makes (diffusers' Upsample2D, Downsample1D)
# ---------------------------------------------------------------------------------------------


class _Resample(nn.Module):
    """Up- or down-samples, then a conv; asserts its input's and output's widths against its attributes."""

    def __init__(self, channels: int, out_channels: int, up: bool):
        super().__init__()
        self.channels, self.out_channels, self.up = channels, out_channels, up
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else F.avg_pool2d(x, 2)
        y = self.conv(x)
        assert y.shape[1] == self.out_channels
        return y


class _UNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.norm1 = nn.GroupNorm(4, 16)
        self.down = _Resample(16, 16, up=False)
        self.norm2 = nn.GroupNorm(4, 16)
        self.up = _Resample(16, 16, up=True)
        self.norm3 = nn.GroupNorm(4, 16)
        self.conv_out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = F.silu(self.norm1(self.conv_in(x)))
        h = F.silu(self.norm2(self.down(h)))
        h = F.silu(self.norm3(self.up(h)))
        return self.conv_out(h)


def test_widths_a_module_asserts_follow_what_it_reads_and_makes():
    """Each resampler's conv takes 16 channels and makes 16; the groups around it lose 1, 2 and 3 of their
    4 rows (of 4 channels each, by the GroupNorms), so `channels` and `out_channels` take the widths of the
    tensors the module reads and makes, not of any axis of 16 its conv has."""
    torch.manual_seed(0)
    model = randomize(_UNetish().eval())
    x = torch.randn(1, 3, 16, 16)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [4, 4, 4]
    lose = {"conv_in.bias": 1, "down.conv.bias": 3, "up.conv.bias": 2}
    rows = [list(range(next(k for b, k in lose.items() if any(n == b for n, _, _ in z.params)))) for z in oto.groups]
    zero_rows(model, oto, rows)
    small = oto.compress(form="module")
    assert type(small) is _UNetish
    assert (small.down.channels, small.down.out_channels) == (12, 4)
    assert (small.up.channels, small.up.out_channels) == (4, 8)
    for shape in ((1, 3, 16, 16), (2, 3, 8, 24)):
        xs = torch.randn(shape)
        with torch.no_grad():
            assert max_rel_diff(model(xs), small(xs)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# head counts read off a conv inside a wrapper (Ultralytics' Conv: conv + bn, no tensors of its own)
# ---------------------------------------------------------------------------------------------


class _ConvBN(nn.Module):
    def __init__(self, c1: int, c2: int, k: int = 1, g: int = 1):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c1, c2, k, padding=k // 2, groups=g, bias=False), nn.BatchNorm2d(c2)

    def forward(self, x):
        return self.bn(self.conv(x))


class _PSAAttention(nn.Module):
    """YOLO11's position-sensitive attention: q, k, v of every head from one conv, viewed by the held sizes."""

    def __init__(self, dim: int = 64, num_heads: int = 2):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.key_dim = self.head_dim // 2
        self.scale = self.key_dim ** -0.5
        self.qkv = _ConvBN(dim, dim + 2 * self.key_dim * num_heads)
        self.proj, self.pe = _ConvBN(dim, dim), _ConvBN(dim, dim, 3, g=dim)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.key_dim * 2 + self.head_dim, H * W).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q * self.scale).transpose(-2, -1) @ k).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W))
        return self.proj(x)


class _PSANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.attn, self.head = _ConvBN(3, 64, 3), _PSAAttention(), nn.Linear(64, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head((h + self.attn(h)).mean((2, 3)))


def test_a_head_count_read_off_a_wrapped_conv_follows_the_heads_removed():
    """The heads' group (one row per head of q, k, v and the position conv) loses a head and the stream
    half its channels: the attention's ``num_heads`` follows ``qkv.conv``'s head axis inside its wrapper,
    so no zero rows are kept (they were: YOLO11's and YOLOv10's PSA kept their heads and stream)."""
    torch.manual_seed(0)
    model = randomize(_PSANet().eval())
    x = torch.randn(1, 3, 8, 8)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [2, 64]
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    assert type(small) is _PSANet and small.attn.num_heads == 1 and small.stem.conv.out_channels == 32
    for shape in ((1, 3, 8, 8), (2, 3, 6, 10)):
        xs = torch.randn(shape)
        with torch.no_grad():
            assert max_rel_diff(model(xs), small(xs)) <= 1e-4
