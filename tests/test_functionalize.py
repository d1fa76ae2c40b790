"""passes.functionalize: slice writes into a fresh buffer become the ``cat`` they compute.

Each case is exported with torch.export (the graph capture gives the analysis), rewritten, and run
against the module. Cases outside the pattern (overlapping or partial writes, a read between the
writes, a cast, a strided slice) stay as they are.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import otofx
from otofx.passes.functionalize import functionalize_slice_writes

aten = torch.ops.aten


class Writes(nn.Module):
    """``buf = new_empty``; ``buf[..., a:b].copy_(src)`` per piece; then ``buf`` is read."""

    def __init__(self, pieces, read_between=False, cast=False, step=1, zeros=False):
        super().__init__()
        self.pieces, self.read_between, self.cast, self.step, self.zeros = pieces, read_between, cast, step, zeros
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)

    def forward(self, x):
        make = x.new_zeros if self.zeros else x.new_empty
        buf = make(x.shape[0], x.shape[1], 8)
        srcs = [self.a(x), self.b(x)]
        early = None
        for i, (s, e) in enumerate(self.pieces):
            src = srcs[i % 2][..., : e - s]
            if self.cast:
                src = src.double()
            buf[..., s:e:self.step].copy_(src[..., : len(range(s, e, self.step))])
            if self.read_between and i == 0:
                early = buf.sum()
        out = torch.relu(buf) * 2
        return out if early is None else out + early


def _export(m, x):
    return torch.export.export(m, (x,)).module()


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("pieces,zeros", [([(0, 4), (4, 8)], False), ([(4, 8), (0, 4)], True),
                                          ([(0, 2), (2, 5), (5, 8)], False)])
def test_tiling_writes_become_a_cat(pieces, zeros):
    torch.manual_seed(0)
    m = Writes(pieces, zeros=zeros).eval()
    x = torch.randn(2, 3, 6)
    gm = _export(m, x)
    assert functionalize_slice_writes(gm) == 1
    ops = _ops(gm)
    assert aten.copy_.default not in ops and aten.new_empty.default not in ops and aten.new_zeros.default not in ops
    cat = next(n for n in gm.graph.nodes if n.target is aten.cat.default)
    assert len(cat.args[0]) == len(pieces) and cat.args[1] == 2
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))


@pytest.mark.parametrize("kw", [
    dict(pieces=[(0, 4), (3, 8)]),  # overlapping
    dict(pieces=[(0, 4), (4, 7)]),  # the last index never written
    dict(pieces=[(0, 4), (4, 8)], read_between=True),  # read before the buffer is whole
    dict(pieces=[(0, 4), (4, 8)], cast=True),  # copy_ casts float64 to float32
    dict(pieces=[(0, 8)], step=2),  # a strided slice
])
def test_other_writes_stay(kw):
    torch.manual_seed(0)
    m = Writes(**kw).eval()
    x = torch.randn(2, 3, 6)
    gm = _export(m, x)
    before = _ops(gm)
    assert functionalize_slice_writes(gm) == 0
    assert _ops(gm) == before


def test_analysis_sees_through_the_writes():
    """Two projections written into one buffer read by a Linear: each projection's rows are a
    group with the reader's columns (pinned without the rewrite: the writes have no edge to the
    reader); zeroing rows compresses exactly."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.out = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(8, 3)

        def forward(self, x):
            buf = x.new_empty(*x.shape[:-1], 8)
            buf[..., :4].copy_(torch.relu(self.a(x)))
            buf[..., 4:].copy_(torch.relu(self.b(x)))
            return self.out(buf)

    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(2, 3, 6)
    oto = otofx.OTO(m, x)
    rows = sorted(z.rows for z in oto.groups)
    assert rows == [4, 4], [(z.rows, [n for n, _, _ in z.params]) for z in oto.groups]
    with torch.no_grad():
        for z in oto.groups:
            for name, dim, idx in z.params:
                dict(m.named_parameters())[name].data.movedim(dim, 0)[idx[:2].reshape(-1)] = 0
    small = oto.compress()  # the graph: the class's own forward makes a buffer of width 8
    assert small.get_parameter("out.weight").shape == (3, 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-6)
