"""Weight norm (W = g * v / ||v||): weight-normed conv, conv-transpose and linear layers are groups.

HiFi-GAN-style vocoders, EnCodec/DAC codecs and wav2vec2's positional conv put every width under
``torch.nn.utils.parametrizations.weight_norm`` (or the deprecated ``torch.nn.utils.weight_norm``
hook). ``g`` owns the rows it scales; ``v`` is sliced with them but never zeroed along ``dim``
(0/0); when an input channel is removed, ``v`` keeps its (non-zero) column's share of the norm
out, so ``g`` is refit. Layers: numerical equivalence (both front-ends, both forms, eval and train),
the refit, the optimizers, Hugging Face wav2vec2, save/load, and what stays pinned and why.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import eval_flags, max_rel_diff, n_params, randomize, zero_random_rows, zero_rows
from torch.nn.utils import parametrizations, parametrize

import otofx
from otofx.errors import VerificationError

RTOL = 1e-4


def _parametrized(module, dim=0):
    return parametrizations.weight_norm(module, dim=dim)


def _hooked(module, dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module, dim=dim)


WRAPS = [pytest.param(_parametrized, id="parametrizations"), pytest.param(_hooked, id="deprecated_hook")]


class Vocoder(nn.Module):
    """HiFi-GAN's generator in small: conv_pre, a leaky-relu'd ConvTranspose1d upsampler, residual
    blocks of dilated convs on the upsampled stream, conv_post and tanh; every layer weight-normed."""

    def __init__(self, wn, c: int = 16):
        super().__init__()
        self.conv_pre = wn(nn.Conv1d(8, c, 7, padding=3))
        self.up = wn(nn.ConvTranspose1d(c, c // 2, 4, stride=2, padding=1))
        self.convs1 = nn.ModuleList([wn(nn.Conv1d(c // 2, c // 2, 3, dilation=d, padding=d)) for d in (1, 3)])
        self.convs2 = nn.ModuleList([wn(nn.Conv1d(c // 2, c // 2, 3, padding=1)) for _ in (1, 3)])
        self.conv_post = wn(nn.Conv1d(c // 2, 1, 7, padding=3))

    def forward(self, x):
        x = self.up(F.leaky_relu(self.conv_pre(x), 0.1))
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return torch.tanh(self.conv_post(F.leaky_relu(x, 0.1)))


class MLP(nn.Module):
    """Weight-normed Linear layers: dim 0 (one norm per output row), dim 1 and the whole-tensor norm."""

    def __init__(self, wn=_parametrized):
        super().__init__()
        self.l1 = wn(nn.Linear(6, 16))
        self.l2 = wn(nn.Linear(16, 12), dim=1)
        self.l3 = wn(nn.Linear(12, 10), dim=None)
        self.head = wn(nn.Linear(10, 3))

    def forward(self, x):
        return self.head(F.gelu(self.l3(F.gelu(self.l2(F.gelu(self.l1(x)))))))


def _v_names(model) -> set:
    """Qualified names of every weight-norm v (the tensor divided by its norm)."""
    out = set()
    for name, p in model.named_parameters():
        if name.endswith(".original1") or name.endswith("weight_v"):
            out.add(name)
    return out


def _outputs(module, x, training: bool):
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            m.training = training
        with torch.no_grad():
            return module(x)
    finally:
        for m, f in flags:
            m.training = f


def _check_forms(model, oto, x, verify=True):
    """Both forms of compress() equal the zeroed model, in eval and in train mode; returns them."""
    out = {}
    for form in ("module", "graph"):
        small = oto.compress(form=form, verify=verify)
        assert n_params(small) < n_params(model)
        for training in (False, True):
            err = max_rel_diff(_outputs(model, x, training), _outputs(small, x, training))
            assert err <= RTOL, f"{form} form, training={training}: relative error {err:.3g}"
        out[form] = small
    return out


# ---------------------------------------------------------------------------------------------
# numerical equivalence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
@pytest.mark.parametrize("wn", WRAPS)
def test_vocoder_widths_are_groups_and_compress_exactly(wn, frontend):
    torch.manual_seed(0)
    model = randomize(Vocoder(wn))
    x = torch.randn(2, 8, 12)
    oto = otofx.OTO(model, x, frontend=frontend)
    assert oto.frontend == frontend
    # conv_pre's 16 channels, the upsampled residual stream's 8, each block's inner 8
    assert sorted(z.rows for z in oto.groups) == [8, 8, 8, 16]
    assert [p.reason for p in oto.pinned] == ["model output"]
    assert not {n for z in oto.groups for n, _, _ in z.params} & {
        n for n in _v_names(model) if not n.startswith("up.")}, "a dim-0 conv's v is a zeroable row slice"
    zero_random_rows(model, oto, seed=1)
    smalls = _check_forms(model, oto, torch.randn(3, 8, 12), verify=frontend != "export")
    small = smalls["module"]
    assert type(small) is Vocoder
    for name, m in small.named_modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            if wn is _parametrized:
                assert parametrize.is_parametrized(m, "weight"), f"{name} lost its weight norm"
            else:
                assert hasattr(m, "weight_g") and hasattr(m, "weight_v"), f"{name} lost its weight norm"
            w = m.weight
            transposed = isinstance(m, nn.ConvTranspose1d)
            in_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
            assert (m.in_channels, m.out_channels) == in_out
    assert small.conv_pre.out_channels == 8 and small.up.out_channels == 4


def test_mlp_dims_0_1_and_whole_tensor_compress_exactly():
    torch.manual_seed(0)
    model = randomize(MLP())
    x = torch.randn(4, 5, 6)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [10, 12, 16]
    by_producer = {z.layers[0]: z for z in oto.groups}
    # dim 1: l2's g sits on its input features, in l1's rows; l2's rows are v's (dim 0 is not the norm's)
    l1 = {(n, d) for n, d, _ in by_producer["l1"].params}
    assert ("l2.parametrizations.weight.original0", 1) in l1
    assert ("l1.parametrizations.weight.original0", 0) in l1
    assert ("l2.parametrizations.weight.original1", 0) in {(n, d) for n, d, _ in by_producer["l2"].params}
    # dim=None: g is one scalar; l3's rows are v's
    assert ("l3.parametrizations.weight.original1", 0) in {(n, d) for n, d, _ in by_producer["l3"].params}
    zero_random_rows(model, oto, seed=2)
    small = _check_forms(model, oto, torch.randn(3, 7, 6))["module"]
    assert (small.l1.out_features, small.l2.in_features, small.l2.out_features) == (8, 8, 6)
    assert (small.l3.in_features, small.l3.out_features, small.head.in_features) == (6, 5, 5)
    assert small.l3.parametrizations.weight.original0.dim() == 0


@pytest.mark.parametrize("wn", WRAPS)
def test_removed_input_channels_with_nonzero_v_columns_refit_g(wn, monkeypatch):
    """OTO zeroes the producer's row, not the consumer's v columns: removing them changes ||v_i||,
    which the rewrite folds into g (g_i * ||v_i[kept]|| / ||v_i||). Without the refit, both forms
    differ from the dense model."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(), wn(nn.Conv1d(8, 6, 3, padding=1)),
                                    nn.ReLU(), nn.Conv1d(6, 4, 1)))
    x = torch.randn(2, 4, 10)
    oto = otofx.OTO(model, x)
    first = next(z for z in oto.groups if z.layers[0] == "0")
    zero_rows(model, oto, [[0, 2, 5] if z is first else [] for z in oto.groups])
    v = model[2].parametrizations.weight.original1 if wn is _parametrized else model[2].weight_v
    g = model[2].parametrizations.weight.original0 if wn is _parametrized else model[2].weight_g
    assert (v[:, [0, 2, 5]].abs().sum((0, 2)) > 0).all(), "the test needs non-zero v columns"
    smalls = _check_forms(model, oto, torch.randn(3, 4, 9))
    for small in smalls.values():
        layer = small.get_submodule("2")
        g_new = layer.parametrizations.weight.original0 if wn is _parametrized else layer.weight_g
        kept = [1, 3, 4, 6, 7]
        ratio = v[:, kept].norm(dim=(1, 2)) / v.norm(dim=(1, 2))
        torch.testing.assert_close(g_new.detach().reshape(-1), (g.reshape(-1) * ratio).detach())

    import otofx.passes.prune as prune_mod
    import otofx.rebuild as rebuild_mod

    monkeypatch.setattr(prune_mod, "refit_gains", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(rebuild_mod, "refit_gains", lambda *a, **k: None)
    import otofx.passes.weightnorm as wn_mod

    monkeypatch.setattr(wn_mod, "refit_gains", lambda *a, **k: None)
    for form in ("module", "graph"):
        with pytest.raises(VerificationError):
            oto.compress(form=form)


def test_conv_transpose_default_dim_is_its_input_axis():
    """ConvTranspose's weight is [in, out, k]: weight_norm's default dim 0 puts g on the input
    channels (in the producer's rows) and leaves v as the only slice that zeroes an output channel."""
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), _parametrized(nn.ConvTranspose1d(8, 6, 4, stride=2)),
                                    nn.ReLU(), nn.Conv1d(6, 2, 1)))
    x = torch.randn(2, 3, 9)
    oto = otofx.OTO(model, x)
    params = {z.layers[0]: {(n, d) for n, d, _ in z.params} for z in oto.groups}
    assert params["0"] == {("0.weight", 0), ("0.bias", 0), ("2.parametrizations.weight.original0", 0)}
    assert params["2"] == {("2.parametrizations.weight.original1", 1), ("2.bias", 0), ("4.weight", 1)}
    zero_random_rows(model, oto, seed=3)
    small = _check_forms(model, oto, torch.randn(2, 3, 11))["module"]
    assert (small[2].in_channels, small[2].out_channels) == (4, 3)


# ---------------------------------------------------------------------------------------------
# optimizers
# ---------------------------------------------------------------------------------------------


def test_dhspg_never_steps_v_as_a_row_and_stays_finite():
    torch.manual_seed(0)
    model = randomize(Vocoder(_parametrized))
    x, y = torch.randn(8, 8, 12), torch.randn(8, 1, 24).tanh()
    oto = otofx.OTO(model, x[:2])
    opt = oto.dhspg(lr=0.05, lmbda=0.5, epsilon=0.9, start_pruning_steps=2, target_group_sparsity=0.5)
    vs = {id(p) for n, p in model.named_parameters() if n in _v_names(model) and not n.startswith("up.")}
    assert vs and not vs & {id(p) for p in opt._row_params}, "DHSPG's rows hold a v of a dim-0 conv"
    v_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in _v_names(model)}
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.group_sparsity >= 0.25, f"DHSPG pruned {opt.group_sparsity:.2f} of the rows"
    for n, p in model.named_parameters():
        if n in v_before and not n.startswith("up."):
            # NB: a v row at zero is 0/0: training never zeroes one
            assert (p.detach().flatten(1).norm(dim=1) > 0).all(), n
            assert not torch.equal(p.detach(), v_before[n]), f"{n} was not trained"
    small = oto.compress()
    assert n_params(small) < n_params(model)
    with torch.no_grad(), eval_flags(model):
        assert max_rel_diff(model(x), small(x)) <= RTOL


def test_hesso_rows_hold_no_dim0_v():
    model = Vocoder(_parametrized)
    oto = otofx.OTO(model, torch.randn(2, 8, 12))
    opt = oto.hesso(pruning_steps=4)
    rows = {id(p) for p in opt._row_params}
    vs = {id(p) for n, p in model.named_parameters() if n in _v_names(model) and not n.startswith("up.")}
    gs = {id(p) for n, p in model.named_parameters()
          if n.endswith(".original0") and not n.startswith("conv_post.")}  # NB: conv_post's one row is the output
    assert not vs & rows and gs <= rows


# ---------------------------------------------------------------------------------------------
# Hugging Face wav2vec2: the positional conv is weight-normed and sits on the residual stream
# ---------------------------------------------------------------------------------------------


def test_wav2vec2_hidden_width_is_a_group():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                      conv_dim=(16, 16), conv_kernel=(3, 3), conv_stride=(2, 2),
                                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, vocab_size=11)
    torch.manual_seed(0)
    model = randomize(transformers.Wav2Vec2ForCTC(cfg)).eval()
    pos = model.wav2vec2.encoder.pos_conv_embed.conv
    # NB: transformers takes the parametrizations form when torch has it (dim=2: one norm per tap)
    assert parametrize.is_parametrized(pos, "weight") and pos.parametrizations.weight[0].dim == 2
    x = torch.randn(2, 400)
    oto = otofx.OTO(model, x)
    v = "wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"
    hidden = [z for z in oto.groups if any(n == v for n, _, _ in z.params)]
    assert len(hidden) == 1
    names = {n for n, _, _ in hidden[0].params}
    assert {"wav2vec2.feature_projection.projection.weight", "lm_head.weight",
            "wav2vec2.encoder.layers.1.final_layer_norm.weight"} <= names
    assert hidden[0].rows == 4  # the positional conv's 4 conv groups of 8 channels
    zero_rows(model, oto, [[1, 2] if z is hidden[0] else [] for z in oto.groups])
    for form in ("module", "graph"):
        small = oto.compress(form=form)
        with torch.no_grad(), eval_flags(small):
            err = max_rel_diff(model(x).logits, small(x)[0] if form == "graph" else small(x).logits)
        assert err <= RTOL
    small = oto.compress(form="module")
    conv = small.wav2vec2.encoder.pos_conv_embed.conv
    assert parametrize.is_parametrized(conv, "weight")
    assert (conv.in_channels, conv.out_channels, conv.groups) == (16, 16, 2)
    # NB: the hidden width's layer norms keep their old divisor (PrunedLayerNorm), so the config keeps
    # hidden_size and lists the new widths beside it
    assert small.config.otofx_widths["wav2vec2.encoder.pos_conv_embed.conv"] == {
        "in_channels": 16, "out_channels": 16, "groups": 2}


# ---------------------------------------------------------------------------------------------
# the compressed model: training on, state_dict, otofx.save / otofx.load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wn", WRAPS)
def test_compressed_keeps_training_and_round_trips(wn, tmp_path):
    torch.manual_seed(0)
    model = randomize(Vocoder(wn))
    x = torch.randn(2, 8, 12)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=4)
    small = oto.compress()
    assert n_params(small) < n_params(model)
    keys = set(small.state_dict())
    if wn is _parametrized:
        assert {"conv_pre.parametrizations.weight.original0", "conv_pre.parametrizations.weight.original1"} <= keys
    else:
        assert {"conv_pre.weight_g", "conv_pre.weight_v"} <= keys
    small(x).sum().backward()
    g = small.conv_pre.parametrizations.weight.original0 if wn is _parametrized else small.conv_pre.weight_g
    assert g.grad is not None and g.grad.abs().sum() > 0
    folder = otofx.save(small, tmp_path / "small")
    loaded = otofx.load(folder, Vocoder(wn))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))
    assert loaded.conv_pre.out_channels == small.conv_pre.out_channels


# ---------------------------------------------------------------------------------------------
# what stays pinned, and why
# ---------------------------------------------------------------------------------------------


class _Symmetric(nn.Module):
    def forward(self, w):
        return (w + w.transpose(0, 1)) / 2


@pytest.mark.parametrize("wrap,named", [
    (lambda m: parametrizations.spectral_norm(m), "'weight' by _SpectralNorm"),
    (lambda m: parametrizations.orthogonal(m), "'weight' by _Orthogonal"),
    (lambda m: parametrize.register_parametrization(m, "weight", _Symmetric()) or m, "'weight' by _Symmetric"),
    (lambda m: parametrize.register_parametrization(_parametrized(m), "weight", _Symmetric()) or m,
     "'weight' by _WeightNorm then _Symmetric"),
], ids=["spectral_norm", "orthogonal", "user", "weight_norm_then_user"])
def test_other_parametrisations_stay_pinned_and_named(wrap, named):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), wrap(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 6)
    oto = otofx.OTO(model, x)
    reasons = [p.reason for p in oto.pinned if p.node == "_2"]
    assert len(reasons) == 1 and named in reasons[0] and "parametrisation otofx has no rule for" in reasons[0]
    assert not oto.groups


@pytest.mark.parametrize("wn,named", [(_parametrized, "('weight' by _WeightNorm)"),
                                      (_hooked, "('weight' by WeightNorm (the hook of torch.nn.utils.weight_norm))")],
                         ids=["parametrizations", "deprecated_hook"])
def test_weight_norm_on_an_embedding_is_pinned_and_named(wn, named):
    model = nn.Sequential(wn(nn.Embedding(10, 8), dim=1), nn.Linear(8, 4))
    x = torch.randint(0, 10, (2, 5))
    oto = otofx.OTO(model, x)
    reasons = [p.reason for p in oto.pinned if p.node == "_0"]
    assert reasons == [f"weight norm on Embedding: otofx follows it in conv and linear layers only {named}"]
    assert not oto.groups
    with torch.no_grad():
        torch.testing.assert_close(oto.compress()(x), model(x))


def test_input_channel_not_zero_with_its_row_is_pinned():
    """v's columns are not zeroed with the producer's row: sigmoid(0) = 0.5 would leak through them."""
    torch.manual_seed(0)

    def net(wn):
        return nn.Sequential(nn.Conv1d(3, 8, 3), nn.Sigmoid(), wn(nn.Conv1d(8, 4, 3)), nn.ReLU(), nn.Conv1d(4, 2, 1))

    plain = otofx.OTO(net(lambda m: m), torch.randn(2, 3, 9))
    assert sorted(z.rows for z in plain.groups) == [4, 8]
    oto = otofx.OTO(net(_parametrized), torch.randn(2, 3, 9))
    assert [z.rows for z in oto.groups] == [4]
    assert any("weight norm's v is not zeroed" in p.reason for p in oto.pinned)


def test_weight_norm_of_computed_tensors_is_pinned():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 8, 3)
            self.v = nn.Parameter(torch.randn(4, 8, 3))
            self.g = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

        def forward(self, x):
            return F.conv1d(torch.relu(self.c1(x)), torch._weight_norm(self.v * 2, self.g, 0))

    oto = otofx.OTO(M(), torch.randn(2, 3, 9))
    assert not oto.groups
    assert any("weight norm of tensors that are not parameters" in p.reason for p in oto.pinned)


# ---------------------------------------------------------------------------------------------
# a forward that draws noise in eval mode (VITS: the prior sample fed to its weight-normed flow)
# ---------------------------------------------------------------------------------------------


class NoisyPrior(nn.Module):
    """VITS in small: a weight-normed encoder gives mean and log-scale, a sample of the prior
    (``torch.randn_like``, drawn in eval mode too) goes through a weight-normed decoder."""

    def __init__(self):
        super().__init__()
        self.enc = _parametrized(nn.Conv1d(4, 16, 3, padding=1))
        self.stats = _parametrized(nn.Conv1d(16, 8, 1))
        self.dec1 = _parametrized(nn.Conv1d(4, 16, 3, padding=1))
        self.dec2 = _parametrized(nn.Conv1d(16, 2, 1))

    def forward(self, x):
        mean, log_scale = self.stats(F.leaky_relu(self.enc(x), 0.1)).chunk(2, dim=1)
        z = mean + torch.randn_like(mean) * torch.exp(log_scale) * 0.667
        return self.dec2(F.leaky_relu(self.dec1(z), 0.1))


def test_a_forward_that_draws_noise_verifies_and_leaves_the_callers_random_state():
    """Verification runs the reference and the candidate from one random state: before, the two
    runs drew different noise and compress() raised VerificationError on every such model."""
    torch.manual_seed(0)
    model = randomize(NoisyPrior()).eval()
    x = torch.randn(2, 4, 10)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [16, 16]
    zero_random_rows(model, oto, seed=1)
    state = torch.random.get_rng_state()
    small = oto.compress()
    assert torch.equal(torch.random.get_rng_state(), state), "compress() moved the caller's random state"
    assert type(small) is NoisyPrior and n_params(small) < n_params(model)
    x2 = torch.randn(3, 4, 13)
    with torch.no_grad():
        torch.manual_seed(5)
        ref = model(x2)
        torch.manual_seed(5)
        assert max_rel_diff(ref, small(x2)) <= RTOL


@pytest.mark.parametrize("form", ["module", "graph"])
def test_removing_the_compressed_models_weight_norm_leaves_the_users_model_alone(form):
    """A vocoder drops its weight norm for inference (``remove_parametrizations``, which deletes the
    property from the module's class). A deep copy shares that class with the original: the
    compressed model's modules get classes of their own, or the user's model stops running."""
    torch.manual_seed(0)
    model = randomize(Vocoder(_parametrized)).eval()
    x = torch.randn(2, 8, 12)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form=form)
    with torch.no_grad():
        ref, before = model(x), small(x)
    for m in small.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    assert not any(parametrize.is_parametrized(m) for m in small.modules())
    with torch.no_grad():
        torch.testing.assert_close(small(x), before)
        torch.testing.assert_close(model(x), ref)
    assert all(parametrize.is_parametrized(m, "weight") for m in model.modules()
               if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)))
