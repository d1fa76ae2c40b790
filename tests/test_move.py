"""A compressed model moves like a model: ``.to(dtype)``, ``.to(device)`` on every front-end's graph form.

For each front-end (torch.export on a tiny LlamaModel, symbolic_trace on resnet18, the dynamo
lift of ``torch.compile(backend="otofx")`` on a small RMSNorm network) the compressed graph is
cast to bfloat16 and must match the bfloat16 dense model within the dtype's tolerance
(``otofx.pipeline.fitted_rtol``), and moved to ``meta`` it must run on meta inputs: a constant
baked for the capture device (``arange(device=cpu)``, a lifted tensor, an index) fails there.
The dtype rule of ``passes/prune.py`` ("Placement") is checked both ways: a model's own
``to(torch.float32)`` upcast stays float32, a ``to(input_dtype)`` follows the weights.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import otofx
import otofx.backend as B
from helpers import n_params, randomize, zero_random_rows
from otofx.pipeline import contraction_depth, fitted_rtol, outputs_close, run_eval

pytestmark = pytest.mark.usefixtures("single_thread")

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

_aten = torch.ops.aten


def _llama():
    c = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                 use_cache=False)
    return randomize(transformers.LlamaModel(c).eval()), torch.randint(0, 100, (2, 16))


class RMSNorm(nn.Module):
    """Hugging Face's RMSNorm: a literal float32 upcast, then back to the input's dtype."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


class Net(nn.Module):
    """Factory ops on the input's device and dtype, a lifted constant, an RMSNorm, one MLP group."""

    def __init__(self, constant: bool = True):
        super().__init__()
        self.constant = constant
        self.pos = nn.Embedding(16, 8)
        self.norm = RMSNorm(8)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(x + self.pos(torch.arange(x.shape[1], device=x.device)))
        h = h + torch.zeros(x.shape[0], x.shape[1], 8, device=x.device, dtype=x.dtype)
        if self.constant:  # export lifts it; dynamo cannot fake it on the meta device
            h = h * torch.tensor([1.0, 0.5, 2.0, 1.0, 1.5, 1.0, 0.5, 2.0], device=x.device, dtype=x.dtype)
        y = self.down(torch.relu(self.up(h)))
        return y + torch.full((1,), 0.5, dtype=x.dtype, device=x.device)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def _check_moves(dense, small, args, depth):
    """``small`` in bfloat16 matches ``dense`` in bfloat16; on meta it runs on meta inputs."""
    half = lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t  # noqa: E731
    small_bf = copy.deepcopy(small).to(torch.bfloat16)
    dense_bf = copy.deepcopy(dense).to(torch.bfloat16)
    hargs = tuple(half(a) for a in args)
    want, got = _first(run_eval(dense_bf, hargs)), _first(run_eval(small_bf, hargs))
    assert got.dtype == torch.bfloat16
    ok, err = outputs_close(want, got, dtype=torch.bfloat16, depth=depth)
    assert ok, f"bfloat16 compressed vs dense: relative error {err:.3g} > {fitted_rtol(1e-4, torch.bfloat16, depth):.3g}"
    on_meta = small_bf.to("meta")
    out = _first(run_eval(on_meta, tuple(a.to("meta") for a in hargs)))
    assert out.device.type == "meta" and out.shape == want.shape


def _casts(gm, dtype):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.to.dtype and n.args[1] == dtype]


def test_export_llama_graph_follows_dtype_and_device():
    model, ids = _llama()
    oto = otofx.OTO(model, ids, frontend="export")
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph")
    assert isinstance(small, torch.fx.GraphModule) and n_params(small) < n_params(model)
    nodes = list(small.graph.nodes)
    assert not [n for n in nodes if n.target is _aten._assert_tensor_metadata.default]
    assert not [n for n in nodes if any(isinstance(a, torch.device) for a in (*n.args, *n.kwargs.values()))]
    # RMSNorm's upcasts (3: two per layer and the final norm) stay literal; their down-casts follow
    assert len(_casts(small, torch.float32)) == 3 + 1  # + rotary's position_ids.float()
    assert len([n for n in nodes if n.target is _aten.to.dtype and isinstance(n.args[1], torch.fx.Node)]) == 3 + 2
    _check_moves(model, small, (ids,), contraction_depth(small))


def test_bfloat16_export_capture_follows_back_to_float32():
    """A graph captured in bfloat16, cast to float32, computes what the float32 dense model does on
    the same (bfloat16-valued) weights: to 1e-4, since every restated bfloat16 follows the weights."""
    model, ids = _llama()
    model = model.to(torch.bfloat16)
    oto = otofx.OTO(model, ids, frontend="export")
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph")  # compress() of a bfloat16 model, verified in bfloat16
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())
    want = run_eval(copy.deepcopy(model).float(), (ids,))[0]
    got = run_eval(copy.deepcopy(small).float(), (ids,))[0]
    assert got.dtype == torch.float32
    ok, err = outputs_close(want, got)
    assert ok, err


def test_symbolic_trace_resnet18_graph_moves():
    model = randomize(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    assert oto.frontend == "symbolic_trace"
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph")
    _check_moves(model, small, (x,), contraction_depth(small))


def test_export_graph_constants_and_factories_move():
    """Net through torch.export: arange/zeros/full on the capture device and a lifted constant."""
    model, x = randomize(Net().eval()), torch.randn(2, 5, 8)
    oto = otofx.OTO(model, x, frontend="export")
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph")
    assert n_params(small) < n_params(model)
    assert [n for n, _ in small.named_buffers()] == ["lifted_tensor_0"]  # moves with .to()
    assert set(small.state_dict()) == set(model.state_dict())
    _check_moves(model, small, (x,), 2)


class _Recorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    B.clear_results()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
def test_dynamo_lift_graph_moves():
    model, x = randomize(Net().eval()), torch.randn(2, 5, 8)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    rec = _Recorder()
    with torch.no_grad():
        torch.compile(model, backend="otofx", options={"inner": rec})(x)
    assert B.results()[-1].pruned, B.results()[-1].reason
    small = rec.graphs[-1]
    casts = [n for n in small.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert [isinstance(n.args[1], torch.dtype) for n in casts] == [True, False]  # upcast kept, down-cast follows
    _check_moves(model, small, (x,), 2)


@pytest.mark.usefixtures("_fresh_dynamo")
def test_backend_follows_a_cast_model():
    """The compiled model cast to bfloat16 is pruned again in bfloat16 and matches the dense model;
    on the meta device it runs dense (no values to read zero rows from)."""
    model, x = randomize(Net(constant=False).eval()), torch.randn(2, 5, 8)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    compiled = torch.compile(model, backend="otofx", options={"inner": "eager"})
    with torch.no_grad():
        compiled(x)
        model.to(torch.bfloat16)
        got = compiled(x.bfloat16())
        want = model(x.bfloat16())
    assert got.dtype == torch.bfloat16 and outputs_close(want, got, depth=2)[0]
    assert B.results()[-1].pruned and B.results()[-1].rows_removed == 16
    model.to("meta")
    with torch.no_grad():
        assert compiled(x.to("meta", torch.bfloat16)).device.type == "meta"
    assert "meta device" in B.results()[-1].reason


def test_loaded_module_form_on_meta_and_in_bfloat16(tmp_path):
    """otofx.load(device=, dtype=) places the module form; on meta it runs on meta inputs."""
    model = randomize(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    otofx.save(small, tmp_path / "small")
    fresh = torchvision.models.resnet18(num_classes=10)
    on_meta = otofx.load(tmp_path / "small", fresh, device="meta", dtype=torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in on_meta.parameters())
    assert run_eval(on_meta, (x.to("meta", torch.bfloat16),)).shape == (2, 10)
