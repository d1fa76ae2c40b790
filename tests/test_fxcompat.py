"""otofx.fxcompat: every fx/dynamo/inductor internal otofx reads, checked on the torch it runs with.

Supported torch releases: 2.11 (CI's oldest run, torch 2.11.0) to 2.14 (CI's main run, torch
2.14.1); ``.ci/run`` runs this suite on both. A torch outside them fails the first test: look at
``otofx/fxcompat.py`` before adding it to ``SUPPORTED_TORCH``.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

from otofx import fxcompat
from otofx.capture import capture

TESTED = ("2.11", "2.14")  # the versions CI installs (.ci/run): torch 2.11.0 and 2.14.1


def test_running_torch_is_a_supported_release():
    assert set(TESTED) <= set(fxcompat.SUPPORTED_TORCH)
    assert fxcompat.torch_release("2.14.1+cu128") == "2.14" and fxcompat.torch_release("2.11.0") == "2.11"
    assert fxcompat.torch_release() in fxcompat.SUPPORTED_TORCH, (
        f"torch {torch.__version__} is not among the releases otofx.fxcompat was checked with")


class _WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

    def forward(self, x):
        return {"y": self.lin(x) * self.scale}


def test_graph_module_like_keeps_non_persistent_buffers():
    m = _WithConstant()
    gm = fxcompat.graph_module_like(m, fx.symbolic_trace(m).graph, "G")
    assert "scale" not in gm.state_dict() and "scale" in dict(gm.named_buffers())
    plain = fx.GraphModule(m, fx.symbolic_trace(m).graph, "G")  # what the shim is for, where fx forgets
    assert "scale" in dict(plain.named_buffers())


def test_copy_graph_keeps_export_codegen_and_tracer():
    x = torch.randn(2, 4)
    cap = capture(_WithConstant(), (x,), "export")
    new = fxcompat.copy_graph(cap.gm.graph)
    assert type(new._codegen) is type(cap.gm.graph._codegen)
    gm = fxcompat.graph_module_like(cap.gm, new, "G")
    assert torch.equal(gm(x)["y"], cap.gm(x)["y"])  # the pytree output structure survives the copy
    assert issubclass(fxcompat.LazyGraphModule, fx.GraphModule)


def test_op_overload_and_dynamo_names():
    assert fxcompat.is_op_overload(torch.ops.aten.conv2d.default) and not fxcompat.is_op_overload(torch.conv2d)
    schema = fxcompat.op_schema(torch.ops.aten.conv2d.default)
    assert schema.name == "aten::conv2d" and [a.name for a in schema.arguments][:3] == ["input", "weight", "bias"]
    assert callable(fxcompat.lookup_backend("eager"))
    assert isinstance(fxcompat.inductor_mode_options("max-autotune-no-cudagraphs"), dict)
    assert fxcompat.inductor_freezing() in (None, True, False)
    assert fxcompat.register_backend(lambda gm, ex: gm.forward, "otofx") is False  # import otofx registered it
    seen = []

    def grab(gm, example):
        seen.extend(fxcompat.grapharg_source(n) for n in gm.graph.nodes if n.op == "placeholder")
        return gm.forward

    torch.compile(nn.Sequential(nn.Linear(4, 4)), backend=grab, fullgraph=True)(torch.randn(2, 4))
    assert any("_parameters['weight']" in s for s in seen), seen


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export", "dynamo"])
def test_every_front_end_gives_the_models_output_structure(frontend):
    from otofx import pipeline as P

    m, x = _WithConstant().eval(), torch.randn(2, 4)
    gm = P.Pipeline([P.Capture(frontend)]).run(m, x).gm
    out = P.run_eval(gm, (x,))
    assert isinstance(out, dict) and torch.allclose(out["y"], m(x)["y"])


def test_buffer_persistence_round_trip():
    m = torch.nn.Module()
    m.register_buffer("a", torch.zeros(2))
    m.register_buffer("b", torch.zeros(2), persistent=False)
    assert fxcompat.buffer_persistent(m, "a") and not fxcompat.buffer_persistent(m, "b")
    fxcompat.set_buffer_persistent(m, "a", False)
    fxcompat.set_buffer_persistent(m, "b", True)
    assert set(m.state_dict()) == {"b"}


def test_export_guards_are_found_and_kept_by_dead_code_elimination():
    m = nn.Linear(4, 3)
    gm = torch.export.export(m, (torch.randn(2, 4),)).module()
    guards, call = fxcompat.export_guards(gm)
    assert guards is not None and call is not None and call.target == fxcompat.EXPORT_GUARDS

    @fxcompat.mark_impure
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

    fxcompat.set_export_guards(gm, Wrapped(guards))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert isinstance(fxcompat.export_guards(gm)[0], Wrapped) and fxcompat.export_guards(gm)[1] is not None
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(torch.randn(2, 5))
