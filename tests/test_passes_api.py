"""Writing a pass with the public pass API: contracts, the typed store, and one pass for every front-end.

The BN-folding pass below is what the README's "Writing a pass" describes: it is written with
``otofx.pipeline`` (contract, keys, ``working_copy``) and ``otofx.passes.nodes``/``registry``
(``call_arguments``, ``constant``, ``op_of``, ``arg_slot``/``set_arg``) only, and never asks which
front-end made the graph.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import otofx
from otofx import pipeline as P
from otofx.passes.nodes import call_arguments, constant
from otofx.passes.registry import arg_slot, form_of, op_of, set_arg

from helpers import RTOL, max_rel_diff, randomize, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")

# a result of this pass's own: which (conv, batch norm) pairs it folded; no State field needed
FOLDED = P.Key("folded_bn", tuple, "fold_bn", "(conv node, batch norm node) names folded")


def _free_name(gm, base: str) -> str:
    name = base.replace(".", "_")
    while hasattr(gm, name):
        name += "_"
    return name


def _new_tensor(gm, like, value, base: str) -> str:
    """Register ``value`` on ``gm`` (a new top-level attribute, never a shared module) as ``like`` is."""
    name = _free_name(gm, base)
    if isinstance(like, nn.Parameter):
        gm.register_parameter(name, nn.Parameter(value, requires_grad=like.requires_grad))
    else:
        gm.register_buffer(name, value)
    return name


@P.contract(reads=(P.GRAPH,), writes=(P.GRAPH, FOLDED))
def fold_bn(state: P.State) -> P.State:
    """Fold every eval-mode batch norm into the convolution before it (its only user)."""
    gm = P.working_copy(state.gm)
    folded = []
    for bn in list(gm.graph.nodes):
        if op_of(bn, gm) != "batch_norm":
            continue
        a = call_arguments(bn, gm)
        conv = a["input"]
        if not (isinstance(conv, torch.fx.Node) and op_of(conv, gm).startswith("conv") and len(conv.users) == 1):
            continue
        module = gm.get_submodule(bn.target) if bn.op == "call_module" else None
        training = constant(gm, a["training"]) if "training" in a else module.training
        eps = a["eps"] if "eps" in a else module.eps
        c = call_arguments(conv, gm)
        w, b = constant(gm, c["weight"]), constant(gm, c.get("bias"))
        mean, var = constant(gm, a["running_mean"]), constant(gm, a["running_var"])
        gamma, beta = constant(gm, a.get("weight")), constant(gm, a.get("bias"))
        if training is not False or c.get("transposed") or any(t is None for t in (w, mean, var)):
            continue
        with torch.no_grad():
            scale = (var + eps).rsqrt() * (gamma if gamma is not None else 1)
            new_w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
            new_b = ((b if b is not None else 0) - mean) * scale + (beta if beta is not None else 0)
        if conv.op == "call_module":  # a module call: a copy of the module with the new tensors
            new = copy.deepcopy(gm.get_submodule(conv.target))
            new.weight = nn.Parameter(new_w)
            new.bias = nn.Parameter(new_b)
            conv.target = _free_name(gm, conv.target + "_folded")
            gm.add_submodule(conv.target, new)
        else:  # a function call over get_attr tensors: point it at new ones
            form = form_of(conv, gm)
            with gm.graph.inserting_before(conv):
                for arg, old, value in (("weight", w, new_w), ("bias", w if b is None else b, new_b)):
                    set_arg(conv, arg_slot(form, conv, arg),
                            gm.graph.get_attr(_new_tensor(gm, old, value, f"{conv.name}_{arg}_folded")))
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded.append((conv.name, bn.name))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return state.replace(gm=gm).put(FOLDED, tuple(folded))


class ConvBN(nn.Module):
    """conv-bn-relu twice (one conv without a bias), then a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export", "dynamo"])
def test_bn_fold_pass_runs_on_every_front_end(frontend):
    model, x = randomize(ConvBN().eval()), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    state = P.Pipeline([P.Capture(frontend), fold_bn], verify=True).run(model, x)
    assert state.frontend == frontend
    assert state.get(FOLDED) and len(state.get(FOLDED)) == 2
    assert not any(op_of(n, state.gm) == "batch_norm" for n in state.gm.graph.nodes)
    assert [r.name for r in state.records] == ["capture", "fold_bn"] and state.records[1].error <= RTOL
    assert max_rel_diff(ref, P.run_eval(state.gm, state.args, state.kwargs)) <= RTOL
    # the model and the reference graph are untouched
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert any(op_of(n, state.reference) == "batch_norm" for n in state.reference.graph.nodes)


def test_bn_fold_gives_the_same_graph_outputs_on_all_front_ends():
    model, x = randomize(ConvBN().eval()), torch.randn(2, 3, 8, 8)
    outs = [P.run_eval(P.Pipeline([P.Capture(fe), fold_bn]).run(model, x).gm, (x,))
            for fe in ("symbolic_trace", "export", "dynamo")]
    assert all(torch.equal(outs[0], o) for o in outs[1:])  # one fold, one arithmetic, whatever captured it


def test_bn_fold_after_compression_in_the_default_pipeline():
    """The pass composes with OTO's passes: after prune, on the smaller graph."""
    model, x = randomize(ConvBN().eval()), torch.randn(2, 3, 8, 8)
    zero_random_rows(model, otofx.OTO(model, x))
    state = P.default().insert_after("eliminate_dead_code", fold_bn).run(model, x)
    assert [r.name for r in state.records][-2:] == ["fold_bn", "verify"]
    assert state.gm.get_submodule(state.get(FOLDED)[0][0] + "_folded").weight.shape[0] == 4
    assert state.get(P.PLAN).count == 8


# -- contracts --------------------------------------------------------------------------------------


def test_missing_result_names_its_producer_before_anything_runs():
    ran = []

    @P.contract(reads=(P.GRAPH,))
    def spy(state):
        ran.append(1)
        return state

    gm = torch.fx.symbolic_trace(ConvBN().eval())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(P.PipelineError, match=r"'prune' needs state.plan: run 'plan_zero_rows' before it "
                                              r"\('plan_zero_rows' runs after it in this pipeline"):
        P.Pipeline([spy, P.propagate_shapes, P.find_zigs, P.prune, P.plan_zero_rows]).run(gm, x)
    with pytest.raises(P.PipelineError, match=r"'fold_report' needs state.folded_bn: run 'fold_bn' before it "
                                              r"\(no pass of this pipeline produces it\)"):
        P.Pipeline([spy, _named(P.contract(reads=(FOLDED,))(lambda s: s), "fold_report")]).run(gm, x)
    assert not ran  # checked before the first pass


def _named(fn, name):
    fn.__name__ = name
    return fn


def test_contract_violations_are_named():
    gm, x = torch.fx.symbolic_trace(ConvBN().eval()), torch.randn(1, 3, 8, 8)

    @P.contract(reads=(P.GRAPH,), writes=(FOLDED,))
    def forgets(state):
        return state

    @P.contract(reads=(P.GRAPH,))
    def sneaks(state):
        return state.put(FOLDED, ())

    with pytest.raises(P.PipelineError, match="'forgets' declares it writes state.folded_bn but did not"):
        P.Pipeline([forgets]).run(gm, x)
    with pytest.raises(P.PipelineError, match="'sneaks' wrote state.folded_bn but its contract does not declare it"):
        P.Pipeline([sneaks]).run(gm, x)
    # an uncontracted pass may write anything, and what follows it is checked when it runs
    state = P.Pipeline([lambda s: s.put(FOLDED, ("a",)), P.contract(reads=(FOLDED,))(lambda s: s)]).run(gm, x)
    assert state.get(FOLDED) == ("a",)


def test_typed_store():
    s = P.State()
    assert s.get(P.PIN) == () and s.get(P.PLAN) is None and s.has(P.PIN) and not s.has(P.PLAN)
    t = s.put(P.PIN, ("conv1",))
    assert t.pin == ("conv1",) and s.pin == ()  # a new State; the old one unchanged
    assert s.replace(pin=("fc",)).get(P.PIN) == ("fc",)  # the key's name, for code written before the store
    with pytest.raises(P.PipelineError, match="got a list"):
        s.put(P.PIN, ["conv1"])
    with pytest.raises(P.PipelineError, match="no field 'pins'"):
        s.replace(pins=())
    with pytest.raises(ValueError, match="'folded_bn' exists already"):
        P.Key("folded_bn", tuple, "another")
    with pytest.raises(AttributeError):
        s.zigset = None  # read-only


def test_each_pass_has_one_name():
    """A pass name means one pass; the algorithms a pass runs have names of their own."""
    import otofx.passes
    from otofx import backend

    seen: dict = {}
    for p in P.default().passes + backend.pipeline(report=True).passes + [P.GraphPass(lambda gm: gm, "x")]:
        what = p if isinstance(p, types.FunctionType) else type(p)  # a class's instances are one pass
        seen.setdefault(getattr(p, "name", None) or p.__name__, set()).add(what)
    assert all(len(v) == 1 for v in seen.values()), seen
    functions = {n for n, v in vars(otofx.passes).items() if callable(v) and not isinstance(v, types.ModuleType)}
    assert "zero_invariant_groups" in functions and not set(seen) & functions
