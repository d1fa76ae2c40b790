"""Front-ends and bad input: export fallback, clear errors, nothing half-done."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import assert_exact, randomize, snapshot, zero_random_rows


class ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic_trace cannot take it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        y = self.bn(self.conv1(x))
        if y.shape[0] > 1:
            y = y * 2
        return self.conv2(F.relu(y))


class LeavesTorch(ShapeBranch):
    """Computes through numpy: no front-end can follow it (a branch on values is captured along the
    example's branch: test_a_branch_on_data_is_captured_and_guarded)."""

    def forward(self, x):
        y = self.conv1(x)
        y = torch.from_numpy(y.detach().numpy() * 2)
        return self.conv2(y)


def test_export_fallback_is_exact():
    torch.manual_seed(0)
    m = ShapeBranch().eval()
    randomize(m)
    x = torch.randn(2, 3, 8, 8)
    oto = otofx.OTO(m, x)
    assert oto.frontend == "export"
    assert [z.rows for z in oto.groups] == [8]
    zero_random_rows(oto.model, oto, seed=0, fraction=0.5)
    assert_exact(m, oto, x)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_frontends_agree(frontend):
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.shufflenet_v2_x0_5().eval()
    randomize(m)
    x = torch.randn(1, 3, 64, 64)
    oto = otofx.OTO(m, x, frontend=frontend)
    assert oto.frontend == frontend
    ref = otofx.OTO(m, x)
    assert [z.rows for z in oto.groups] == [z.rows for z in ref.groups]
    zero_random_rows(oto.model, oto, seed=3, fraction=0.5)
    assert_exact(m, oto, x)


def test_dynamo_frontend_captures_a_language_model_without_its_kv_cache():
    # the cache's keys and values are outputs of a graph captured with it: they pinned every head
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, num_hidden_layers=1, vocab_size=100)
    torch.manual_seed(0)
    m = randomize(transformers.LlamaModel(config).eval())
    ids = torch.randint(0, 100, (2, 8))
    oto = otofx.OTO(m, ids, frontend="dynamo")
    assert [z.rows for z in oto.groups] == [z.rows for z in otofx.OTO(m, ids).groups] == [2, 64]
    assert m.config.use_cache is True  # restored
    zero_random_rows(oto.model, oto, seed=0)
    assert_exact(m, oto, ids, ref_kwargs={"use_cache": False})


def test_untraceable_model_names_both_failures():
    m = LeavesTorch()
    before = snapshot(m)
    with pytest.raises(otofx.CaptureError) as e:
        otofx.OTO(m, torch.randn(2, 3, 8, 8))
    msg = str(e.value)
    assert "symbolic_trace" in msg and "torch.export" in msg and "LeavesTorch" in msg
    assert snapshot(m) == before


class _MaskUnderExport(nn.Module):
    """transformers' pattern: a default mask built only outside of torch.export, then indexed."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x, attention_mask=None):
        if x.shape[0] > 8:  # symbolic_trace cannot take a branch on a size
            x = x * 2
        if attention_mask is None and not torch.compiler.is_compiling():
            attention_mask = torch.ones(x.shape[:2])
        return self.out(torch.relu(self.fc(x)) * attention_mask[:, :, None])


def test_a_mask_left_none_under_export_is_named():
    """A forward that fails under export on a mask argument the example left None: the error says to
    pass it (SwitchTransformers, LongT5); with the mask the model is captured."""
    x = torch.randn(2, 3, 4)
    for frontend in ("auto", "export"):
        with pytest.raises(otofx.CaptureError, match=r"attention_mask left None.*pass them in the example inputs"):
            otofx.OTO(_MaskUnderExport(), {"x": x}, frontend=frontend)
    oto = otofx.OTO(_MaskUnderExport(), {"x": x, "attention_mask": torch.ones(2, 3)})
    assert oto.frontend == "export" and [z.rows for z in oto.groups] == [4]


def test_wrong_input_shape_names_the_node():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(otofx.OTOError, match=r"node '_0', module '0' \(Conv2d\).*3 channels.*example inputs"):
        otofx.OTO(m, torch.randn(2, 5, 8, 8))
    with pytest.raises(otofx.OTOError, match=r"node '_0'.*dtype"):
        otofx.OTO(m, torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_bad_example_inputs_type():
    with pytest.raises(otofx.InputError, match="example_inputs"):
        otofx.OTO(ShapeBranch(), [[1, 2]] and "not a tensor")


def test_meta_model_is_analysed_not_compressed():
    """Analysis needs shapes only (tests/test_meta.py); compress() refuses meta weights."""
    with torch.device("meta"):
        m = ShapeBranch()
    oto = otofx.OTO(m, torch.randn(2, 3, 8, 8))
    with pytest.raises(otofx.InputError, match="meta"):
        oto.compress()


def test_integer_parameters_are_refused():
    m = ShapeBranch()
    m.conv1.weight = nn.Parameter(torch.zeros(8, 3, 3, 3, dtype=torch.long), requires_grad=False)
    with pytest.raises(otofx.InputError, match="conv1.weight"):
        otofx.OTO(m, torch.randn(2, 3, 8, 8))


def test_pin_by_name():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 3, 9, 9)
    assert len(otofx.OTO(m, x).groups) == 2
    oto = otofx.OTO(m, x, pin=["0"])
    assert len(oto.groups) == 1 and oto.groups[0].layers[0] == "2"
    assert any(p.reason == "pinned by the user" for p in oto.pinned)
    with pytest.raises(otofx.InputError, match="nope"):
        otofx.OTO(m, x, pin=["nope"])


def test_keyword_inputs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x, scale=None):
            return self.b(torch.relu(self.a(x))) * scale

    m = KW()
    x = {"x": torch.randn(2, 4), "scale": torch.randn(2, 3)}
    oto = otofx.OTO(m, x)
    assert [z.rows for z in oto.groups] == [6]
    zero_random_rows(oto.model, oto, seed=0, fraction=0.5)
    small = oto.compress()
    torch.testing.assert_close(small(**x), m(**x))


class _Conditioned(nn.Module):
    """Takes a dict of optional conditions (diffusers' PixArt: ``added_cond_kwargs={"resolution": None, ...}``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, cond=None):
        h = self.a(x)
        if cond["scale"] is not None:
            h = h * cond["scale"]
        if cond["shift"] is not None:
            h = h + cond["shift"]
        return self.b(torch.relu(h))


@pytest.mark.parametrize("frontend", ["auto", "export"])
def test_a_nested_input_with_none_leaves(frontend):
    """An export capture takes one placeholder per leaf of a nested input, None leaves included: the
    shapes are propagated with the inputs flattened by the graph's own input spec. symbolic_trace's graph
    (a proxy for the dict: ``cond["shift"] is not None`` holds) does not run the example: "auto" exports."""
    torch.manual_seed(0)
    m = randomize(_Conditioned().eval())
    x = {"x": torch.randn(2, 4), "cond": {"scale": torch.rand(2, 1) + 0.5, "shift": None}}
    oto = otofx.OTO(m, x, frontend=frontend)
    assert [z.rows for z in oto.groups] == [6]
    zero_random_rows(m, oto, seed=0, fraction=0.5)
    for form in ("graph", "module"):
        small = oto.compress(form=form)
        with torch.no_grad():
            torch.testing.assert_close(small(**x), m(**x))


def test_tensor_constants_do_not_land_on_the_model():
    """fx stores a tensor made in forward without traced inputs (maxvit's relative position
    index) as ``_tensor_constantN`` on the traced module; capture must leave the user's model as it
    was (attributes included)."""

    class Indexed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            order = torch.tensor([3, 1, 2, 0]) + 4  # a constant to the tracer
            return self.fc(self.conv(x).mean((2, 3))[:, order])

    model, x = randomize(Indexed().eval()), torch.randn(2, 3, 5, 5)
    attrs = set(vars(model))
    oto = otofx.OTO(model, x)
    assert set(vars(model)) == attrs
    assert any(n.op == "get_attr" and n.target.startswith("_tensor_constant") for n in oto.graph_module.graph.nodes)
    small = oto.compress()
    assert set(vars(model)) == attrs
    torch.testing.assert_close(small(x), model(x))
    otofx.OTO(model, x)  # a second capture finds the same names free
    assert set(vars(model)) == attrs


class _Attrs(nn.Module):
    """Targets of every kind: nested leaves, a module called under two names, a nested parameter
    and buffer read as attributes, a non-persistent buffer, a plain tensor attribute, and a
    tensor constant made in forward."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Module()
        self.block.scale = nn.Parameter(torch.rand(1, 8, 1, 1))
        self.block.register_buffer("shift", torch.rand(1, 8, 1, 1), persistent=False)
        self.block.register_buffer("bias", torch.rand(8))
        self.block.plain = torch.rand(8)
        self.alias = self.body[2]
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.alias(self.body(x) * self.block.scale + self.block.shift)
        y = y.mean((2, 3)) + self.block.bias + self.block.plain + torch.arange(8.0)
        return self.head(y)


@pytest.mark.parametrize("name", ["attrs", "resnet18", "mobilenet_v3_small", "densenet121"])
def test_graph_module_matches_fx(name):
    """capture.graph_module builds the module hierarchy fx's GraphModule(root, graph) builds."""
    import torchvision
    from torch.fx._lazy_graph_module import _LazyGraphModule

    from otofx.capture import LeafTracer, graph_module

    model = _Attrs() if name == "attrs" else getattr(torchvision.models, name)()
    tracer = LeafTracer()
    graph = tracer.trace(model)
    ours = graph_module(model, graph, "M")
    ref = _LazyGraphModule(model, graph, "M")
    kinds = lambda gm: [(n, type(m) if n else None) for n, m in gm.named_modules()]  # noqa: E731 (a class per GraphModule)
    assert kinds(ours) == kinds(ref)
    for get in ("named_parameters", "named_buffers"):
        a, b = list(getattr(ours, get)()), list(getattr(ref, get)())
        assert [n for n, _ in a] == [n for n, _ in b] and all(x is y for (_, x), (_, y) in zip(a, b)), get
    leaves = {n for n, m in ref.named_modules() if not isinstance(m, torch.fx.GraphModule) and type(m) is not nn.Module}
    assert all(ours.get_submodule(n) is model.get_submodule(n) for n in leaves)  # shared, as fx shares them
    # persistence of buffers included; fx keeps it from torch 2.12 on, so a non-persistent buffer is
    # dropped from the reference's keys here rather than trusted to be absent
    transient = {f"{p}.{b}" if p else b for p, m in model.named_modules() for b in m._non_persistent_buffers_set}
    assert transient.isdisjoint(ours.state_dict())
    assert list(ours.state_dict()) == [k for k in ref.state_dict() if k not in transient]
    for n, m in ours.named_modules():
        other = ref.get_submodule(n)
        assert m.training == other.training
        assert {k: v for k, v in vars(m).items() if not k.startswith("_")}.keys() == \
            {k: v for k, v in vars(other).items() if not k.startswith("_")}.keys()
    assert ours.code == ref.code
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), model.eval()(x))
    for k in [k for k in vars(model) if k.startswith("_tensor_constant")]:
        delattr(model, k)


class _BranchesOnData(nn.Module):
    """Takes one of two paths by a value of its input (``if x.mean() > 0``: Longformer's global
    attention, FSMT's padding mask): torch.export alone cannot capture it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.mean() > 0:
            h = torch.relu(self.a(x))
        else:
            h = torch.tanh(self.b(x))
        return self.head(h)


@pytest.mark.parametrize("sign", [1, -1])
def test_a_branch_on_data_is_captured_and_guarded(caplog, sign):
    """The capture follows the example's branch (torch.export.draft_export) and says so; only that
    branch is analysed (a's rows are a group, b is never read, and head's columns follow a). So
    compress() gives the graph, which raises an otofx ShapeError on an input that takes the other
    branch; form='module' gives the own class, exact on the example's branch, with a warning."""
    import logging

    torch.manual_seed(0)
    m = _BranchesOnData().eval()
    x = sign * (torch.randn(5, 4).abs() + 0.1)  # sign 1: mean > 0, the first branch (a); -1: b
    taken, other = ("a", "b") if sign > 0 else ("b", "a")
    with caplog.at_level(logging.WARNING, logger="otofx"):
        oto = otofx.OTO(m, x, frontend="export")
    assert "branches on tensor values" in caplog.text
    z = [g for g in oto.groups if any(n == f"{taken}.weight" for n, _, _ in g.params)]
    assert len(z) == 1 and z[0].rows == 8
    assert not any(n.startswith(f"{other}.") for g in oto.groups for n, _, _ in g.params)
    with torch.no_grad():
        getattr(m, taken).weight[:4] = 0
        getattr(m, taken).bias[:4] = 0
        m.head.weight[:, :4] = 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert isinstance(small, torch.fx.GraphModule) and "returns the graph" in caplog.text
    assert small.get_parameter(f"{taken}.weight").shape == (4, 4)
    x2 = sign * (torch.randn(3, 4).abs() + 0.5)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), m(x2), rtol=1e-5, atol=1e-6)
        with pytest.raises(otofx.errors.ShapeError, match="another branch"):
            small(-x2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="otofx"):
            own = oto.compress(form="module")
        assert type(own) is _BranchesOnData and "other branches were not analysed" in caplog.text
        torch.testing.assert_close(own(x2), m(x2), rtol=1e-5, atol=1e-6)


class _TokensThenBranch(nn.Module):
    """Token ids, a branch on values (``if h.abs().mean() < 0``: no input takes it, so the graph's branch
    guard passes on any other input, whether draft_export read the value or guessed it: torch 2.11's draft
    guessed 0 for it in one CI run), and with ``loop`` a Python loop over the tokens before it (Qwen4-Exp's
    indexer loops over every query): the loop fixes the sequence length."""

    def __init__(self, loop: bool):
        super().__init__()
        self.loop = loop
        self.emb, self.a, self.b, self.head = nn.Embedding(16, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids)
        if self.loop:
            h = torch.stack([h[:, t] * (t + 1) for t in range(ids.shape[1])], 1)
        if h.abs().mean() < 0:
            h = torch.tanh(self.b(h))
        else:
            h = torch.relu(self.a(h))
        return self.head(h)


# NB: draft_export's words on Qwen4-Exp with a dynamic sequence: the size names the sequence's symbol
_SEQUENCE_REFUSAL = "Pending unbacked symbols {u0} not in returned outputs FakeTensor(..., size=(32*s72,), dtype=torch.int64)"


def _record_exports(monkeypatch, refuse_sequence_drafts=False, refusal=_SEQUENCE_REFUSAL) -> list:
    """Record ``("export" | "draft", dynamic dims per input)`` of every torch.export call; with
    ``refuse_sequence_drafts``, a draft with a dynamic sequence raises ``refusal``."""
    calls = []
    export, draft = torch.export.export, torch.export.draft_export

    def dims_of(shapes):
        return {k: sorted(v) for k, v in (shapes or {}).items()} if isinstance(shapes, dict) else shapes

    def rec_export(*a, dynamic_shapes=None, **k):
        calls.append(("export", dims_of(dynamic_shapes)))
        return export(*a, dynamic_shapes=dynamic_shapes, **k)

    def rec_draft(*a, dynamic_shapes=None, **k):
        calls.append(("draft", dims_of(dynamic_shapes)))
        if refuse_sequence_drafts and any(1 in v for v in (dynamic_shapes or {}).values()):
            raise RuntimeError(refusal)  # NB: PendingUnbackedSymbolNotFound
        return draft(*a, dynamic_shapes=dynamic_shapes, **k)

    monkeypatch.setattr(torch.export, "export", rec_export)
    monkeypatch.setattr(torch.export, "draft_export", rec_draft)
    return calls


def test_a_branch_on_data_after_a_loop_over_tokens_skips_the_doomed_attempts(monkeypatch, caplog):
    """The first export (batch and sequence dynamic) fails on the branch, having fixed the sequence
    length for the loop: its draft could not keep the sequence dynamic, so the capture drafts with a
    dynamic batch at once (one export, one draft; before, a draft with the sequence asked dynamic). The
    graph keeps the dynamic batch and the branch guard, and is exact."""
    import logging

    from otofx import capture

    torch.manual_seed(0)
    m = _TokensThenBranch(loop=True).eval()
    ids = torch.randint(0, 16, (2, 5))
    calls = _record_exports(monkeypatch)
    with caplog.at_level(logging.INFO, logger="otofx"):
        cap = capture.capture(m, ids, frontend="export")
    assert calls == [("export", {"ids": [0, 1]}), ("draft", {"ids": [0]})]
    assert "had fixed the sequence sizes" in caplog.text and "a dynamic batch only" in caplog.text
    assert cap.gm.meta[capture.DATA_BRANCHES]
    (more_args, _), = cap.more_inputs
    assert more_args[0].shape == (3, 5)  # a second batch size
    with torch.no_grad():
        for x in (ids, more_args[0]):
            torch.testing.assert_close(cap.gm(x), m(x), rtol=0, atol=0)


def test_a_branch_on_data_does_not_retry_the_plain_export(monkeypatch):
    """After a failure on a branch on data, the attempts with fewer dynamic dimensions go to
    draft_export directly: the plain export would fail on the same branch again. Here the draft with a
    dynamic sequence fails (as on Qwen4-Exp), the one with a dynamic batch succeeds."""
    from otofx import capture

    torch.manual_seed(0)
    m = _TokensThenBranch(loop=False).eval()
    ids = torch.randint(0, 16, (2, 5))
    calls = _record_exports(monkeypatch, refuse_sequence_drafts=True)
    cap = capture.capture(m, ids, frontend="export")
    assert calls == [("export", {"ids": [0, 1]}), ("draft", {"ids": [0, 1]}), ("draft", {"ids": [0]})]
    assert cap.gm.meta[capture.DATA_BRANCHES]
    with torch.no_grad():
        torch.testing.assert_close(cap.gm(ids), m(ids), rtol=0, atol=0)


def test_a_draft_failing_on_data_sizes_alone_is_not_retried_with_fewer_dynamic_sizes(monkeypatch):
    """The export failed on a branch on data and its draft raised naming data-dependent sizes only
    (torchvision's detectors: ``Pending unbacked symbols {u1} ... size=(Min(1000, u0),)``): drafts with
    fewer dynamic input sizes would fail the same way (a minute on a detector), so none is tried and the
    capture fails at once; a refusal naming an input size (``s72``) is retried (the test above). Here the
    refusal is staged for the dynamic sequence alone, so the old code went on to a draft with a dynamic
    batch."""
    from otofx import capture

    m = _TokensThenBranch(loop=False).eval()
    ids = torch.randint(0, 16, (2, 5))
    calls = _record_exports(monkeypatch, refuse_sequence_drafts=True,
                            refusal="Pending unbacked symbols {u1} not in returned outputs FakeTensor(..., "
                                    "size=(Min(1000, u0),), dtype=torch.int64)")
    with pytest.raises(otofx.CaptureError, match="data-dependent"):
        capture.capture(m, ids, frontend="export")
    # NB: once in training mode, once in eval mode (a branch on data may be the training mode's alone)
    assert calls == [("export", {"ids": [0, 1]}), ("draft", {"ids": [0, 1]})] * 2


class OptionalInputs(torch.nn.Module):
    """``if extra is not None:``: a proxy is never None, so symbolic_trace took the branch the example
    leaves out and the analysis failed on the None it then read."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2, self.fc, self.side = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 4), torch.nn.Linear(5, 4)

    def forward(self, x, extra=None, scale=1.0, *, mask=None):
        y = self.fc(torch.relu(self.c2(torch.relu(self.bn(self.c1(x))))).mean((2, 3))) * scale
        if extra is not None:
            y = y + self.side(extra)
        if mask is not None:
            y = y * mask
        return y


@pytest.mark.parametrize("example", ["omitted", "given None", "given", "keywords"])
def test_arguments_left_none_are_traced_as_none(example):
    torch.manual_seed(0)
    model = randomize(OptionalInputs().eval())
    x, extra = torch.randn(2, 3, 8, 8), torch.randn(2, 5)
    inputs = {"omitted": (x,), "given None": (x, None, 2.0), "given": (x, extra),
              "keywords": {"x": x, "mask": torch.rand(4)}}[example]
    oto = otofx.OTO(model, inputs)
    assert sorted(z.rows for z in oto.groups) == [8, 8]
    assert ("side" in {u.module for u in oto.unread}) == (example != "given")
    zero_random_rows(model, oto)
    if isinstance(inputs, dict):
        assert_exact(model, oto, (x,), ref_kwargs={"mask": inputs["mask"]})
    else:
        assert_exact(model, oto, inputs)
    graph = oto.compress(form="graph")
    if example in ("omitted", "given None"):  # specialised: another value is refused, not ignored
        with pytest.raises(AssertionError, match="extra has been specialized"):
            graph(x, extra)


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: its own forward calls F.batch_norm with the mode it reads."""

    def forward(self, x):
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       self.training, self.momentum, self.eps))


class _TracedThrough(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), _BatchNormAct(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), _BatchNormAct(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn2(self.c2(self.bn1(self.c1(x)))).mean((2, 3))
        return self.fc(F.dropout(y, self.p, self.training))


@pytest.mark.parametrize("p", [0.0, 1.0])  # 1.0: dropout zeroes everything in train mode, deterministically
def test_graph_form_follows_the_mode_of_modules_traced_through(p):
    # the trace of a forward that reads self.training baked the capture's flag into F.batch_norm and
    # F.dropout: the graph form ran batch norm with running statistics in train mode (0.9 off on timm's
    # RexNet)
    torch.manual_seed(0)
    model = randomize(_TracedThrough(p).eval())
    x = torch.randn(4, 3, 8, 8)
    oto = otofx.OTO(model, x)
    assert oto.frontend == "symbolic_trace"
    zero_random_rows(oto.model, oto, seed=0)
    graph = oto.compress(form="graph")
    ref, got = copy.deepcopy(model).train(), copy.deepcopy(graph).train()
    with torch.no_grad():
        assert torch.allclose(ref(x), got(x), rtol=1e-4, atol=1e-5)
        ref.eval(), got.eval()
        assert torch.allclose(ref(x), got(x), rtol=1e-4, atol=1e-5)
    # the running statistics moved in train mode, as the model's did
    assert not torch.equal(got.get_buffer("bn1.running_mean"), graph.get_buffer("bn1.running_mean"))


class _PairOfImages(nn.Module):
    """RAFT's feature encoder: both images in one batch, split in halves (``torch.chunk``), a branch on
    data (so symbolic_trace fails and torch.export captures it)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, image1, image2):
        f1, f2 = torch.chunk(self.enc(torch.cat([image1, image2], dim=0)), chunks=2, dim=0)
        d = f1 - f2
        if image1.abs().mean() < 0:  # taken by no input
            d = -d
        return self.head(d)


def test_an_example_of_batch_1_whose_widened_capture_refuses_it(caplog):
    """A batch of 1 is exported widened to 2 (torch.export specialises sizes of 1); when that program's
    size guards refuse the example itself (the halves of cat([a, b]) guard the two batches' sum), the
    capture exports the example instead of failing."""
    model = randomize(_PairOfImages().eval(), 0)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g))
    with caplog.at_level(logging.INFO, logger="otofx"):
        oto = otofx.OTO(model, x)
    assert oto.frontend == "export" and "refuse the example's batch of 1" in caplog.text
    assert [z.rows for z in oto.groups] == [8]
    zero_random_rows(model, oto)
    for form in ("module", "graph"):
        assert_exact(model, oto, x, small=oto.compress(form=form))
    # the model's own class takes other batches too
    y = (torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g))
    assert_exact(model, oto, y, small=oto.compress(form="module"))


class _PlainTable(nn.Module):
    """vit-pytorch's SimpleViT: a sin-cos table kept as a plain tensor attribute (no buffer, no parameter) is
    added to the stream; its columns go with the stream's rows, in the graph form and the own class."""

    def __init__(self, check: bool):
        super().__init__()
        self.check = check
        self.embed = nn.Linear(12, 16)
        self.pos_embedding = torch.randn(4, 16)  # NB: plain: vit-pytorch's posemb_sincos_2d(...)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        if self.check and x.shape[-1] < 0:  # NB: symbolic_trace cannot take it; torch.export can
            raise ValueError
        h = self.embed(x)
        h += self.pos_embedding.to(x.device, dtype=h.dtype)
        h = h + self.mlp(self.norm(h))
        return self.head(h.mean(1))


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_a_plain_tensor_table_added_to_the_stream_is_sliced_with_it(frontend):
    from helpers import max_rel_diff, n_params, randomize, zero_random_rows

    model = randomize(_PlainTable(check=frontend == "export").eval())
    x = torch.randn(2, 4, 12)
    oto = otofx.OTO(model, x, frontend=frontend)
    stream = [z for z in oto.groups if any(n == "embed.weight" and d == 0 for n, d, _ in z.params)]
    assert stream and stream[0].rows == 16, oto.report()
    zero_random_rows(model, oto, seed=1)
    for form in ("graph", "module"):
        small = oto.compress(form=form)
        assert n_params(small) == n_params(oto.compress(form="graph")) < n_params(model)
        with torch.no_grad():
            other = torch.randn(3, 4, 12)
            assert max_rel_diff(model(other), small(other)) < 1e-4
    assert tuple(small.pos_embedding.shape) == (4, small.embed.out_features) and small.embed.out_features < 16
    assert model.pos_embedding.shape == (4, 16)  # the user's model untouched


class _WritesItsFeatures(nn.Module):
    """sentence-transformers' way: each stage reads the features dict it is given and adds its results to
    it (``features.update(...)``); here the token states and a pooled, normalised embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, features: dict):
        h = self.embed(features["input_ids"])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        features.update({"token_embeddings": h})
        mask = features["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        features["sentence_embedding"] = F.normalize(self.head(pooled), dim=-1)
        return features


def test_a_forward_that_writes_into_its_input_dict_is_captured_whole_and_leaves_the_example_alone():
    from helpers import max_rel_diff, n_params

    model = randomize(_WritesItsFeatures().eval())
    feats = {"input_ids": torch.randint(0, 20, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    # NB: every call got the dict the last one had written into: the exported graph refused it, and the
    # model was captured in parts with the stream whole
    oto = otofx.OTO(model, (feats,), free_outputs=("token_embeddings",))
    assert sorted(feats) == ["attention_mask", "input_ids"]
    assert oto.frontend == "export", oto.frontend
    assert any(n == "embed.weight" for z in oto.groups for n, _, _ in z.params), oto.report()
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert sorted(feats) == ["attention_mask", "input_ids"]
    assert type(small) is _WritesItsFeatures and small.embed.embedding_dim < 16
    other = {"input_ids": torch.randint(0, 20, (3, 7)), "attention_mask": torch.randint(0, 2, (3, 7))}
    with torch.no_grad():
        want, got = model(dict(other))["sentence_embedding"], small(dict(other))["sentence_embedding"]
    assert max_rel_diff(want, got) < 1e-4 and n_params(small) < n_params(model)


class _DropsAResult(nn.Module):
    """A submodule that runs and whose result the forward drops (BertModel's pooler under
    sentence-transformers): torch.export keeps its nodes, dead."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 16)
        self.pooler = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        pooled = torch.tanh(self.pooler(h[:, 0]))  # noqa: F841 - computed, then dropped
        return self.head(h.mean(1))


def test_a_module_whose_result_is_dropped_is_sized_with_what_it_reads():
    from helpers import max_rel_diff, n_params

    model = randomize(_DropsAResult().eval())
    oto = otofx.OTO(model, torch.randn(2, 4, 6), frontend="export")
    assert not oto.unread, oto.unread
    stream = [z for z in oto.groups if any(n == "fc2.weight" and d == 0 for n, d, _ in z.params)]
    assert stream and any(n == "pooler.weight" and d == 1 for n, d, _ in stream[0].params), oto.report()
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    assert type(small) is _DropsAResult and small.pooler.in_features == small.fc2.out_features < 16
    assert n_params(small) == n_params(oto.compress(form="graph"))
    with torch.no_grad():
        x = torch.randn(3, 7, 6)
        assert max_rel_diff(model(x), small(x)) < 1e-4


class _TakesKwargs(nn.Module):
    """``forward(*args, **kwargs)`` as peft's PeftModel writes it, with a branch on an image size that
    torch.export turns into an input guard."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, stride=8)
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 4)

    def forward(self, *args, **kwargs):
        h = self.patch(kwargs["pixel_values"]).flatten(2).transpose(1, 2)
        if h.shape[1] == 1:
            h = h * 2
        return self.fc2(torch.relu(self.fc1(h))).mean(1)


def test_guards_on_packed_keyword_inputs_run():
    """torch.export names such an input ``L['kwargs']['pixel_values']`` in its guards, the graph's input by
    keyword: its guard function raised NameError on every call, and nothing was captured."""
    from helpers import max_rel_diff, n_params

    model = randomize(_TakesKwargs().eval())
    oto = otofx.OTO(model, {"pixel_values": torch.randn(1, 3, 32, 32)})
    assert oto.frontend == "export" and oto.groups, oto.frontend
    zero_random_rows(model, oto, seed=1)
    for form in ("graph", "module"):
        small = oto.compress(form=form)
        # NB: torch 2.11's export keeps this graph's sizes static; the own class takes any size
        x = torch.randn(2, 3, 40, 48) if form == "module" else torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert max_rel_diff(model(pixel_values=x), small(pixel_values=x)) < 1e-4
        assert n_params(small) < n_params(model)
