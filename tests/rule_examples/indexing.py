"""Examples for the indexing rules (narrow, slice, getitem, index, select, roll): passes/rules/indexing.py."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import _force_export, _heads, _merge, _qkvo, conv, example, H_, img, N, Net


@example("narrow")
def narrow_forms():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.ca(y.narrow(1, 0, 3)) + s.cb(torch.narrow(y, 1, 3, 5))

    m = Net(fwd, c1=conv(3, 8), ca=conv(3, 4), cb=conv(5, 4))
    return m, img()


@example("slice", "narrow", "batch_norm", frontend="export")
def slice_export():
    """torch.export turns x[:, a:b] into aten.slice.Tensor (and narrow into aten.narrow)."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.bn(s.c1(x)))
        return s.ca(y[:, :3]) + s.cb(y[:, 3:-1]) + s.cc(y.narrow(1, 7, 1)) + s.cd(y[:, 2:6])

    m = Net(fwd, c1=conv(3, 8), bn=nn.BatchNorm2d(8), ca=conv(3, 4), cb=conv(4, 4), cc=conv(1, 4), cd=conv(4, 4))
    return m.eval(), img()


@example("slice", frontend="export")
def strided_slices_export():
    """Interleaved channels read by step: y[:, 0::3], y[:, 1::3], y[:, 2::3] of 12, and y[:, 1::3] of 8
    (a partial last block); each aligned block of 3 channels goes or stays as one."""

    def fwd(s, x):
        _force_export(x)
        y = torch.relu(s.c1(x))
        z = torch.relu(s.c2(x))
        return s.ca(y[:, 0::3]) + s.cb(y[:, 1::3]) * s.cc(y[:, 2::3]) + s.cd(z[:, 1::3])

    m = Net(fwd, c1=conv(3, 12), c2=conv(3, 8), ca=conv(4, 4), cb=conv(4, 4), cc=conv(4, 4), cd=conv(3, 4))
    return m, img()


@example("getitem")
def getitem_slices():
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.ca(y[:, :3]) + s.cb(y[:, 3:-2]) + s.cc(y[:, -2:]) + s.cd(y[..., 2:6, :, :])

    m = Net(fwd, c1=conv(3, 8), ca=conv(3, 4), cb=conv(3, 4), cc=conv(2, 4), cd=conv(4, 4))
    return m, img()


@example("getitem", "split")
def getitem_on_split_tuple():
    def fwd(s, x):
        parts = torch.relu(s.c1(x)).split([5, 3], dim=1)
        return s.ca(parts[0]) + s.cb(parts[-1])

    m = Net(fwd, c1=conv(3, 8), ca=conv(5, 4), cb=conv(3, 4))
    return m, img()


@example("index", "where", "check", frontend="export")
def relative_bias_table_export():
    """A per-head bias table gathered by a position index (Swin), masked with where: column h joins head h."""

    def fwd(s, x):
        _force_export(x)
        x = x.to(torch.float32)  # export checks the dtype with _assert_tensor_metadata
        q, k, v = (_heads(s, p(x), x) for p in (s.q, s.k, s.v))
        bias = s.table[s.pos].permute(2, 0, 1)  # [H, L, L]
        bias = torch.where(s.allowed, bias, -1e4)
        a = (q @ k.transpose(-2, -1) + bias).softmax(-1)
        return s.o(_merge(a @ v, x))

    m = Net(fwd, table=nn.Parameter(torch.randn(9, H_)), **_qkvo())
    m.register_buffer("pos", (torch.arange(5)[:, None] - torch.arange(5)[None, :] + 4))
    m.register_buffer("allowed", torch.rand(5, 5) > 0.2)
    return m, torch.randn(N, 5, 6)


@example("getitem")
def gather_rows_symbolic():
    """table[idx] with a buffer index under symbolic_trace: the table's columns pass as channels."""

    def fwd(s, x):
        y = s.l1(x)  # [N, 5, 8]
        return s.l2(y + s.table[s.idx])

    m = Net(fwd, l1=nn.Linear(6, 8), table=nn.Parameter(torch.randn(7, 8)), l2=nn.Linear(8, 3))
    m.register_buffer("idx", torch.tensor([0, 3, 3, 6, 1]))
    return m, torch.randn(N, 5, 6)


@example("roll")
def roll_spatial():
    m = Net(lambda s, x: s.c2(torch.roll(torch.relu(s.c1(x)), shifts=(1, -2), dims=(2, 3))), c1=conv(3, 8), c2=conv(8, 4))
    return m, img()


def _disentangled(s, x):
    """DeBERTa's disentangled attention, small: heads merged with the batch ([N * H, L, hd]), a
    relative-position key table projected into heads and repeated over the batch, and content-to-
    position scores gathered by relative distance with an index expanded over batch x heads."""
    n, l = x.shape[0], x.shape[1]
    q, k, v = (_heads(s, p(x), x).reshape(n * H_, l, -1) for p in (s.q, s.k, s.v))
    pk = s.pk(s.rel).view(1, -1, H_, q.shape[-1]).permute(0, 2, 1, 3).reshape(H_, -1, q.shape[-1])
    pk = pk.repeat(n, 1, 1)  # [N * H, 2P, hd]
    c2p = torch.bmm(q, pk.transpose(-1, -2))  # [N * H, L, 2P]
    idx = s.pos[:l, :l].unsqueeze(0).expand(q.size(0), l, l)
    scores = torch.bmm(q, k.transpose(-1, -2)) + torch.gather(c2p, -1, idx)
    o = torch.bmm(scores.softmax(-1), v).view(n, H_, l, -1)
    return s.o(_merge(o, x))


@example("repeat", "gather", frontend="export")
def disentangled_attention_heads_export():
    def fwd(s, x):
        _force_export(x)
        return _disentangled(s, x.to(torch.float32))

    m = Net(fwd, rel=nn.Parameter(torch.randn(9, 6)), pk=nn.Linear(6, 8), **_qkvo())
    m.register_buffer("pos", (torch.arange(5)[:, None] - torch.arange(5)[None, :] + 4).clamp(0, 8))
    return m, torch.randn(N, 5, 6)


@example("gather", expect_pin="gathered along this axis", frontend="export")
def gather_over_channels_pins_them():
    """Gathering along the channel axis reads channels by data: those are pinned (another conv's stay rows)."""

    def fwd(s, x):
        g = torch.gather(s.c1(x), 1, s.idx.expand(x.shape[0], 4, 5, 5)).sum(1, keepdim=True)
        return s.c3(torch.relu(s.c2(x))) + g

    m = Net(fwd, c1=conv(3, 8), c2=conv(3, 8), c3=conv(8, 4))
    m.register_buffer("idx", torch.tensor([0, 7, 3, 3]).view(1, 4, 1, 1))
    return m, img()


@example("index_select")
def index_select_positions_table():
    """A sinusoidal position table read with index_select (XGLM, XLNet): the table's width passes, the positions are read by data."""

    def fwd(s, x):
        y = s.c1(x).flatten(2).transpose(1, 2)  # [N, 25, 8]
        pos = s.table.index_select(0, s.pos)  # [25, 8]
        return s.fc(y + pos)

    m = Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 3), table=nn.Parameter(torch.randn(30, 8)))
    m.register_buffer("pos", torch.arange(25))
    return m, img()


@example("index_select", pinned="gathered along this axis by an index tensor")
def index_select_over_channels():
    m = Net(lambda s, x: s.c2(s.c1(x).index_select(1, s.idx)), c1=conv(3, 8), c2=conv(4, 4))
    m.register_buffer("idx", torch.tensor([0, 7, 3, 3]))
    return m, img()


@example("getitem")
def slice_at_a_size_read_at_run_time():
    """A crop at a bound computed from sizes (timm's Swin removes its window padding with
    x[:, :H, :W, :]): the cropped axes are pinned, the channels pass."""

    def fwd(s, x):
        y = F.pad(torch.relu(s.c1(x)), (0, 2, 0, 2))
        h, w = x.shape[2], x.shape[3]
        return s.c2(y[:, :, :h, : w - 1])

    return Net(fwd, c1=conv(3, 8), c2=conv(8, 4)), img()


@example("getitem", "matmul", "softmax")
def per_head_bias_table_gathered_by_index():
    """LeViT's and EfficientFormer's attention_biases[:, attention_bias_idxs]: one index tensor
    among full slices gathers the positions; the table's head axis keeps its ids, so heads stay rows."""

    def fwd(s, x):
        q, k, v = _heads(s, s.q(x), x), _heads(s, s.k(x), x), _heads(s, s.v(x), x)
        bias = s.table[:, s.idx]  # [H, L, L]
        a = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)
        return s.o(_merge(a @ v, x))

    m = Net(fwd, **_qkvo())
    m.table = nn.Parameter(torch.randn(H_, 9))
    m.register_buffer("idx", torch.randint(0, 9, (5, 5), generator=torch.Generator().manual_seed(0)))
    return m, torch.randn(N, 5, 6)


def _pool_by_token(export: bool, take_along: bool = False):
    """CLIP's text pooling: x[torch.arange(B), tokens.argmax(-1)] picks one token per sample (``take_along``:
    torchtune's ``h.take_along_dim(eot.view(-1, 1, 1), dim=1)``, the index broadcast over the features); the
    features (and the stream's channels) pass."""

    def fwd(s, x):
        if export:
            _force_export(x)
        h = torch.relu(s.inp(x))  # [N, L, 8]
        h = h + s.mix(h)
        eot = x[..., 0].argmax(dim=-1)
        if take_along:
            return s.out(h.take_along_dim(eot.view(-1, 1, 1), dim=1).squeeze(1))
        pooled = h[torch.arange(h.shape[0]), eot]  # [N, 8]
        return s.out(pooled)

    m = Net(fwd, inp=nn.Linear(6, 8), mix=nn.Linear(8, 8), out=nn.Linear(8, 3))
    return m, torch.randn(N, 5, 6)


@example("getitem")
def pool_one_token_per_sample():
    return _pool_by_token(False)


@example("index", frontend="export")
def pool_one_token_per_sample_exported():
    return _pool_by_token(True)


def _dispatch(form: str, export: bool = False):
    """A mixture of experts' dispatch: the tokens each expert takes (fixed here; picked by a router in a
    real one) are written back into the stream's tokens by index (litgpt's ``y[idx] += w * e(x[idx])``,
    Hugging Face's ``index_add_``); the features, which are the stream's channels, pass."""

    def fwd(s, x):
        if export:
            _force_export(x)
        h = torch.relu(s.inp(x)).reshape(-1, 8)  # [N * L, 8]
        y = torch.zeros_like(h)
        a, b = s.ea(h[s.first]), s.eb(h[s.second]) * 0.5
        if form == "setitem":
            y[s.first] += a
            y[s.second] += b
        elif form == "index_put":
            y = y.index_put((s.first,), a, accumulate=True)
            y = torch.index_put(y, (s.second,), b, True)
        elif form == "index_add":
            y = y.index_add(0, s.first, a)
            y.index_add_(0, s.second, b, alpha=2.0)
        else:  # index_copy: each token written once
            y = torch.index_copy(y.index_copy(0, s.first, a), 0, s.third, b[:3])
        return s.out((y + h).reshape(x.shape[0], x.shape[1], 8))

    m = Net(fwd, inp=nn.Linear(6, 8), ea=nn.Linear(8, 8), eb=nn.Linear(8, 8), out=nn.Linear(8, 3))
    m.register_buffer("first", torch.tensor([0, 2, 3, 7, 9]))
    m.register_buffer("second", torch.tensor([1, 2, 5, 6, 7, 8]))
    m.register_buffer("third", torch.tensor([4, 6, 8]))
    return m, torch.randn(N, 5, 6)


@example("index_put", frontend="export")
def expert_dispatch_by_setitem_exported():
    return _dispatch("setitem", export=True)


@example("index_put")
def expert_dispatch_by_index_put():
    return _dispatch("index_put")


@example("index_add")
def expert_dispatch_by_index_add():
    return _dispatch("index_add")


@example("index_add", frontend="export")
def expert_dispatch_by_index_add_exported():
    return _dispatch("index_add", export=True)


@example("index_add")
def expert_dispatch_by_index_copy():
    return _dispatch("index_copy")


@example("take_along_dim")
def pool_end_of_text_token():
    """torchtune's CLIP text pooling: ``h.take_along_dim(eot.view(-1, 1, 1), dim=1)``."""
    return _pool_by_token(False, take_along=True)


@example("take_along_dim", frontend="export")
def pool_end_of_text_token_exported():
    return _pool_by_token(True, take_along=True)
