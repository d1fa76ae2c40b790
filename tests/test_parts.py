"""Capture in parts: a forward no front-end captures, whose submodules can be (otofx.capture_parts).

The model below post-processes in NumPy (no front-end follows a tensor into NumPy), as legacy detectors
do; torchvision's RetinaNet, FCOS and Mask/Keypoint R-CNN are the same case for another reason (torch's
draft_export fails inside their post-processing). Their backbones and heads are captured and analysed
as parts; the channels crossing between parts stay whole; the result is the model's own class.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

import otofx
from helpers import n_params, randomize, snapshot, zero_random_rows
from otofx.capture_parts import PARTS
from otofx.errors import CaptureError, InputError


def _cbr(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class NumpyDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(_cbr(3, 16), _cbr(16, 24), _cbr(24, 32))
        self.head = nn.Sequential(_cbr(32, 32), nn.Conv2d(32, 5, 1))

    def forward(self, images):
        out = self.head(self.backbone(images[0].unsqueeze(0)))
        scores = out[0, 0].flatten()
        keep = np.flatnonzero(scores.detach().cpu().numpy() > 0)  # NB: no front-end captures NumPy
        boxes = out[0, 1:].flatten(1).t()
        return boxes[torch.from_numpy(keep)], scores[torch.from_numpy(keep)]


def _model(seed=0):
    torch.manual_seed(seed)
    m = NumpyDetector().eval()
    randomize(m)
    return m


def _same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5)


def test_numpy_postprocessing_is_captured_in_parts_and_comes_back_as_its_own_class(caplog):
    m = _model()
    x = [torch.randn(3, 24, 24)]
    before = snapshot(m)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        oto = otofx.OTO(m, (x,))
    assert snapshot(m) == before, "the analysis mutated the model"
    said = [r.getMessage() for r in caplog.records if "cannot be captured as a whole" in r.getMessage()]
    assert said and "2 parts (backbone, head)" in said[0]
    assert oto.frontend == "parts"
    # the backbone's inner widths and the head's first conv; the backbone's output (into the head) and
    # the head's output stay whole
    assert sorted(z.rows for z in oto.groups) == [16, 24, 32]
    rows_of = {(name, dim) for z in oto.groups for name, dim, _ in z.params}
    assert ("backbone.2.0.weight", 0) not in rows_of and ("head.0.0.weight", 0) in rows_of
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    small = oto.compress()
    assert type(small) is NumpyDetector
    assert small.backbone[0][0].out_channels == 8 and small.head[0][0].out_channels == 16
    assert n_params(small) < n_params(m)
    with torch.no_grad():
        for images in (x, [torch.randn(3, 40, 32)]):
            _same(m(images), small(images))
    assert "captured in parts: backbone, head" in oto.report()
    # NB: both parts take a tensor: traced (milliseconds), not exported
    assert oto.graph_module.meta[PARTS].frontends == ("symbolic_trace", "symbolic_trace")


class ListHead(nn.Module):
    """A head over a list of feature maps (RetinaNet's): symbolic_trace cannot iterate the list."""

    def __init__(self):
        super().__init__()
        self.tower, self.out = _cbr(32, 32), nn.Conv2d(32, 5, 1)

    def forward(self, feats):
        return [self.out(self.tower(f)) for f in feats]


class PyramidDetector(NumpyDetector):
    def __init__(self):
        super().__init__()
        self.head = ListHead()

    def forward(self, images):
        f = self.backbone(images[0].unsqueeze(0))
        outs = self.head([f, torch.nn.functional.avg_pool2d(f, 2)])
        scores = torch.cat([o[0, 0].flatten() for o in outs])
        keep = np.flatnonzero(scores.detach().cpu().numpy() > 0)
        return scores[torch.from_numpy(keep)]


def test_a_part_over_a_list_is_exported_and_the_rest_traced():
    torch.manual_seed(0)
    m = randomize(PyramidDetector().eval())
    x = [torch.randn(3, 24, 24)]
    oto = otofx.OTO(m, (x,))
    assert oto.graph_module.meta[PARTS].frontends == ("symbolic_trace", "export")
    assert sorted(z.rows for z in oto.groups) == [16, 24, 32]
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    small = oto.compress()
    assert type(small) is PyramidDetector and n_params(small) < n_params(m)
    assert small.head.tower[0].out_channels == 16
    with torch.no_grad():
        for images in (x, [torch.randn(3, 40, 32)]):
            _same(m(images), small(images))


def test_parts_have_no_graph_form():
    m = _model()
    oto = otofx.OTO(m, ([torch.randn(3, 16, 16)],))
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    with pytest.raises(InputError, match="captured in parts"):
        oto.compress(form="graph")


def test_dhspg_trains_the_parts_groups_to_zero():
    m = _model().train()
    x = [torch.randn(3, 16, 16)]
    oto = otofx.OTO(m, (x,))
    opt = oto.dhspg(lr=0.05, target_group_sparsity=0.5, start_pruning_steps=2, pruning_steps=4)
    for _ in range(10):
        opt.zero_grad()
        m.head(m.backbone(x[0].unsqueeze(0))).square().mean().backward()
        opt.step()
    assert opt.group_sparsity >= 0.45
    m.eval()
    small = oto.compress()
    assert type(small) is NumpyDetector and n_params(small) < n_params(m)
    with torch.no_grad():
        _same(m(x), small(x))


def test_frontend_parts_on_a_capturable_model_names_the_models_own_parameters():
    torch.manual_seed(0)
    m = nn.Sequential(_cbr(3, 8), _cbr(8, 8), nn.Conv2d(8, 2, 1)).eval()
    randomize(m)
    x = torch.randn(1, 3, 12, 12)
    oto = otofx.OTO(m, x, frontend="parts")
    assert {n for z in oto.groups for n, *_ in z.params} <= dict(m.named_parameters()).keys() | dict(m.named_buffers()).keys()
    zero_random_rows(m, oto, seed=0, fraction=0.5)
    small = oto.compress()
    assert type(small) is nn.Sequential
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-5)


def test_no_capturable_part_keeps_the_whole_models_error():
    class Loose(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return torch.from_numpy(x.detach().numpy() @ self.w.detach().numpy())

    with pytest.raises(CaptureError, match="(?s)could not capture Loose.*In parts: no submodule"):
        otofx.OTO(Loose(), torch.randn(2, 4))
