"""Golden rewrites: the exact code and module sizes of ``compress()`` for four tiny models.

Fixed rows are zeroed (no randomness in the choice), so the compressed graph is deterministic. The
expected code was generated once and checked by hand: the graph keeps its structure, modules shrink,
and the literal ``view(-1, 4 * 5 * 5)`` of the flatten head becomes ``view(-1, 75)`` after one of the
four channels (25 features) is removed.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn as nn

import otofx
from helpers import assert_exact, fresh_like, randomize, zero_rows

pytestmark = pytest.mark.usefixtures("single_thread")


def normalise(code: str) -> str:
    """Drop blank lines and trailing spaces (fx pads its code with both)."""
    return "\n".join(line.rstrip() for line in textwrap.dedent(code).splitlines() if line.strip())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.head(torch.relu(x + y))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(torch.cat([self.a(x), self.b(x)], dim=1)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.pw(torch.relu(self.bn2(self.dw(x))))


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        return self.fc(x.view(-1, 4 * 5 * 5))


def compress_fixed(model_cls, rows_per_group, expect_rows):
    """Build, randomise, analyse, zero the given rows, compress and check exactness."""
    torch.manual_seed(0)
    model = randomize(model_cls())
    x = torch.randn(2, 3, 5, 5)
    oto = otofx.OTO(model, x)
    assert [z.rows for z in oto.groups] == expect_rows
    zero_rows(model, oto, [torch.tensor(r, dtype=torch.long) for r in rows_per_group])
    small = assert_exact(model, oto, fresh_like(x), small=oto.compress(form="graph"))  # the rewritten code
    assert_exact(model, oto, x, small=small)
    return model, oto, small


RESIDUAL_CODE = """
def forward(self, x):
    stem = self.stem(x);  x = None
    bn0 = self.bn0(stem);  stem = None
    relu = torch.relu(bn0);  bn0 = None
    conv1 = self.conv1(relu)
    bn1 = self.bn1(conv1);  conv1 = None
    relu_1 = torch.relu(bn1);  bn1 = None
    conv2 = self.conv2(relu_1);  relu_1 = None
    bn2 = self.bn2(conv2);  conv2 = None
    add = relu + bn2;  relu = bn2 = None
    relu_2 = torch.relu(add);  add = None
    head = self.head(relu_2);  relu_2 = None
    return head
"""


def test_golden_residual():
    model, oto, small = compress_fixed(Residual, [[1, 4], [0, 2, 5]], expect_rows=[8, 8])
    # group 0 is the residual stream: stem, bn0, conv2, bn2 and head's input, tied by the add
    names0 = {n for n, _, _ in oto.groups[0].params}
    assert {"stem.weight", "bn0.weight", "conv2.weight", "bn2.bias", "head.weight", "conv1.weight"} <= names0
    assert normalise(small.code) == normalise(RESIDUAL_CODE)
    assert small.stem.out_channels == 6 and small.bn0.num_features == 6
    assert (small.conv1.in_channels, small.conv1.out_channels) == (6, 5) and small.bn1.num_features == 5
    assert (small.conv2.in_channels, small.conv2.out_channels) == (5, 6) and small.bn2.num_features == 6
    assert (small.head.in_channels, small.head.out_channels) == (6, 4)
    assert small.bn2.running_mean.shape == (6,) and small.bn2.running_var.shape == (6,)


CONCAT_CODE = """
def forward(self, x):
    a = self.a(x)
    b = self.b(x);  x = None
    cat = torch.cat([a, b], dim = 1);  a = b = None
    relu = torch.relu(cat);  cat = None
    c = self.c(relu);  relu = None
    return c
"""


def test_golden_concat():
    model, oto, small = compress_fixed(Concat, [[0], [1, 3]], expect_rows=[4, 6])
    assert normalise(small.code) == normalise(CONCAT_CODE)
    assert small.a.out_channels == 3 and small.b.out_channels == 4
    assert (small.c.in_channels, small.c.out_channels) == (7, 4)
    # c keeps a's channels 1..3 then b's channels 0, 2, 4, 5 (offset 4 in the concat)
    keep = [1, 2, 3, 4 + 0, 4 + 2, 4 + 4, 4 + 5]
    assert torch.equal(small.c.weight, model.c.weight[:, keep])


DEPTHWISE_CODE = """
def forward(self, x):
    conv1 = self.conv1(x);  x = None
    bn1 = self.bn1(conv1);  conv1 = None
    relu = torch.relu(bn1);  bn1 = None
    dw = self.dw(relu);  relu = None
    bn2 = self.bn2(dw);  dw = None
    relu_1 = torch.relu(bn2);  bn2 = None
    pw = self.pw(relu_1);  relu_1 = None
    return pw
"""


def test_golden_depthwise():
    model, oto, small = compress_fixed(Depthwise, [[2, 3, 7]], expect_rows=[8])
    assert normalise(small.code) == normalise(DEPTHWISE_CODE)
    assert small.conv1.out_channels == 5 and small.bn1.num_features == 5
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (5, 5, 5)
    assert small.dw.weight.shape == (5, 1, 3, 3)
    assert small.bn2.num_features == 5 and small.pw.in_channels == 5
    keep = [0, 1, 4, 5, 6]
    assert torch.equal(small.dw.weight, model.dw.weight[keep])


FLATTEN_CODE = """
def forward(self, x):
    conv1 = self.conv1(x);  x = None
    relu = torch.relu(conv1);  conv1 = None
    view = relu.view(-1, 75);  relu = None
    fc = self.fc(view);  view = None
    return fc
"""


def test_golden_flatten_linear():
    model, oto, small = compress_fixed(FlattenHead, [[1]], expect_rows=[4])
    # before: the literal 4 * 5 * 5 = 100 is in the graph
    assert "relu.view(-1, 100)" in model_code(model)
    assert normalise(small.code) == normalise(FLATTEN_CODE)
    assert small.conv1.out_channels == 3
    assert (small.fc.in_features, small.fc.out_features) == (75, 3)
    keep = torch.cat([torch.arange(0, 25), torch.arange(50, 100)])
    assert torch.equal(small.fc.weight, model.fc.weight[:, keep])


def model_code(model) -> str:
    return torch.fx.symbolic_trace(model).code
