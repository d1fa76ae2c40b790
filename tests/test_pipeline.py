"""The pass pipeline as a public API: records, checks after each pass, composition, user passes."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse

import otofx
from otofx import pipeline as P
from otofx.errors import VerificationError
from otofx.passes.prune import row_norms

from helpers import RTOL, max_rel_diff, n_params, randomize, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")


class Small(nn.Module):
    """Two conv-bn-relu blocks and a linear head: two groups (conv1's and conv2's channels)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def zeroed():
    """A randomised Small in eval mode with half of every group's rows zeroed, and an input."""
    model, x = randomize(Small().eval()), torch.randn(2, 3, 8, 8)
    zero_random_rows(model, otofx.OTO(model, x))
    return model, x


def _ref(model, x):
    with torch.no_grad():
        return model(x)


def test_default_pipeline_records_every_pass(zeroed):
    model, x = zeroed
    state = P.default(verify=True).run(model, x)
    names = ["capture", "propagate_shapes", "find_zigs", "report_pins", "plan_zero_rows", "prune",
             "eliminate_dead_code", "verify"]
    assert [r.name for r in state.records] == names
    rec = {r.name: r for r in state.records}
    assert all(r.seconds >= 0 and r.check_seconds >= 0 and r.nodes > 0 for r in state.records)
    assert rec["prune"].changed and not rec["find_zigs"].changed and rec["capture"].changed
    assert state.plan.count == 8 and len(state.zigset.zigs) == 2
    assert "group" in state.report and state.frontend == "symbolic_trace"
    assert state.reference is not state.gm and n_params(state.gm) < n_params(model)
    assert max_rel_diff(_ref(model, x), P.run_eval(state.gm, (x,))) <= RTOL
    table = P.format_records(state.records)
    assert all(n in table for n in names)


def test_verify_true_records_the_error_of_every_changed_graph(zeroed):
    model, x = zeroed
    state = P.Pipeline([P.Capture(), P.propagate_shapes, P.find_zigs, P.plan_zero_rows, P.prune],
                       verify=True).run(model, x)
    errors = {r.name: r.error for r in state.records}
    assert errors["prune"] is not None and errors["prune"] <= RTOL
    assert errors["find_zigs"] is None  # unchanged graphs are not re-run


def _sigmoid_for_relu(gm: fx.GraphModule) -> None:
    """A wrong pass: edits the graph in place (returns None)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.relu:
            n.target = torch.sigmoid


def test_verify_catches_a_wrong_pass_and_names_it(zeroed):
    model, x = zeroed
    gm = fx.symbolic_trace(model)
    wrong = P.GraphPass(_sigmoid_for_relu, name="relu_to_sigmoid")
    with pytest.raises(VerificationError, match="relu_to_sigmoid"):
        P.Pipeline([wrong], verify=True).run(gm, x)
    # the in-place pass worked on a copy: the input graph (the reference) still has its relus
    assert sum(n.target is torch.relu for n in gm.graph.nodes) == 2
    # without verification the wrong graph goes through; Verify() as a pass catches it too
    state = P.Pipeline([wrong]).run(gm, x)
    assert sum(n.target is torch.sigmoid for n in state.gm.graph.nodes) == 2
    with pytest.raises(VerificationError, match="differs from the reference"):
        P.Pipeline([wrong, P.Verify()]).run(gm, x)


def test_verify_passes_an_exact_rewrite(zeroed):
    model, x = zeroed

    def relu_to_clamp(gm):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.relu:
                n.target, n.kwargs = torch.clamp, {"min": 0.0}
        return gm

    state = P.Pipeline([P.GraphPass(relu_to_clamp)], verify=True).run(fx.symbolic_trace(model), x)
    assert state.records[0].changed and state.records[0].error == 0.0


def test_lint_failure_raises_pipeline_error_naming_the_pass(zeroed):
    model, x = zeroed

    def dangling_module(state):
        gm = state.gm
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        node.target = "no_such_layer"  # lint: the target does not exist
        return state

    with pytest.raises(P.PipelineError, match="pass 'dangling_module' left an invalid graph"):
        P.Pipeline([dangling_module]).run(fx.symbolic_trace(model), x)


def test_analysis_pass_that_changes_the_graph_is_caught(zeroed):
    """A pass marked ``analysis = True`` is not linted, but it must leave the graph as it was."""
    model, x = zeroed

    def sneaky(state):
        gm = state.gm
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            gm.graph.call_function(torch.relu, (out.args[0],))  # a dead extra node
        return state

    sneaky.analysis = True
    with pytest.raises(P.PipelineError, match="pass 'sneaky' is marked analysis = True but changed the graph"):
        P.Pipeline([sneaky]).run(fx.symbolic_trace(model), x)
    for p in (P.propagate_shapes, P.find_zigs, P.report_pins, P.plan_zero_rows):
        assert P._is_analysis(p)
    state = P.analysis().run(model, x)  # the built-in analysis passes keep their graph
    assert [r.changed for r in state.records] == [True, False, False]


def test_pass_must_return_a_state_or_graph(zeroed):
    model, x = zeroed

    def forgot_return(state):
        state.gm.graph.lint()

    with pytest.raises(P.PipelineError, match="pass 'forgot_return' returned NoneType"):
        P.Pipeline([forgot_return]).run(fx.symbolic_trace(model), x)
    state = P.Pipeline([lambda s: s.gm]).run(fx.symbolic_trace(model), x)  # a GraphModule is fine
    assert state.records[0].name == "<lambda>" and not state.records[0].changed
    with pytest.raises(P.PipelineError, match="not callable"):
        P.Pipeline([P.propagate_shapes, 42])


def test_missing_prerequisite_raises_pipeline_error(zeroed):
    model, x = zeroed
    gm = fx.symbolic_trace(model)
    with pytest.raises(P.PipelineError, match="'prune' needs state.plan: run 'plan_zero_rows'"):
        P.Pipeline([P.prune]).run(gm, x)
    with pytest.raises(P.PipelineError, match="run 'propagate_shapes' before it"):
        P.Pipeline([P.find_zigs]).run(gm, x)
    with pytest.raises(P.PipelineError, match="'plan_zero_rows' needs state.zigset: run 'find_zigs'"):
        P.Pipeline([P.propagate_shapes, P.plan_zero_rows]).run(gm, x)
    with pytest.raises(P.PipelineError, match="'capture' needs state.model"):
        P.Pipeline([P.Capture()]).run(P.State(args=(x,)))


def test_insert_before_and_after():
    base = P.default(verify=False)

    def mine(state):
        return state

    after = base.insert_after("prune", mine)
    before = after.insert_before(P.find_zigs, P.GraphPass(lambda gm: gm, name="noop"))
    assert after.names[after.names.index("prune") + 1] == "mine"
    assert before.names[before.names.index("find_zigs") - 1] == "noop"
    assert "mine" not in base.names and "noop" not in after.names  # new pipelines, base untouched
    assert (base + [mine]).names[-1] == "mine"
    with pytest.raises(P.PipelineError, match="no pass 'fold_bn' in the pipeline"):
        base.insert_after("fold_bn", mine)


def test_user_pin_pass_keeps_its_layer_whole(zeroed):
    model, x = zeroed

    def pin_conv1(state):
        """A user pass: keep conv1's channels."""
        return state.replace(pin=state.pin + ("conv1",))

    plain = P.default().run(model, x).gm
    pinned = P.default().insert_before("find_zigs", pin_conv1).run(model, x)
    assert "pin_conv1" in [r.name for r in pinned.records]
    assert plain.conv1.weight.shape[0] == 4  # half of the 8 rows removed without the pin
    assert pinned.gm.conv1.weight.shape[0] == 8 and pinned.gm.conv2.weight.shape[0] == 4
    assert any(p.op == "user" for p in pinned.zigset.pinned)
    assert max_rel_diff(_ref(model, x), P.run_eval(pinned.gm, (x,))) <= RTOL


def test_bn_folding_after_compression(zeroed):
    model, x = zeroed
    fold = P.GraphPass(fuse, name="fold_bn")
    state = P.default().insert_after("eliminate_dead_code", fold).run(model, x)
    assert [r.name for r in state.records][-2:] == ["fold_bn", "verify"]
    mods = [type(m) for m in state.gm.modules()]
    assert nn.BatchNorm2d not in mods and nn.Conv2d in mods
    assert state.gm.conv1.weight.shape[0] == 4
    assert max_rel_diff(_ref(model, x), P.run_eval(state.gm, (x,))) <= RTOL
    # the same pass through OTO.compress
    small = otofx.OTO(model, x).compress(passes=[fold])
    assert nn.BatchNorm2d not in [type(m) for m in small.modules()]


def test_zero_rows_agrees_with_prune_plan(zeroed):
    model, x = zeroed
    oto = otofx.OTO(model, x)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")  # NaN is not zero (row 0 of conv1's group)
    fast = P.zero_rows(oto.zigset, model)
    slow = [torch.nonzero(n == 0).reshape(-1) for n in row_norms(oto.zigset, model)]  # float64 norms
    assert len(fast) == 2 and all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert sum(len(r) for r in fast) > 0


def test_pipeline_from_a_state_reuses_the_analysis(zeroed):
    model, x = zeroed
    analysed = P.analysis().run(model, x)
    small = P.compression(verify=True).run(analysed.replace(records=()))
    assert [r.name for r in small.records] == ["plan_zero_rows", "prune", "eliminate_dead_code", "verify"]
    assert small.reference is analysed.gm
    assert operator.lt(n_params(small.gm), n_params(model))
