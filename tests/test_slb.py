"""SLB (otofx.slb, otofx.passes.slb): soft/argmax weights, exact gradients, schedule, freeze, torchao."""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from helpers import eval_flags, randomize, snapshot, zero_random_rows
from torch import nn

import otofx
import otofx.slb as slb
from otofx import pipeline as P
from otofx.errors import InputError
from otofx.passes.slb import SLBPass
from otofx.slb.ste import STEWeight, ste_quantize


class Net(nn.Module):
    """conv-bn-relu, conv-bn-relu, conv-relu (no norm after: gets a scale), pool, linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.c4, self.b4 = nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        x = F.relu(self.c3(x))
        x = F.relu(self.b4(self.c4(x)))
        return self.fc(x.mean((2, 3)))


def _net(seed=0):
    torch.manual_seed(seed)
    return randomize(Net(), seed)


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
LOADER = [(torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)), None) for i in range(3)]


def _scaled(layer):
    return layer.slb.scale is not None


def test_default_layers_scale_and_user_model_untouched():
    m = _net()
    before = snapshot(m)
    ids = {n: id(p) for n, p in m.named_parameters()}
    q = slb.quantize(m, X, bits=2)
    assert snapshot(m) == before and {n: id(p) for n, p in m.named_parameters()} == ids
    assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in m.modules())
    layers = {layer.name: layer for layer in slb.slb_layers(q)}
    assert sorted(layers) == ["c2.weight", "c3.weight", "c4.weight"]  # first (c1) and last (fc) stay float
    assert [n for n, l in layers.items() if _scaled(l)] == ["c3.weight"]  # the only one with no norm after
    assert layers["c2.weight"].logits.shape == (8, 8, 3, 3, 4)
    torch.testing.assert_close(layers["c2.weight"].slb.values, torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert set(dict(q.named_parameters())) >= {"c1.weight", "fc.weight", "b2.weight"}
    q.train()
    q(X).sum().backward()  # the model is trainable; the user's weights get no gradient
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_soft_weights_are_convex_combinations_and_gradients_are_exact(bits):
    q = slb.quantize(_net(), X, bits=bits, layers="all")
    q.train()
    g = torch.Generator().manual_seed(1)
    for layer in slb.slb_layers(q):
        layer.slb.temperature.fill_(1.7)
        with torch.no_grad():
            layer.logits.normal_(generator=g)
        w = getattr(layer.module, layer.attr)
        a = layer.logits.detach().clone().requires_grad_(True)
        p = torch.softmax(a * 1.7, -1)
        assert torch.all(p >= 0) and torch.allclose(p.sum(-1), torch.ones(()))
        ref = p @ layer.slb.values
        s = layer.slb.scale
        if s is not None:
            ref = ref * s.detach().reshape(-1, *[1] * (ref.dim() - 1))
        torch.testing.assert_close(w, ref)
        lo, hi = layer.slb.values.min(), layer.slb.values.max()
        unscaled = w / s.reshape(-1, *[1] * (w.dim() - 1)) if s is not None else w
        assert torch.all(unscaled >= lo - 1e-6) and torch.all(unscaled <= hi + 1e-6)
        assert torch.unique(w).numel() > 2 ** bits  # soft: not on the grid
        # the gradient reaching the logits is the exact one of softmax(A*T) @ v (no straight-through)
        up = torch.randn(w.shape, generator=g)
        (w * up).sum().backward()
        (ref * up).sum().backward()
        assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0
        torch.testing.assert_close(layer.logits.grad, a.grad)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_argmax_on_grid_freeze_equals_eval_and_distinct_values(bits):
    q = slb.quantize(_net(), X, bits=bits, layers="all")
    with torch.no_grad():
        for layer in slb.slb_layers(q):
            layer.logits.normal_()
            if layer.slb.scale is not None:
                layer.slb.scale.uniform_(0.5, 2.0)
    for m in q.modules():
        m.training = False
    for layer in slb.slb_layers(q):
        w = getattr(layer.module, layer.attr)
        vals = layer.slb.values
        if layer.slb.scale is not None:
            w = w / layer.slb.scale.reshape(-1, *[1] * (w.dim() - 1))
        assert torch.isin(w, vals).all() if layer.slb.scale is None else \
            torch.allclose(w, vals[(w.unsqueeze(-1) - vals).abs().argmin(-1)])
        assert torch.equal(layer.slb.indices(layer.logits), layer.logits.argmax(-1))
    assert slb.calibrate_bn(q, LOADER) == 3
    frozen = slb.freeze(q)
    assert not slb.slb_layers(frozen) and slb.slb_layers(q)  # q keeps its parametrisations
    with torch.no_grad():
        assert torch.equal(frozen(X), q(X))
    for name, info in frozen.otofx_slb.items():
        w = frozen.get_parameter(name)
        rows = w.reshape(w.shape[0], -1)
        if info.scale is None:
            assert torch.unique(w).numel() <= 2 ** bits
        else:
            assert max(torch.unique(r).numel() for r in rows) <= 2 ** bits
    rep = slb.size_report(frozen)
    assert all(ls.distinct <= 2 ** bits for ls in rep.layers)
    assert rep.quantised_weights == sum(p.numel() for n, p in frozen.named_parameters() if n in frozen.otofx_slb)
    assert rep.packed_bytes < rep.float32_bytes


def test_freeze_with_loader_calibrates_a_copy():
    q = slb.quantize(_net(), X, bits=2)
    q.train()
    for _ in range(2):
        q(X)  # training-state BN statistics (soft weights)
    ref = copy.deepcopy(q)
    frozen = slb.freeze(q, LOADER)
    stats = [b.running_mean.clone() for b in (q.b1, q.b2, q.b4)]
    assert all(torch.equal(a, b) for a, b in zip(stats, (ref.b1.running_mean, ref.b2.running_mean, ref.b4.running_mean)))
    slb.calibrate_bn(ref, LOADER)
    with torch.no_grad(), eval_flags(ref), eval_flags(frozen):
        assert torch.equal(frozen(X), ref(X))
        assert not torch.equal(frozen.b2.running_mean, q.b2.running_mean)


def test_calibrate_bn_uses_argmax_weights():
    q = slb.quantize(_net(), X, bits=1)
    slb.calibrate_bn(q, LOADER)
    # the BN after c2 saw c2's argmax output: its running mean is the batch mean of that output
    means = []
    with torch.no_grad(), eval_flags(q):
        for x, _ in LOADER:  # during calibration b1 normalised with each batch's statistics
            h = F.relu(F.batch_norm(q.c1(x), None, None, q.b1.weight, q.b1.bias, training=True, eps=q.b1.eps))
            means.append(q.c2(h).mean((0, 2, 3)))
    expect = torch.stack(means).mean(0)
    torch.testing.assert_close(q.b2.running_mean, expect, rtol=1e-4, atol=1e-5)
    assert q.training  # modes restored


def test_schedule_temperature_hard_phase_and_state_bn():
    q = slb.quantize(_net(), X, bits=2)
    calls = []

    class Loader:
        def __iter__(self):
            calls.append(sched.epoch)
            return iter(LOADER)

    sched = slb.Schedule(q, epochs=10, calibration_loader=Loader())  # e0 = 2, e1 = 6
    temps, hard = [], []
    for e in range(10):
        layer = slb.slb_layers(q)[0]
        temps.append(float(layer.slb.temperature))
        hard.append(bool(layer.slb.hard))
        assert layer.logits.requires_grad == (e < 6)
        sched.step()
    assert temps == pytest.approx([1, 1, 1, 1.2, 1.2 ** 2, 1.2 ** 3, 1.2 ** 4, 1.2 ** 4, 1.2 ** 4, 1.2 ** 4])
    assert hard == [False] * 6 + [True] * 4
    assert calls == list(range(2, 10))  # state BN after every epoch from e0 on
    # hard phase: the training forward uses the argmax weights, float parameters still train
    q.train()
    layer = slb.slb_layers(q)[0]
    w_train = getattr(layer.module, layer.attr)
    with eval_flags(q):
        assert torch.equal(w_train, getattr(layer.module, layer.attr))
    q(X).sum().backward()
    assert layer.logits.grad is None and q.b2.weight.grad is not None
    with slb.weights(q, "soft"):
        assert not torch.equal(getattr(layer.module, layer.attr), w_train)
    with pytest.raises(InputError, match="epochs"):
        slb.Schedule(q, epochs=0)


def test_schedule_end_temperature_fixes_the_ramp_whatever_the_budget():
    q = slb.quantize(_net(), X, bits=1)
    for epochs, e0, e1 in [(10, 2, 6), (100, 20, 60)]:
        sched = slb.Schedule(q, epochs=epochs, t_end_val=slb.REFERENCE_T_END)
        temps = [sched.temperature(e) for e in range(epochs)]
        assert temps[e0] == 1.0 and temps[e1] == pytest.approx(1.2 ** 40) and temps[-1] == temps[e1]
        assert all(b > a for a, b in zip(temps[e0:e1], temps[e0 + 1:e1 + 1]))  # geometric ramp from e0 to e1
        assert temps[e0 + 1] == pytest.approx(1.2 ** (40 / (e1 - e0)))
    assert float(slb.slb_layers(q)[0].slb.temperature) == 1.0
    sched = slb.Schedule(q, epochs=5, t_start=0.5, t_end=0.5, t_end_val=50.0)  # no ramp: e0 == e1
    assert [sched.temperature(e) for e in range(5)] == [1.0] * 5
    with pytest.raises(InputError, match="t_end_val"):
        slb.Schedule(q, epochs=10, t_end_val=0.0)


def test_layer_selection_and_bad_input():
    m = _net()
    assert [l.name for l in slb.slb_layers(slb.quantize(m, X, 1, layers=nn.Linear))] == ["fc.weight"]
    assert [l.name for l in slb.slb_layers(slb.quantize(m, X, 1, layers=["c1", "c4"]))] == ["c1.weight", "c4.weight"]
    picked = slb.quantize(m, X, 1, layers=lambda name, mod: name.startswith("c") and mod.out_channels == 8)
    assert [l.name for l in slb.slb_layers(picked)] == ["c1.weight", "c2.weight", "c4.weight"]
    with pytest.raises(InputError, match="nope"):
        slb.quantize(m, X, 1, layers=["nope"])
    with pytest.raises(InputError, match="bits"):
        slb.quantize(m, X, bits=0)
    with pytest.raises(InputError, match="layers='all'"):
        slb.quantize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(2, 4), 1)
    with pytest.raises(InputError, match="freeze"):
        slb.to_torchao(m)
    with pytest.raises(InputError, match="quantize"):
        slb.freeze(m)


def test_export_form_and_pipeline_pass():
    m = _net().eval()  # NB: torch.export bakes BatchNorm's mode into the graph
    q = slb.quantize(m, X, bits=2, frontend="export")
    names = {l.name: _scaled(l) for l in slb.slb_layers(q)}
    assert names == {"c2.weight": False, "c3.weight": True, "c4.weight": False}
    q2 = P.Pipeline([P.Capture("symbolic_trace"), SLBPass(2, scale=False)]).run(m, X).gm
    assert [l.name for l in slb.slb_layers(q2)] == ["c2.weight", "c3.weight", "c4.weight"]
    assert not any(_scaled(l) for l in slb.slb_layers(q2))
    # both forms compute the same discrete model from the same logits
    for a, b in zip(slb.slb_layers(q), slb.slb_layers(q2)):
        a.logits.data.copy_(b.logits.data)
        if a.slb.scale is not None:
            a.slb.scale.data.fill_(1.0)
    with torch.no_grad(), eval_flags(q), eval_flags(q2):
        torch.testing.assert_close(q(X), q2(X))


def test_quantize_a_compressed_model():
    torch.manual_seed(0)
    m = randomize(Net())
    oto = otofx.OTO(m, X)
    zero_random_rows(m, oto, seed=0)
    small = oto.compress()
    q = slb.quantize(small, X, bits=1)
    layers = slb.slb_layers(q)
    assert [l.name for l in layers] == ["c2.weight", "c3.weight", "c4.weight"]
    assert layers[0].logits.shape[:-1] == small.get_parameter("c2.weight").shape != m.c2.weight.shape
    frozen = slb.freeze(q)
    with torch.no_grad(), eval_flags(q), eval_flags(frozen):
        assert torch.equal(frozen(X), q(X))
    # the same pass inside compress's pipeline (SLB changes outputs: no verification)
    q2 = oto.compress(verify=False, passes=[SLBPass(1)])
    assert [l.logits.shape for l in slb.slb_layers(q2)] == [l.logits.shape for l in layers]


def test_to_torchao_matches_frozen():
    pytest.importorskip("torchao")
    q = slb.quantize(_net(), X, bits=2, layers="all")
    with torch.no_grad():
        for layer in slb.slb_layers(q):
            layer.logits.normal_()
    for b, frontend in ((1, "symbolic_trace"), (2, "symbolic_trace"), (4, "symbolic_trace"), (2, "export")):
        qb = slb.quantize(_net(), X, bits=b, layers="all", frontend=frontend, form="graph")
        frozen = slb.freeze(qb, LOADER)
        ao = slb.to_torchao(frozen)
        w = ao.get_parameter("c2.weight")
        assert type(w).__name__ == "IntxUnpackedToInt8Tensor" and w.qdata.dtype == torch.int8
        # the convolutions and the Linear run on torchao's tensor, none on a dequantised copy
        assert not [n for n in ao.graph.nodes if n.target == "dequantize"]
        with torch.no_grad(), eval_flags(ao), eval_flags(frozen):
            ref, got = frozen(X), ao(X)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
        assert slb.size_report(ao).layers == slb.size_report(frozen).layers
    assert type(frozen.get_parameter("c2.weight")) is nn.Parameter  # the frozen model is not changed


def test_activation_quant_and_warm_start():
    m = _net()
    q = slb.quantize(m, X, bits=4, act_bits=4)
    acts = [mod for mod in q.modules() if isinstance(mod, slb.ActFakeQuant)]
    assert len(acts) == 3
    q.train()
    q(X)
    with torch.no_grad(), eval_flags(q):
        seen = {}
        hooks = [a.register_forward_hook(lambda mod, i, o: seen.setdefault(mod, o)) for a in acts]
        q(X)
        for h in hooks:
            h.remove()
    assert all(o.unique().numel() <= 16 for o in seen.values())
    # warm start: the first argmax is the nearest grid value of w / max|w| per channel
    w = slb.quantize(m, X, bits=2, layers=["c2"], warm_start=0.1)
    layer = slb.slb_layers(w)[0]
    s = m.c2.weight.detach().abs().amax((1, 2, 3), keepdim=True)
    near = (m.c2.weight.detach() / s).unsqueeze(-1).sub(layer.slb.values).abs().argmin(-1)
    assert torch.equal(layer.logits.argmax(-1), near)


def test_ste_baseline():
    q = ste_quantize(_net(), X, bits=2, use_torchao=False)
    ste = [mod for mod in q.modules() if isinstance(mod, STEWeight)]
    assert len(ste) == 3
    q.train()
    q(X).sum().backward()
    assert q.c2.parametrizations.weight.original.grad.abs().sum() > 0
    assert torch.unique(q.c2.weight[0]).numel() <= 4


def _bench_slb():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "slb.py"
    spec = importlib.util.spec_from_file_location("_bench_slb", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_latent_weights_are_the_logits_or_the_ste_weights():
    # bench/slb.py --q-opt/--q-lr give these (and only these) their own optimizer, for SLB and STE alike
    bench = _bench_slb()
    q = slb.quantize(_net(), X, bits=2)
    assert [id(p) for p in bench.latent_weights(q)] == [id(layer.logits) for layer in slb.slb_layers(q)]
    s = ste_quantize(_net(), X, bits=2, use_torchao=False)
    want = {id(s.get_submodule(n).parametrizations.weight.original) for n in ("c2", "c3", "c4")}
    assert {id(p) for p in bench.latent_weights(s)} == want and len(bench.latent_weights(s)) == 3
    assert not bench.latent_weights(_net())
    if importlib.util.find_spec("torchao") is not None:  # the Linear head gets torchao's fake quantiser
        a = ste_quantize(_net(), X, bits=2, layers="all")
        got = {id(p) for p in bench.latent_weights(a)}
        assert id(a.get_submodule("fc").weight) in got and len(got) == 5


class _Projected(nn.Module):
    """A weight read by torch.addmm as [in, out] (transformers' Conv1D, GPT-2's projections), one read
    as the left operand of a product (W @ x, output channels on its rows), and one read by einsum,
    which SLB leaves float."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.proj = nn.Parameter(torch.randn(6, 4))
        self.bias = nn.Parameter(torch.zeros(4))
        self.left = nn.Parameter(torch.randn(3, 4))
        self.mix = nn.Parameter(torch.randn(3, 3))
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.addmm(self.bias, torch.relu(self.fc(x)), self.proj)
        return self.out(torch.einsum("bi,ij->bj", torch.mm(self.left, h.t()).t(), self.mix))


def test_weights_slb_cannot_quantise_are_named_not_silent(caplog):
    """A weight feeding a product SLB does not take (einsum) stays float, and the log says which; W @ x
    is a layer with its channels on W's rows; a model without such a weight logs nothing of the kind."""
    import logging

    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        q = slb.quantize(_Projected(), torch.randn(2, 5), bits=2, layers="all")
    said = [r.getMessage() for r in caplog.records if "does not quantise" in r.getMessage()]
    assert len(said) == 1 and "mix" in said[0] and "left" not in said[0] and "fc.weight" not in said[0], said
    layers = {layer.name: layer.slb for layer in slb.slb_layers(q)}
    assert set(layers) == {"fc.weight", "slb_proj.weight", "slb_left.weight", "out.weight"}
    left = layers["slb_left.weight"]
    assert left.out_dim == 0 and not left.plain and left.scale.shape == (3,) and layers["slb_proj.weight"].plain
    caplog.clear()
    up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2, stride=2), nn.Conv2d(4, 2, 1))
    with caplog.at_level(logging.WARNING, logger="otofx"):
        q = slb.quantize(up, X, bits=2, layers="all")
    said = [r.getMessage() for r in caplog.records if "does not quantise" in r.getMessage()]
    assert len(said) == 1 and "1.weight" in said[0] and "0.weight" not in said[0], said
    assert {layer.name for layer in slb.slb_layers(q)} == {"0.weight", "2.weight"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otofx"):
        slb.quantize(_net(), X, bits=2)
    assert not [r for r in caplog.records if "does not quantise" in r.getMessage()]


def _out(y):
    return getattr(y, "logits", y)


def _check_in_out_layer(q, name, bits, x, out_features):
    """``name`` (stored [in, out]) has its scale per output column, at most 2**bits values per column,
    a gradient reaching its logits, and freeze() equal to eval mode."""
    layer = next(layer for layer in slb.slb_layers(q) if layer.name == name)
    assert layer.slb.out_dim == 1 and layer.slb.scale is not None and layer.slb.scale.shape == (out_features,)
    with torch.no_grad():
        layer.slb.scale.uniform_(0.5, 2.0)
    q.train()
    _out(q(*x)).sum().backward()
    assert layer.logits.grad is not None and layer.logits.grad.abs().sum() > 0
    with torch.no_grad(), eval_flags(q):
        w = getattr(layer.module, layer.attr)
        assert w.shape[1] == out_features
        assert max(torch.unique(w[:, j]).numel() for j in range(out_features)) <= 2 ** bits
        assert torch.unique(w).numel() > 2 ** bits  # the columns' scales differ: not one grid for all
    frozen = slb.freeze(q)
    assert frozen.otofx_slb[name].out_dim == 1
    with torch.no_grad(), eval_flags(q), eval_flags(frozen):
        assert torch.equal(_out(frozen(*x)), _out(q(*x)))
    return frozen


def test_weights_stored_in_out_are_quantised_per_output_column():
    torch.manual_seed(0)
    x = (torch.randn(4, 5),)
    for frontend in ("symbolic_trace", "export"):
        q = slb.quantize(_Projected(), x, bits=2, layers="all", frontend=frontend, warm_start=0.1)
        frozen = _check_in_out_layer(q, "slb_proj.weight", 2, x, 4)  # the root's weight, in a holder module
        rep = slb.size_report(frozen)
        proj = next(ls for ls in rep.layers if ls.name == "slb_proj.weight")
        assert proj.packed_bytes == 6 * 4 * 2 // 8 + 4 * 4 and proj.distinct <= 4
    # a buffer read as x @ W (a fixed transform) is not a layer: nothing to train
    class Fixed(_Projected):
        def __init__(self):
            super().__init__()
            self.register_buffer("dct", torch.randn(3, 3))

        def forward(self, x):
            return torch.mm(super().forward(x), self.dct)

    q = slb.quantize(Fixed(), x, bits=2, layers="all")
    assert any(n.target == "dct" for n in q.graph.nodes)
    assert {layer.name for layer in slb.slb_layers(q)} == {"fc.weight", "slb_proj.weight", "slb_left.weight", "out.weight"}
    # the warm start's first argmax is the nearest grid value of W / max|W| per output column
    m = _Projected()
    q = slb.quantize(m, x, bits=2, layers=["proj"], warm_start=0.1)
    layer = slb.slb_layers(q)[0]
    s = m.proj.detach().abs().amax(0, keepdim=True)
    near = (m.proj.detach() / s).unsqueeze(-1).sub(layer.slb.values).abs().argmin(-1)
    assert torch.equal(layer.logits.argmax(-1), near)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval(), (torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1)),)


class _TLinear(nn.Linear):
    """Falcon's Linear: ``x @ W.T`` in its own forward, not F.linear."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class _TNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), _TLinear(8, 8), _TLinear(8, 3, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_weights_read_transposed_are_layers_in_both_forms(caplog):
    """``x @ W.T`` (Falcon's Linear) is a layer with its channels on W's rows, in the module form (the
    model's own class, its input quantised by the pre-hook) and the graph form alike, bit for bit;
    freeze is exact. to_torchao hands the graph form's products over as linear calls on torchao's
    tensor; the module form's own forward cannot take that tensor, so those weights stay plain, said."""
    import logging

    torch.manual_seed(0)
    m, x = _TNet().eval(), torch.randn(6, 5)
    forms = []
    for form in ("module", "graph"):
        torch.manual_seed(1)
        q = slb.quantize(m, (x,), bits=2, layers="all", act_bits=8, warm_start=0.1, form=form, frontend="export")
        q.train()
        q(x)
        forms.append(q.eval())
    q, g = forms
    assert type(q) is _TNet and isinstance(q.b.slb_act, slb.ActFakeQuant)
    for model in (q, g):
        layers = {layer.name: layer.slb for layer in slb.slb_layers(model)}
        assert set(layers) == {"a.weight", "b.weight", "c.weight"}
        assert layers["b.weight"].out_dim == 0 and not layers["b.weight"].plain and layers["a.weight"].plain
        assert layers["c.weight"].scale.shape == (3,)
    with torch.no_grad():
        torch.testing.assert_close(q(x), g(x), rtol=0, atol=0)
    frozen = [slb.freeze(model) for model in (q, g)]
    with torch.no_grad():
        for f, model in zip(frozen, (q, g)):
            torch.testing.assert_close(f(x), model(x), rtol=0, atol=0)
            assert int(torch.unique(f.c.weight).numel()) <= 4 * 3
    if importlib.util.find_spec("torchao") is None:
        return
    fq, fg = frozen
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otofx"):
        aq = slb.to_torchao(fq)
    assert "stay plain" in caplog.text and "b.weight" in caplog.text and "form='graph'" in caplog.text
    assert type(aq.b.weight) is nn.Parameter and type(aq.a.weight).__name__ == "IntxUnpackedToInt8Tensor"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="otofx"):
        ag = slb.to_torchao(fg)
    assert "stay plain" not in caplog.text
    assert all(type(get_weight).__name__ == "IntxUnpackedToInt8Tensor" for get_weight in (ag.b.weight, ag.c.weight))
    reads = [n for n in ag.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert len(reads) == 3  # a (aten.linear) and b, c (x @ W.T) are linear calls now
    with torch.no_grad():
        for a, f in ((aq, fq), (ag, fg)):
            torch.testing.assert_close(a(x), f(x), rtol=1e-5, atol=1e-5)
    assert slb.size_report(ag).quantised_weights == slb.size_report(fg).quantised_weights


def test_gpt2_projections_are_quantised():
    """transformers' Conv1D (GPT-2's attention and MLP projections, addmm on an [in, out] weight):
    every projection is an SLB layer with per-output scales; activation quantisers sit on addmm's
    input; the type selects them; STE and torchao take them too."""
    from transformers.pytorch_utils import Conv1D

    m, ids = _gpt2()
    projections = {f"transformer.h.{i}.{p}.weight" for i in range(2) for p in ("attn.c_attn", "attn.c_proj",
                                                                                  "mlp.c_fc", "mlp.c_proj")}
    q = slb.quantize(m, ids, bits=2, layers="all", form="graph")
    assert {layer.name for layer in slb.slb_layers(q)} == projections | {"lm_head.weight"}
    frozen = _check_in_out_layer(q, "transformer.h.0.mlp.c_fc.weight", 2, ids, 64)
    assert {layer.name for layer in slb.slb_layers(slb.quantize(m, ids, bits=2, layers=Conv1D))} == projections
    a = slb.quantize(m, ids, bits=4, layers=Conv1D, act_bits=8, form="graph")
    acts = [n for n in a.graph.nodes if n.op == "call_module" and n.target.startswith("slb_act_")]
    assert len(acts) == len(projections)
    for n in acts:
        (user,) = n.users
        assert "addmm" in str(user.target) and user.args[1] is n
    a.train()
    a(*ids).logits.sum().backward()
    s = ste_quantize(m, ids, bits=2, layers=Conv1D)
    ws = [mod for mod in s.modules() if isinstance(mod, STEWeight)]
    assert len(ws) == len(projections) and all(w.out_dim == 1 for w in ws)
    w = s.get_submodule("transformer.h.1.attn.c_proj").weight
    assert max(torch.unique(w[:, j]).numel() for j in range(w.shape[1])) <= 4 < torch.unique(w).numel()
    if importlib.util.find_spec("torchao") is not None:
        ao = slb.to_torchao(frozen)
        t = ao.get_parameter("transformer.h.0.mlp.c_fc.weight")
        assert type(t).__name__ == "IntxUnpackedToInt8Tensor" and tuple(t.shape) == (64, 16)
        assert not [n for n in ao.graph.nodes if "addmm" in str(n.target)]
        # only the tied embedding reads a dequantised copy; every product runs on torchao's tensor
        deq = [n for n in ao.graph.nodes if n.target == "dequantize"]
        assert len(deq) == 1 and [str(u.target) for u in deq[0].users] == ["aten.embedding.default"]
        with torch.no_grad(), eval_flags(ao), eval_flags(frozen):
            ref, got = frozen(*ids).logits, ao(*ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))
        assert slb.size_report(ao).layers == slb.size_report(frozen).layers


class _CrossAttention(nn.Module):
    """An nn.MultiheadAttention with its own key/value widths (separate q/k/v weights), called with
    keyword arguments."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x, k, v):
        h, _ = self.attn(query=self.inp(x), key=k, value=v, need_weights=False)
        return self.out(h)


def test_attention_projections_are_quantised():
    """nn.MultiheadAttention holds its projections itself (torchvision's ViT): its in_proj_weight (or
    q/k/v weights) and its out_proj's weight are SLB layers; activation quantisers sit on its query,
    key and value inputs (one for self-attention's x, x, x); freeze() strips all of a module's SLB
    weights; torchao's hand-off leaves them plain (the module's own kernels read them)."""
    import logging

    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                      mlp_dim=32, num_classes=5)
    x = torch.randn(3, 3, 16, 16)
    attn = [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    q = slb.quantize(vit, x, bits=2, layers="all", act_bits=8, form="graph")
    names = {layer.name for layer in slb.slb_layers(q)}
    assert {f"{a}.in_proj_weight" for a in attn} | {f"{a}.out_proj.weight" for a in attn} <= names
    assert {layer.name for layer in slb.slb_layers(slb.quantize(vit, x, bits=2, layers=nn.MultiheadAttention))} \
        == {f"{a}.{w}" for a in attn for w in ("in_proj_weight", "out_proj.weight")}
    node = next(n for n in q.graph.nodes if n.target == attn[0])
    assert node.args[0] is node.args[1] is node.args[2] and node.args[0].target.startswith("slb_act_")
    q.train()
    q(x).sum().backward()
    layer = next(layer for layer in slb.slb_layers(q) if layer.name == f"{attn[0]}.in_proj_weight")
    assert layer.logits.grad.abs().sum() > 0
    frozen = slb.freeze(q)
    for m in (q, frozen):
        m.eval()
    with torch.no_grad():
        w = frozen.get_submodule(attn[0]).in_proj_weight
        assert max(torch.unique(r).numel() for r in w) <= 4
        torch.testing.assert_close(frozen(x), q(x), rtol=1e-5, atol=1e-6)
    # separate q/k/v weights, keyword inputs
    torch.manual_seed(1)
    cross, args = _CrossAttention(), (torch.randn(2, 4, 6), torch.randn(2, 7, 5), torch.randn(2, 7, 3))
    cq = slb.quantize(cross, args, bits=2, layers="all", act_bits=8, frontend="symbolic_trace", form="graph")
    assert {layer.name for layer in slb.slb_layers(cq)} == {"inp.weight", "out.weight", "attn.out_proj.weight"} | {
        f"attn.{p}_proj_weight" for p in "qkv"}
    node = next(n for n in cq.graph.nodes if n.target == "attn")
    assert all(node.kwargs[k].target.startswith("slb_act_attn") for k in ("query", "key", "value"))
    assert len({node.kwargs[k] for k in ("query", "key", "value")}) == 3
    cf = slb.freeze(cq)
    assert not torch.nn.utils.parametrize.is_parametrized(cf.attn)
    for m in (cq, cf):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(cf(*args), cq(*args), rtol=1e-5, atol=1e-6)
    ste = ste_quantize(vit, x, bits=2, layers="all")
    assert isinstance(ste.get_submodule(attn[0]).parametrizations.in_proj_weight[0], STEWeight)
    assert isinstance(ste.get_submodule(f"{attn[0]}.out_proj").parametrizations.weight[0], STEWeight)
    if importlib.util.find_spec("torchao") is not None:
        ao = slb.to_torchao(frozen)
        assert type(ao.get_parameter(f"{attn[0]}.in_proj_weight")) is nn.Parameter
        assert type(ao.get_parameter("encoder.layers.encoder_layer_0.mlp.0.weight")).__name__ == \
            "IntxUnpackedToInt8Tensor"
        ao.eval()
        with torch.no_grad():
            torch.testing.assert_close(ao(x), frozen(x), rtol=1e-5, atol=1e-5)


def test_module_form_keeps_the_models_class_generate_and_ties():
    """form='module': a copy of the model itself (a language model keeps generate()), the same function
    as the graph form, the tied head and embedding one weight through quantize, freeze and torchao's
    hand-off (Conv1D becomes the Linear it computes), activation quantisers run by pre-hooks and
    saved in the state_dict."""
    m, ids = _gpt2()
    (ids,) = ids
    q = slb.quantize(m, (ids,), bits=2, layers="all", warm_start=0.1, form="module")
    g = slb.quantize(m, (ids,), bits=2, layers="all", warm_start=0.1, form="graph")
    assert type(q) is type(m) and type(g).__name__ == "GraphModule"
    assert type(slb.quantize(m, (ids,), bits=2)) is type(m)  # the default, "auto"
    # the tied weight once, named as it was selected (the head)
    assert {layer.name for layer in slb.slb_layers(q)} == {layer.name for layer in slb.slb_layers(g)}
    assert q.lm_head.parametrizations.weight.original is q.transformer.wte.parametrizations.weight.original
    q.eval()
    for mod in g.modules():
        mod.training = False
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, g(ids).logits, rtol=0, atol=0)
    q.train()
    q(ids).logits.sum().backward()
    assert q.lm_head.parametrizations.weight.original.grad is not None  # one tensor: both uses' gradients
    q.eval()
    frozen = slb.freeze(q)
    assert type(frozen) is type(m) and frozen.lm_head.weight is frozen.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(frozen(ids).logits, q(ids).logits, rtol=0, atol=0)
    out = frozen.generate(ids[:, :3], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 7) and torch.equal(out, q.generate(ids[:, :3], max_new_tokens=4, do_sample=False))
    import tempfile

    with tempfile.TemporaryDirectory() as d:  # the frozen copy ships as the plain class
        frozen.save_pretrained(d)
        back = type(m).from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, frozen(ids).logits, rtol=0, atol=0)
    # activation quantisers: submodules of the layers' modules (in the state_dict), run by a pre-hook
    a = slb.quantize(m, (ids,), bits=2, layers="all", warm_start=0.1, act_bits=8, form="module")
    assert isinstance(a.transformer.h[0].attn.c_attn.slb_act, slb.ActFakeQuant)
    assert "transformer.h.0.attn.c_attn.slb_act.lo" in a.state_dict()
    a.train()
    a(ids)
    assert float(a.transformer.h[0].attn.c_attn.slb_act.hi) > 0  # it saw the layer's input
    b = slb.quantize(m, (ids,), bits=2, layers="all", act_bits=8, form="module")
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=0)
    if importlib.util.find_spec("torchao") is not None:
        fa = slb.freeze(a)
        ao = slb.to_torchao(fa)
        assert type(ao) is type(m) and type(ao.transformer.h[0].attn.c_attn) is nn.Linear
        assert type(ao.transformer.h[0].attn.c_attn.weight).__name__ == "IntxUnpackedToInt8Tensor"
        ao.eval()
        fa.eval()
        with torch.no_grad():
            torch.testing.assert_close(ao(ids).logits, fa(ids).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(ao.generate(ids[:, :3], max_new_tokens=4, do_sample=False),
                           fa.generate(ids[:, :3], max_new_tokens=4, do_sample=False))


def _both_forms(model, x):
    """The module and the graph form of ``model`` (2 bits, every layer, 8-bit activations) from the
    same random start, after one training batch (the activation ranges), in eval mode."""
    out = []
    for form in ("module", "graph"):
        torch.manual_seed(1)
        q = slb.quantize(model, x, bits=2, layers="all", act_bits=8, form=form)
        q.train()
        q(x)
        q.eval()
        out.append(q)
    return out


def test_module_form_on_attention_and_where_it_cannot_go(caplog):
    """nn.MultiheadAttention in the module form: its query/key/value quantised by a pre-hook (x, x, x
    stays one tensor), the same function as the graph form. A weight its parent reads (not calling the
    module) cannot get its input quantised by a hook: form='module' says so, 'auto' takes the graph."""
    import logging

    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                      mlp_dim=32, num_classes=5)
    x = torch.randn(3, 3, 16, 16)
    q, g = _both_forms(vit, x)
    assert type(q) is type(vit)
    attn = q.encoder.layers[0].self_attention
    assert isinstance(attn.slb_act_query, slb.ActFakeQuant) and attn._slb_act_slots[0][:2] == (0, "query")
    with torch.no_grad():
        torch.testing.assert_close(q(x), g(x), rtol=1e-6, atol=1e-6)

    class Reader(nn.Module):  # the parent reads its child Linear's weight (torchvision's Swin attention)
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(6, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.out(torch.relu(F.linear(x, self.qkv.weight, self.qkv.bias)))

    r = torch.randn(2, 6)
    with pytest.raises(InputError, match="qkv"):
        slb.quantize(Reader(), r, bits=2, layers="all", act_bits=8, form="module")
    with caplog.at_level(logging.INFO, logger="otofx"):
        auto = slb.quantize(Reader(), r, bits=2, layers="all", act_bits=8, form="auto")
    assert type(auto).__name__ == "GraphModule" and any("graph form" in rec.getMessage() for rec in caplog.records)
    assert type(slb.quantize(Reader(), r, bits=2, layers="all", form="auto")).__name__ == "Reader"
    with pytest.raises(InputError, match="form"):
        slb.quantize(Reader(), r, bits=2, form="modules")


def test_module_form_quantises_an_out_proj_that_its_parent_calls():
    """A Linear named ``out_proj`` under a module that calls it (OPT's and BART's attention, not
    nn.MultiheadAttention) is an ordinary layer: its input gets a quantiser in the module form, as in
    the graph form, and the two forms compute the same function."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.out_proj = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            return self.out_proj(torch.tanh(self.q(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.head = nn.Linear(4, 6), Attn(), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.attn(self.inp(x)))

    torch.manual_seed(0)
    m, x = Net(), torch.randn(5, 4)
    q, g = _both_forms(m, x)
    assert isinstance(q.attn.out_proj.slb_act, slb.ActFakeQuant)
    with torch.no_grad():
        torch.testing.assert_close(q(x), g(x), rtol=0, atol=0)


class _Router(nn.Module):
    """An MoE router's shape: its own weight, read by F.linear on its reshaped input."""

    def __init__(self, scale_input=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6) * 0.3)
        self.scale_input = scale_input

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self.scale_input:
            x = x * 2
        return F.linear(x, self.weight)


class _Routed(nn.Module):
    def __init__(self, scale_input=False):
        super().__init__()
        self.inp, self.gate, self.head = nn.Linear(5, 6), _Router(scale_input), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.gate(self.inp(x))))


def test_module_form_quantises_a_router_reading_its_reshaped_input():
    """A module that is not a Linear but computes F.linear(reshape(input), self.weight) (Mixtral's and
    Qwen-MoE's routers) takes its activation quantiser by a pre-hook, since one range for the tensor
    commutes with the reshape: the module form is the graph form's function. Anything else done to the
    input before the product (x * 2) keeps it in the graph. (Read off torch.export's module stack: the
    symbolic tracer does not record one, and its graphs keep such a layer in the graph form.)"""
    torch.manual_seed(0)
    m, x = _Routed(), torch.randn(2, 3, 5)
    forms = []
    for form in ("module", "graph"):
        torch.manual_seed(1)
        q = slb.quantize(m, x, bits=2, layers="all", act_bits=8, form=form, frontend="export")
        q.train()
        q(x)
        forms.append(q.eval())
    q, g = forms
    assert type(q) is _Routed and isinstance(q.gate.slb_act, slb.ActFakeQuant)
    assert q.gate._slb_act_slots == [(0, "hidden_states", "slb_act")]
    with torch.no_grad():
        torch.testing.assert_close(q(x), g(x), rtol=0, atol=0)
    with pytest.raises(InputError, match="gate.weight"):
        slb.quantize(_Routed(scale_input=True), x, bits=2, layers="all", act_bits=8, form="module", frontend="export")


def _moe(name):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if name == "mixtral":  # a router module; experts stored [E, out, in], read transposed by grouped_mm
        return tr.MixtralForCausalLM(tr.MixtralConfig(**common)).eval()
    if name == "llama4":  # experts stored [E, in, out], read by torch.bmm, no is_transposed flag
        cfg = tr.Llama4TextConfig(**{k: v for k, v in common.items() if k != "num_experts_per_tok"}, head_dim=8,
                                  intermediate_size_mlp=24, num_experts_per_tok=1)
        return tr.Llama4ForCausalLM(cfg).eval()
    # GPT-OSS: experts stored [E, in, out] (is_transposed), with biases
    return tr.GptOssForCausalLM(tr.GptOssConfig(**common, head_dim=8, layer_types=["full_attention"])).eval()


@pytest.mark.parametrize("name,out_dim", [("mixtral", 1), ("gpt_oss", 2), ("llama4", 2)])
def test_fused_experts_are_quantised_in_the_models_own_class(name, out_dim, caplog):
    """An MoE layer's fused experts ([E, 2I, H] and [E, H, I]; GPT-OSS [E, in, out]; Llama 4's read by
    torch.bmm) are SLB layers with
    one scale per expert and output channel. The module form (the default: the model's own class, so
    generate() stays) computes what the graph form computes, activation quantisers included: the
    tokens entering the experts are quantised by a pre-hook on the experts module, as the graph form
    quantises the gathered tokens (top-k routing reads every token, so the range is the same); the
    input of the second product, computed inside the experts, is said to stay float. freeze keeps
    4 values per expert and channel; the size report and the STE baseline take them too."""
    import logging

    m = _moe(name)
    ids = torch.randint(1, 64, (2, 8))
    forms = []
    for form in ("module", "graph"):
        torch.manual_seed(1)
        with caplog.at_level(logging.WARNING, logger="otofx"):
            q = slb.quantize(m, (ids,), bits=2, layers="all", act_bits=8, warm_start=0.1, form=form)
        q.train()
        q(ids)
        forms.append(q.eval())
    q, g = forms
    assert type(q) is type(m)
    layers = {layer.name: layer for layer in slb.slb_layers(q)}
    ffn = "feed_forward" if name == "llama4" else "mlp"
    up, down = f"model.layers.0.{ffn}.experts.gate_up_proj", f"model.layers.0.{ffn}.experts.down_proj"
    e = q.get_submodule(f"model.layers.0.{ffn}.experts")
    for n in (up, down):
        w = layers[n].slb
        assert w.batch and w.out_dim == out_dim
        assert tuple(w.scale.shape) == (4, e.parametrizations[n.rsplit(".", 1)[1]].original.shape[out_dim])
    assert isinstance(e.slb_act, slb.ActFakeQuant) and float(e.slb_act.hi) > 0
    assert "experts.down_proj is computed inside" in caplog.text and "stay float" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, g(ids).logits, rtol=0, atol=0)
    frozen = slb.freeze(q)
    w = frozen.get_submodule(f"model.layers.0.{ffn}.experts").gate_up_proj
    rows = w.movedim(out_dim, 1).reshape(w.shape[0] * w.shape[out_dim], -1)
    assert max(int(torch.unique(r).numel()) for r in rows) <= 4
    with torch.no_grad():
        torch.testing.assert_close(frozen(ids).logits, q(ids).logits, rtol=0, atol=0)
    x = ids[:, :3]
    assert torch.equal(frozen.generate(x, max_new_tokens=3, do_sample=False), q.generate(x, max_new_tokens=3, do_sample=False))
    report = {ls.name: ls for ls in slb.size_report(frozen).layers}
    assert report[up].numel == w.numel() and report[up].distinct <= 4
    ste = ste_quantize(m, (ids,), bits=2, layers="all", use_torchao=False)
    sw = [mod for mod in ste.get_submodule(f"model.layers.0.{ffn}.experts").modules() if isinstance(mod, STEWeight)]
    assert len(sw) == 2 and all(mod.batch and mod.out_dim == out_dim for mod in sw)
    with torch.no_grad():
        assert ste(ids)[0].shape == (2, 8, 64)
    if importlib.util.find_spec("torchao") is not None:
        with caplog.at_level(logging.WARNING, logger="otofx"):
            ao = slb.to_torchao(frozen)
        assert "fused expert" in caplog.text and type(ao.get_submodule(f"model.layers.0.{ffn}.experts").gate_up_proj) is nn.Parameter
        assert type(ao.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
        with torch.no_grad():
            torch.testing.assert_close(ao(ids).logits, frozen(ids).logits, rtol=1e-5, atol=1e-5)


class _KeepsState(nn.Module):
    """Stores a state computed in forward, with its autograd history (RecurrentGemma's recurrent
    layers do): torch's deepcopy refuses such a module."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.state = None

    def forward(self, x):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        self.state = h.mean(0)
        return self.head(h)


def test_a_model_holding_a_forward_state_can_be_frozen_and_finished():
    """SLB's freeze and ADMM's finish copy the model after a training step, which left a non-leaf
    tensor in a module attribute: the copy holds it detached."""
    import otofx.admm as A

    torch.manual_seed(0)
    m, x = _KeepsState(), torch.randn(5, 4)
    q = slb.quantize(m, x, bits=2, layers="all", warm_start=0.1)
    q.train()
    q(x).sum().backward()
    assert q.state.grad_fn is not None
    q.eval()
    frozen = slb.freeze(q)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), q(x), rtol=0, atol=0)
    m.train()
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.01), block=(2, 2), prune=0.5, rounds=1, steps_per_round=1)
    m(x).square().mean().backward()
    opt.step()
    small = A.finish(m, opt)
    assert small.state is not None and small.state.grad_fn is None


def _eval_weights(q):
    with torch.no_grad(), slb.weights(q, "hard"):
        return {layer.name: getattr(layer.module, layer.attr).clone() for layer in slb.slb_layers(q)}


@pytest.mark.parametrize("form", ["module", "graph"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_quantises_trains_and_freezes(dtype, form):
    """A bf16/fp16 model: every SLB tensor (logits, grid, scale, activation quantiser) in its dtype;
    the quantised weights are the fp32 path's up to the dtype's rounding; a step trains; freeze runs."""
    m = _net().to(dtype)
    x = X.to(dtype)
    q = slb.quantize(m, x, bits=2, warm_start=0.1, act_bits=8, form=form)
    assert {t.dtype for t in list(q.parameters()) + list(q.buffers()) if t.is_floating_point()} == {dtype}
    # the fp32 path on the same logits and scales (both exact in fp32)
    q32 = slb.quantize(m.float(), X, bits=2, warm_start=0.1, form=form)
    with torch.no_grad():
        for a, b in zip(slb.slb_layers(q), slb.slb_layers(q32)):
            assert a.name == b.name
            b.logits.copy_(a.logits)
            if a.slb.scale is not None:
                b.slb.scale.copy_(a.slb.scale)
    w, w32 = _eval_weights(q), _eval_weights(q32)
    # NB: the bound: a grid value rounded to the dtype (at most eps/2 relative), times the scale and
    # rounded again (eps/2 more): |w - w32| <= eps * |w32| (+1% for fp32's own rounding); a layer with
    # no scale is exactly the fp32 weight rounded to the dtype
    eps = torch.finfo(dtype).eps
    for layer in slb.slb_layers(q):
        a, b = w[layer.name], w32[layer.name]
        assert a.dtype == dtype and b.dtype == torch.float32
        if layer.slb.scale is None:
            assert torch.equal(a, b.to(dtype))
        else:
            assert ((a.float() - b).abs() <= 1.01 * eps * b.abs()).all()
    assert any(layer.slb.scale is not None for layer in slb.slb_layers(q))  # c3: both cases covered
    # a training step, then the schedule's hard phase, freeze and the hand-off
    q.train()
    before = [layer.logits.detach().clone() for layer in slb.slb_layers(q)]
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(x).float().square().mean().backward()
    opt.step()
    assert all(layer.logits.grad.dtype == dtype for layer in slb.slb_layers(q))
    assert any(not torch.equal(b, layer.logits) for b, layer in zip(before, slb.slb_layers(q)))
    for mod in q.modules():
        mod.training = False
    frozen = slb.freeze(q)
    with torch.no_grad():
        y = q(x)
        assert y.dtype == dtype and torch.isfinite(y).all() and torch.equal(frozen(x), y)
    if importlib.util.find_spec("torchao") is not None:
        ao = slb.to_torchao(frozen)
        with torch.no_grad():
            # NB: torchao's kernels round in another order (torch 2.11's float16 path: 1.8 eps apart);
            # the bound is a few units of the dtype's rounding at the outputs' scale
            ref = frozen(x)
            torch.testing.assert_close(ao(x), ref, rtol=8 * eps, atol=8 * eps * float(ref.abs().max()))


class _TwoHeads(nn.Module):
    """One weight tied between two Linears (aux.weight = head.weight), both called."""

    def __init__(self):
        super().__init__()
        self.fc, self.head, self.aux = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.aux.weight = self.head.weight

    def forward(self, x):
        v = torch.relu(self.fc(x))
        return self.head(v) + self.aux(v)


@pytest.mark.parametrize("form,layers,frontend", [("module", "all", "auto"), ("module", None, "auto"),
                                                  ("graph", "all", "auto"), ("graph", None, "auto"),
                                                  ("graph", "all", "export")])
def test_a_weight_tied_between_two_linears_is_one_slb_weight(form, layers, frontend):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    q = slb.quantize(_TwoHeads(), x, bits=2, layers=layers, form=form, frontend=frontend)
    assert q.head.parametrizations.weight.original is q.aux.parametrizations.weight.original
    names = [layer.name for layer in slb.slb_layers(q)]
    assert len([n for n in names if n in ("head.weight", "aux.weight")]) == 1  # one SLB weight
    q.train()
    q(x).sum().backward()
    assert q.head.parametrizations.weight.original.grad is not None
    for mod in q.modules():
        mod.training = False
    assert torch.equal(q.head.weight, q.aux.weight)
    frozen = slb.freeze(q)
    assert frozen.head.weight is frozen.aux.weight
    with torch.no_grad():
        assert torch.equal(frozen(x), q(x))
    if importlib.util.find_spec("torchao") is not None:
        ao = slb.to_torchao(frozen)
        assert ao.head.weight is ao.aux.weight  # torchao's tensor in both Linears
        with torch.no_grad():
            torch.testing.assert_close(ao(x), frozen(x), rtol=1e-5, atol=1e-5)


def test_a_short_schedule_trains_the_logits_in_its_first_epoch(caplog):
    """epochs=1 (floor(0.6 * 1) = 0) used to start hard, the logits frozen before the first step."""
    q = slb.quantize(_net(), X, bits=2)
    with caplog.at_level("WARNING", logger="otofx"):
        sched = slb.Schedule(q, epochs=1)
    assert "no soft epoch" in caplog.text
    assert (sched.e0, sched.e1) == (0, 1) and not sched.hard(0)
    layer = slb.slb_layers(q)[0]
    assert layer.logits.requires_grad and not bool(layer.slb.hard)
    before = layer.logits.detach().clone()
    q.train()
    q(X).square().mean().backward()
    torch.optim.SGD(q.parameters(), lr=0.1).step()
    assert not torch.equal(before, layer.logits)
    sched.step()
    assert bool(layer.slb.hard) and not layer.logits.requires_grad
    sched = slb.Schedule(q, epochs=2)  # floor(1.2) = 1: one soft epoch, one hard, as before
    assert [sched.hard(e) for e in range(2)] == [False, True]
    for kwargs, arg in [(dict(epochs=True), "epochs"), (dict(epochs=2.0), "epochs"), (dict(epochs=-1), "epochs"),
                        (dict(epochs=5, t_end=0.0, t_start=0.0), "t_end"), (dict(epochs=5, t_start="0.2"), "t_start"),
                        (dict(epochs=5, t_factor=float("nan")), "t_factor"),
                        (dict(epochs=5, calibration_batches=0), "calibration_batches")]:
        with pytest.raises(InputError, match=arg):
            slb.Schedule(q, **kwargs)


def test_non_finite_frozen_weights_are_named(caplog):
    """A diverged run: freeze warns and to_torchao raises, naming the layer (was an IndexError)."""
    q = slb.quantize(_net(), X, bits=2)
    bad = next(layer for layer in slb.slb_layers(q) if layer.slb.scale is not None)
    with torch.no_grad():
        bad.slb.scale[0] = float("nan")
    q.eval()
    with caplog.at_level("WARNING", logger="otofx"):
        frozen = slb.freeze(q)
    assert bad.name in caplog.text and "non-finite" in caplog.text
    if importlib.util.find_spec("torchao") is not None:
        with pytest.raises(InputError, match=rf"'{bad.name}' \(scale and weights\)"):
            slb.to_torchao(frozen)


def test_bad_arguments_raise_input_errors_naming_them():
    m = _net()
    cases = [(dict(layers=5), "layers=5"), (dict(layers=[5]), "layers entry 5"), (dict(layers=[]), r"layers=\[\]"),
             (dict(layers=True), "layers=True"), (dict(bits=True), "bits"), (dict(bits=2.0), "bits"),
             (dict(bits=9), "bits"), (dict(scale="yes"), "scale"), (dict(warm_start="0.1"), "warm_start"),
             (dict(warm_start=True), "warm_start"), (dict(warm_start=float("inf")), "warm_start"),
             (dict(act_quant="max"), "act_quant"), (dict(act_bits=True), "act_bits"), (dict(form=1), "form")]
    for form in ("graph", "auto"):
        for kwargs, match in cases:
            with pytest.raises(InputError, match=match):
                slb.quantize(m, X, **{"bits": 2, "form": form, **kwargs})
    q = slb.quantize(m, X, bits=2)
    with pytest.raises(InputError, match="batches"):
        slb.freeze(q, LOADER, batches=0)
    with pytest.raises(InputError, match="batches"):
        slb.calibrate_bn(q, LOADER, batches="2")
    with pytest.raises(InputError, match="layers=5"):
        ste_quantize(m, X, 2, layers=5)
