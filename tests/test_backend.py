"""``torch.compile(model, backend="otofx")``: zero rows removed per captured graph, outputs unchanged.

Most tests use a recording inner compiler (it keeps the GraphModule otofx hands on and runs it
eagerly), so they can count what was removed without paying for inductor; inductor itself runs
on resnet18, with and without ``torch._inductor.config.freezing``.
"""
from __future__ import annotations

import logging
import re
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
import torchvision
from torch import nn

import otofx
import otofx.backend as B
from otofx import pipeline as P

from helpers import max_rel_diff, n_params, randomize, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")

# inductor's own comparisons use rtol=atol=1e-4 (torch._dynamo.testing); the same, relative to max|y|
TOL = 1e-4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    B.clear_results()
    yield
    torch._dynamo.reset()


class Recorder:
    """An inner compiler that keeps every graph it gets and runs it as it is."""

    def __init__(self):
        self.graphs, self.inputs = [], []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        self.inputs.append(list(example_inputs))
        return gm.forward


def _vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64)


MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (1, 3, 64, 64)),
    "vit": (_vit, (1, 3, 32, 32)),
}


def zeroed(name: str):
    """The model in eval mode, randomised norms, half of every group's rows zeroed; input; rows zeroed."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize(build().eval())
    x = torch.randn(shape)
    oto = otofx.OTO(model, x)
    rows = zero_random_rows(model, oto)
    return model, x, oto, sum(len(r) for r in rows)


def run(compiled, x):
    with torch.no_grad():
        return compiled(x)


# ---------------------------------------------------------------------------------------------


def test_backend_is_registered():
    assert "otofx" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("otofx") is B.otofx_backend
    eps = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert eps.get("otofx") == "otofx.backend:otofx_backend"


# resnet18 under freezing: test_inductor_resnet18
@pytest.mark.parametrize("name, freezing", [("resnet18", False), ("mobilenet_v3_small", False),
                                            ("mobilenet_v3_small", True), ("vit", False), ("vit", True)])
def test_rows_removed_and_outputs_equal(name, freezing):
    model, x, oto, zeroed_rows = zeroed(name)
    ref = run(model, x)
    rec = Recorder()
    with inductor_config.patch(freezing=freezing):
        y = run(torch.compile(model, backend="otofx", options={"inner": rec}), x)
    assert max_rel_diff(ref, y) <= TOL
    (res,) = B.results()
    assert res.pruned and res.rows_removed == zeroed_rows and res.error <= TOL
    # parameters arrive as placeholders, or (freezing) as get_attr: both are handled
    used = [n for n, _ in model.named_buffers() if not n.endswith("num_batches_tracked")]  # eval: unread
    state = len(list(model.parameters())) + len(used)
    assert (res.lifted, res.attrs) == ((0, state) if freezing else (state, 0))
    # the graph handed on is the compressed model: as small as oto.compress()'s, and it is what ran
    (gm,) = rec.graphs
    assert n_params(gm) == res.params_after == n_params(oto.compress()) < n_params(model)
    assert max_rel_diff(ref, run(gm, x)[0]) <= TOL


@pytest.mark.parametrize("freezing", [False, True], ids=["inputs", "freezing"])
def test_inductor_resnet18(freezing):
    model, x, _, zeroed_rows = zeroed("resnet18")
    ref = run(model, x)
    with inductor_config.patch(freezing=freezing):
        compiled = torch.compile(model, backend="otofx")
        y = run(compiled, x)
        y2 = run(compiled, x)
    assert max_rel_diff(ref, y) <= TOL and max_rel_diff(ref, y2) <= TOL
    (res,) = B.results()
    assert res.pruned and res.rows_removed == zeroed_rows
    assert res.params_after < n_params(model) / 2
    assert (res.lifted == 0 and res.attrs > 0) if freezing else (res.lifted > 0 and res.attrs == 0)


class Shuffle(nn.Module):
    """ShuffleNet's unit in small: a chunk, a channel shuffle whose view reads the batch size, and
    batch norms (dynamo hands their momentum and eps in as tensors read by ``.item()`` under
    ``dynamic=True``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat((a, self.branch(b)), 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x.mean((2, 3)))


def _gpt2():
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100, n_positions=64)
    return transformers.GPT2Model(config), lambda n, c, h, w: torch.randint(0, 100, (n, h + w))


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
@pytest.mark.parametrize("name", ["shuffle", "gpt2"])
def test_dynamic_shapes_stay_pruned(name, dynamic):
    # a graph with symbolic sizes (SymInt inputs) is analysed at the sizes they stand for and is
    # handed on symbolic: one graph serves every batch and image (or sequence) size under dynamic=True.
    # GPT-2's Conv1D reshapes to torch.Size([s0, s1, 4 * width]), a node of its own in such a graph
    torch.manual_seed(0)
    model, make = (Shuffle(), torch.randn) if name == "shuffle" else _gpt2()
    model = randomize(model.eval())
    oto = otofx.OTO(model, make(2, 3, 8, 6))
    zeroed = zero_random_rows(model, oto)
    rows = sum(len(r) for r in zeroed)
    assert rows > 0
    rec = Recorder()
    compiled = torch.compile(model, backend="otofx", options={"inner": rec}, dynamic=dynamic)
    for shape in ((2, 3, 8, 6), (5, 3, 8, 6), (3, 3, 12, 10)):  # not square: no duck-sized h == w guard
        x = make(*shape)
        ref, got = run(model, x), run(compiled, x)
        if name == "gpt2":
            ref, got = ref.last_hidden_state, got.last_hidden_state
        assert max_rel_diff(ref, got) <= TOL
    results = B.results()
    assert len(results) == len(rec.graphs)
    assert len(results) == 1 if dynamic else len(results) >= 2  # automatic: static, then dynamic
    assert all(r.pruned for r in results), [r.reason for r in results]
    assert any(isinstance(e, torch.SymInt) for e in rec.inputs[-1])
    if name == "shuffle":
        assert all(r.rows_removed == rows for r in results)
        assert n_params(rec.graphs[-1]) == n_params(oto.compress()) < n_params(model)
    else:  # the MLP widths (dynamo's graph gives the heads no groups)
        mlp = sum(len(r) for r, z in zip(zeroed, oto.groups) if z.rows == 128)
        assert all(r.rows_removed == mlp > 0 for r in results)
        assert n_params(rec.graphs[-1]) < n_params(model)


def test_dynamic_shapes_restore_attention():
    # under dynamic=True dynamo passes floats as graph inputs: nn.MultiheadAttention's dropout_p is a
    # node, and the attention module is still restored (it crashed the backend)
    model, x, oto, zeroed_rows = zeroed("vit")
    rec = Recorder()
    compiled = torch.compile(model, backend="otofx", options={"inner": rec}, dynamic=True)
    for n in (2, 3):
        xs = torch.randn(n, *x.shape[1:])
        assert max_rel_diff(run(model, xs), run(compiled, xs)) <= TOL
    (res,) = B.results()
    assert res.pruned and res.rows_removed == zeroed_rows
    assert n_params(rec.graphs[0]) == n_params(oto.compress())


class Broken(nn.Module):
    """Two fragments: a graph break between two conv blocks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                               nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 16, 1),
                               nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(y).mean((2, 3))


def small_zeroed(module=Broken, shape=(2, 3, 16, 16)):
    torch.manual_seed(0)
    model = randomize(module().eval())
    x = torch.randn(shape)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto)
    return model, x, oto


def test_graph_break_pins_the_boundary():
    model, x, oto = small_zeroed()
    assert [z.rows for z in oto.groups] == [16, 16, 32, 16]  # whole model: the boundary is a group too
    rec = Recorder()
    compiled = torch.compile(model, backend="otofx", options={"inner": rec})
    assert max_rel_diff(run(model, x), run(compiled, x)) <= TOL
    first, second = B.results()
    assert first.pruned and second.pruned
    # the channels crossing the break (a's output) are a graph output / input: kept whole
    assert first.rows_removed == 8 and second.rows_removed == 16 + 8
    a_graph, b_graph = rec.graphs
    shapes = {n: p.shape for n, p in a_graph.named_parameters()}
    assert shapes["a.0.weight"][0] == 8 and shapes["a.3.weight"][0] == 16
    assert dict(b_graph.named_parameters())["b.0.weight"].shape[:2] == (16, 16)


def test_weight_change_after_compile_is_not_stale():
    model, x, oto = small_zeroed()
    compiled = torch.compile(model, backend="otofx", options={"inner": "eager"})
    assert max_rel_diff(run(model, x), run(compiled, x)) <= TOL
    run(compiled, x)
    assert len(B.results()) == 2  # no rebuild without a change
    frag, removed = B.results()[1].fragment, B.results()[1].rows_removed
    with torch.no_grad():  # the zero rows of b.0 come back (an optimizer step would do the same)
        model.b[0].weight.add_(0.5)
        model.b[1].running_mean.mul_(2.0)
    ref = run(model, x)
    assert max_rel_diff(ref, run(compiled, x)) <= TOL
    rebuilt = B.results()[-1]
    assert rebuilt.fragment == frag and rebuilt.rows_removed < removed
    # a new Parameter object under the same name is noticed too
    with torch.no_grad():
        model.b[3].weight = nn.Parameter(model.b[3].weight * 3.0)
    assert max_rel_diff(run(model, x), run(compiled, x)) <= TOL


def test_weight_change_with_on_change_dense():
    model, x, _ = small_zeroed()
    compiled = torch.compile(model, backend="otofx", options={"inner": "eager", "on_change": "dense"})
    run(compiled, x)
    with torch.no_grad():
        model.a[0].weight.mul_(-1.0)
        model.a[0].weight[0] = 1.0  # a zeroed row is no longer zero
    assert max_rel_diff(run(model, x), run(compiled, x)) <= TOL
    assert B.results()[-1].reason == "weights changed (on_change='dense')"


def test_training_graphs_are_not_pruned():
    model, x, _ = small_zeroed()
    compiled = torch.compile(model, backend="otofx", options={"inner": "eager"})
    y = compiled(x)  # autograd on: parameters stay inputs, gradients flow
    assert y.requires_grad and max_rel_diff(model(x), y) <= TOL
    assert not B.results()[0].pruned and "autograd is on" in B.results()[0].reason
    torch._dynamo.reset()
    model.train()
    run(compiled, x)
    assert not B.results()[-1].pruned and "training mode" in B.results()[-1].reason


def test_user_pass_pins_a_layer_by_name():
    model, x, _ = small_zeroed()

    def pin_b0(state):
        """The user pass: keep b.0's channels (in the fragment that has b.0)."""
        if "b.0.weight" not in dict(state.gm.named_parameters()):
            return state
        return state.replace(pin=state.pin + ("b.0",))

    rec = Recorder()
    passes = B.pipeline().insert_before("find_zigs", pin_b0)
    compiled = torch.compile(model, backend="otofx", options={"inner": rec, "pipeline": passes})
    assert max_rel_diff(run(model, x), run(compiled, x)) <= TOL
    first, second = B.results()
    assert "pin_b0" in [r.name for r in second.records]
    assert first.pruned and first.rows_removed == 8
    # b.0's 32 channels, half of them zero, are all still there; b.3's group is pruned
    assert second.pruned and second.rows_removed == 8
    shapes = {n: p.shape for n, p in rec.graphs[1].named_parameters()}
    assert shapes["b.0.weight"][0] == 32 and shapes["b.3.weight"][:2] == (8, 32)
    # the same through options={"pin": ...}
    torch._dynamo.reset()
    rec = Recorder()
    run(torch.compile(model, backend="otofx", options={"inner": rec, "pin": "b.0"}), x)
    assert dict(rec.graphs[1].named_parameters())["b.0.weight"].shape[0] == 32


def test_report_option_logs_the_group_table(caplog):
    model, x, _ = small_zeroed()
    with caplog.at_level(logging.INFO, logger="otofx"):
        run(torch.compile(model, backend="otofx", options={"inner": "eager", "report": True}), x)
    text = caplog.text
    assert "OTOFragment: 2 groups, 48 prunable rows (front-end: dynamo)" in text
    assert "model output" in text and re.search(r"fragment \d+: removed 24 rows of 2 groups", text)


def test_bad_options_are_named():
    model, x, _ = small_zeroed()
    with pytest.raises(Exception, match="unknown option.*'innner'"):
        run(torch.compile(model, backend="otofx", options={"innner": "eager"}), x)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="on_change"):
        run(torch.compile(model, backend="otofx", options={"on_change": "never"}), x)


def test_lift_keeps_model_names():
    model, x, _ = small_zeroed()
    seen = {}

    def keep(gm, example_inputs):
        seen.setdefault("lifted", B.lift(gm, example_inputs))
        return gm.forward

    run(torch.compile(model.a, backend=keep), x)
    lifted = seen["lifted"]
    names = {n for n, _ in lifted.gm.named_parameters()} | {n for n, _ in lifted.gm.named_buffers()}
    assert names == {n for n in model.a.state_dict() if not n.endswith("num_batches_tracked")}
    assert all(lifted.gm.get_parameter(n) is p for n, p in model.a.named_parameters())  # not copies
    assert [n.op for n in lifted.gm.graph.nodes].count("placeholder") == len(lifted.inputs) == 1
    assert P.outputs_close(P.run_eval(model.a, (x,)), P.run_eval(lifted.gm, (x,)))[0]
