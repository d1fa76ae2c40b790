"""Channels merged with a pixel axis and split along other boundaries (segmentation_models_pytorch's MAnet).

MAnet's position attention ends with ``sp_map.reshape(B, C, H, W)`` on a ``[B, H*W, C]`` tensor, with no
permute: output channel ``c`` holds pixels of input channels ``c*H*W // C ...``. Which input channels share
an output channel depends on ``H*W``, so grouping them in the example's blocks is right at the example's
size only, while the model takes every size divisible by its stride.

* Where the reshape's sizes are read off the input (``symbolic_trace``, a dynamic export), the channels are
  pinned (``tests/rule_examples/shape.py::reshape_tokens_back_without_a_permute``);
* where they are literals (an export whose image sizes stayed static), the analysis cannot tell: the groups
  stay (the graph form is exact at its one size), and the model's own class is checked at twice the
  example's size, keeping the widths the reshape ties when it differs there (``OTO._check_sized_ties``).
* Heads split out of a width merged with the batch (``nn.MultiheadAttention`` decomposed by export) keep
  their ties: only the outermost size follows the batch (``tests/test_transformers.py``).
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import otofx
from otofx import capture
from helpers import max_rel_diff, n_params, randomize, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")


class PositionAttention(nn.Module):
    """MAnet's PABBlock, small."""

    def __init__(self, c: int, inner: int = 4):
        super().__init__()
        self.c = c
        self.top, self.center = nn.Conv2d(c, inner, 1), nn.Conv2d(c, inner, 1)
        self.bottom, self.out = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        b, _, h, w = x.shape
        top = self.top(x).flatten(2)
        center = self.center(x).flatten(2).transpose(1, 2)
        bottom = self.bottom(x).flatten(2).transpose(1, 2)
        sp = torch.softmax(torch.matmul(center, top).view(b, -1), 1).view(b, h * w, h * w)
        sp = torch.matmul(sp, bottom).reshape(b, self.c, h, w)  # NB: no permute: pixels mixed into channels
        return self.out(x + sp)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pab = PositionAttention(16)
        self.head = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        if x.shape[-1] % 4:  # NB: a shape check symbolic_trace cannot take: the export front-end captures it
            raise ValueError("the image side must be divisible by 4")
        return self.head(torch.relu(self.pab(self.stem(x))))


def _compressed(monkeypatch, caplog):
    monkeypatch.setattr(capture, "SPATIAL_FACTOR", 0.0)  # NB: image sizes stay static in the graph
    torch.manual_seed(0)
    model = randomize(Net().eval())
    x = torch.randn(1, 3, 8, 8)  # a 2x2 map at the attention: [1, 4, 16] -> [1, 16, 2, 2]
    oto = otofx.OTO(model, x)
    assert oto.frontend == "export"
    assert oto.zigset.sized_ties, "the reshape's ties were not recorded"
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress(form="module")
    return model, oto, small


def test_the_own_class_is_exact_at_other_sizes(monkeypatch, caplog):
    model, oto, small = _compressed(monkeypatch, caplog)
    assert type(small) is Net
    for side in (8, 12, 16, 24):
        x = torch.randn(2, 3, side, side)
        with torch.no_grad():
            assert max_rel_diff(model(x), small(x)) < 1e-4, side
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "a reshape ties in blocks read at the example's size" in said, said
    assert n_params(small) < n_params(model)  # the stem's own groups still go


def test_the_graph_form_removes_them_at_its_size(monkeypatch, caplog):
    model, oto, small = _compressed(monkeypatch, caplog)
    graph = oto.compress(form="graph")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert max_rel_diff(model(x), graph(x)) < 1e-4
    assert n_params(graph) < n_params(small)
