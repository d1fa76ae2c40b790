"""Decisions on float values: a top-k, an NMS or a Python branch on ``.item()`` that falls the other way
on tied values, and graphs that assert on data-dependent sizes.

A compressed model sums the same non-zero terms as the full one in another order; where two scores tie
or nearly tie, its top-k may pick the other item and every output after it differs. Verification
replays the reference's decisions where the values they read agree to the tolerance
(``otofx.verify.replay_decisions``), so such a model passes, with a warning, and a wrong one does not.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import otofx
from helpers import randomize, zero_random_rows
from otofx.capture import _branch_asserts, said_branches
from otofx.errors import VerificationError
from otofx.verify import compare, compare_all, replay_decisions, run_eval

torchvision = pytest.importorskip("torchvision")


class Pick(nn.Module):
    """Scores each item (a row of ``x``) and returns the box of the best one."""

    def __init__(self, w):
        super().__init__()
        self.score = nn.Linear(2, 1, bias=False)
        self.box = nn.Linear(2, 4)
        with torch.no_grad():
            self.score.weight.copy_(torch.tensor([w]))
            self.box.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0], [2.0, 2.5]]))
            self.box.bias.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0]))

    def forward(self, x):
        s = self.score(x).squeeze(-1)
        return self.box(x[s.topk(1).indices])


class Gate(nn.Module):
    """A Python branch on a float value read off a tensor."""

    def __init__(self, w):
        super().__init__()
        self.score = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(torch.tensor([w]))

    def forward(self, x):
        if self.score(x).sum().item() > 1.0:
            return x * 2.0
        return x - 3.0


ITEMS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def _tied_pair(delta: float):
    """The reference scores both items 0.5 exactly; the candidate favours the item the reference did
    not pick by ``delta`` relative."""
    ref = Pick([0.5, 0.5])
    picked = int(ref.score(ITEMS).squeeze(-1).topk(1).indices)
    w = [0.5, 0.5]
    w[1 - picked] *= 1 + delta
    return ref, Pick(w)


def _warnings(caplog) -> list:
    return [r.getMessage() for r in caplog.records if "decision" in r.getMessage()]


def test_a_tied_top_k_is_replayed_and_said(caplog):
    ref, cand = _tied_pair(1e-6)
    own = run_eval(cand, (ITEMS,))
    assert not torch.allclose(own, run_eval(ref, (ITEMS,)), rtol=1e-2), "the candidate should pick the other item"
    with caplog.at_level(logging.WARNING, logger="otofx"):
        err = compare(ref, cand, (ITEMS,), None, 1e-4, "the candidate")
    assert err < 1e-6
    said = _warnings(caplog)
    assert len(said) == 1 and "topk" in said[0] and "1 decision" in said[0]


def test_a_decision_on_values_that_differ_is_not_replayed():
    ref, cand = _tied_pair(0.2)  # the scores differ by far more than rounding: a wrong model
    with pytest.raises(VerificationError, match="relative error"):
        compare(ref, cand, (ITEMS,), None, 1e-4, "the candidate")
    assert replay_decisions(ref, cand, (ITEMS,), None, 1e-4) is None


def test_what_follows_a_replayed_decision_is_still_checked():
    ref, cand = _tied_pair(1e-6)
    with torch.no_grad():
        cand.box.bias.add_(1e-2)  # wrong after the decision
    with pytest.raises(VerificationError):
        compare(ref, cand, (ITEMS,), None, 1e-4, "the candidate")


def test_a_branch_on_item_is_replayed(caplog):
    x = torch.tensor([[1.0, 1.0]])
    ref, cand = Gate([0.5, 0.5]), Gate([0.5, 0.5 * (1 + 1e-6)])  # 1.0 exactly, and just above
    assert not torch.equal(run_eval(ref, (x,)), run_eval(cand, (x,)))
    with caplog.at_level(logging.WARNING, logger="otofx"):
        compare(ref, cand, (x,), None, 1e-4, "the candidate")
    assert "_local_scalar_dense" in _warnings(caplog)[0]


def test_precomputed_reference_outputs_replay_from_the_source():
    ref, cand = _tied_pair(1e-6)
    outs = [run_eval(ref, (ITEMS,))]
    sets = [((ITEMS,), {}, "the example inputs")]
    with pytest.raises(VerificationError):
        compare_all(outs, cand, sets, 1e-4, "the candidate")
    assert compare_all(outs, cand, sets, 1e-4, "the candidate", source=ref) < 1e-6


class Detector(nn.Module):
    """Conv features, a score and a box per position, top-k then NMS: a data-dependent count of boxes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.cls = nn.Conv2d(32, 1, 1)
        self.box = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        f = self.body(x)
        scores = self.cls(f).flatten().sigmoid()
        boxes = self.box(f).permute(0, 2, 3, 1).reshape(-1, 4)
        boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:].exp()], 1)
        top = scores.topk(50)
        keep = torchvision.ops.nms(boxes[top.indices], top.values, 0.5)
        return boxes[top.indices][keep], top.values[keep]


def _detector(seed: int):
    torch.manual_seed(seed)
    m = Detector().eval()
    randomize(m)
    x = torch.randn(1, 3, 32, 32)
    x[..., 8:, :] = 0
    return m, x


@pytest.mark.parametrize("seed", [0, 2])
def test_detector_with_nms_comes_back_as_its_own_class_and_exact(seed):
    m, x = _detector(seed)
    oto = otofx.OTO(m, x)
    if _branch_asserts(oto.graph_module.graph):
        # NB: whether another shape passes an assertion on NMS's count depends on the weights
        assert not oto.state.more_inputs
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    small = oto.compress()
    assert type(small) is Detector
    assert small.body[0].out_channels == 8 and small.body[3].out_channels == 16
    with torch.no_grad():
        for a, b in zip(m(x), small(x)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_a_graph_that_refuses_the_example_at_new_weights_says_so():
    """The export graph asserts on how many boxes NMS keeps, true for the weights it was captured with;
    once rows are zeroed the graph form either verifies or says the graph itself refuses the example
    (never that otofx's rewrite is wrong)."""
    m, x = _detector(2)
    oto = otofx.OTO(m, x)
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    refused = oto._graph_refuses()
    if refused is None:
        assert isinstance(oto.compress(form="graph"), torch.fx.GraphModule)
    else:
        with pytest.raises(VerificationError, match="captured graph itself refuses the example inputs") as e:
            oto.compress(form="graph")
        assert "bug in otofx" not in str(e.value)
    assert type(oto.compress(form="module")) is Detector


def test_long_branch_conditions_are_cut_in_messages():
    cond = " + ".join(f"4*Min(300, u{i})" for i in range(90)) + " > 4000"
    said = said_branches([(cond, "True"), ("Eq(u90, 0)", "False")])
    assert len(said) < 300 and said.endswith("Eq(u90, 0) is False") and "... " in said and "> 4000 is True" in said


class Thresholded(nn.Module):
    """A Python branch on whether any score passes a threshold (draft_export captures the example's)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 8, 3, padding=1))
        self.cls = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        f = self.body(x)
        s = self.cls(f).flatten()
        if (s > 0).any():
            return f.mean((2, 3)) + s.clamp(min=0).sum()
        return f.mean((2, 3))


def test_auto_gives_the_own_class_when_new_weights_take_another_branch(caplog):
    torch.manual_seed(0)
    m = Thresholded().eval()
    randomize(m)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        m.cls.bias.fill_(5.0)  # some score passes: the example's branch
    oto = otofx.OTO(m, x)
    # NB: torch 2.14's draft_export captures the branch; torch 2.11's draft cannot check it on its graph,
    # and the model is captured in parts (body, cls), which has no graph form to refuse anything
    whole = bool(oto.graph_module.meta.get("otofx_data_branches"))
    assert whole or oto.frontend == "parts"
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    with torch.no_grad():
        m.cls.bias.fill_(-1e4)  # as training might leave it: no score passes now
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert type(small) is Thresholded
    if whole:
        assert any("takes another branch than the graph holds" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-4, atol=1e-5)
