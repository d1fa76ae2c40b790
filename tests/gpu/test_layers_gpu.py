"""The replacement layers that have only run on the CPU, on CUDA: compressed on the CPU, moved to the GPU.

Each model has a layer family whose compressed form is one of otofx's own modules or a kept constant:
``PrunedRNN`` (an LSTM and a GRU, two layers, bidirectional, cuDNN on CUDA), a projected LSTM and an
LSTMCell stepped in a loop (stock layers at the new sizes), weight norm (a HiFi-GAN
style vocoder with ``parametrizations.weight_norm``), ConvNeXt V2's ``PrunedGlobalResponseNorm``
(timm ``convnextv2_atto``), MLP-Mixer's ``PrunedLayerNorm.fill`` (timm ``mixer_s32_224``) and the
NF-nets' weight-standardised ``PrunedStdConv2d`` (timm ``nf_regnet_b0``), a user's layer norm module
``PrunedOwnLayerNorm`` (the official ConvNeXt's, written out). Uneven
rows of every group are zeroed (``zero_random_rows``), ``compress()`` runs on the CPU in float32,
then both models move to CUDA. Checked: eval outputs within the dtype-fitting tolerance
(``otofx.verify.outputs_close``) in float32, bfloat16 and float16, and in float32 a training step's
forward and backward (finite gradients on every parameter, outputs equal).

Skipped without CUDA. # NB: float32 comparisons turn TF32 off (cuDNN uses it by default for
convolutions and RNNs), which would put both models ~1e-3 apart for reasons unrelated to pruning.
"""
from __future__ import annotations

import copy

import pytest
import torch

import otofx
from helpers import n_params, randomize, zero_random_rows
from otofx.verify import contraction_depth, outputs_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _rnn(kind):
    from test_recurrent import Seq, make, seq_input

    def build():
        rnn = make(kind, num_layers=2, bidirectional=True, batch_first=True)
        model = Seq(rnn, read_state=True)
        return model, seq_input(rnn, 5, 2), seq_input(rnn, 9, 4, seed=1)
    return build


def _example(name, other_shape):
    """A rule example (tests/rule_examples) and a second input of another batch and length."""
    def build():
        import rule_examples

        model, x = getattr(rule_examples, name)()
        return model, x, torch.randn(*other_shape, generator=torch.Generator().manual_seed(1))
    return build


def _vocoder():
    from test_weight_norm import Vocoder, _parametrized

    model = Vocoder(_parametrized)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(2, 8, 40, generator=g), torch.randn(3, 8, 64, generator=g)


def _timm(name, **kw):
    def build():
        timm = pytest.importorskip("timm")
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        g = torch.Generator().manual_seed(1)
        return model, torch.randn(1, 3, 64, 64, generator=g), torch.randn(4, 3, 64, 64, generator=g)
    return build


MODELS = {
    "lstm": _rnn("LSTM"),
    "gru": _rnn("GRU"),
    "lstm_projection": _example("lstm_projection_two_layers_bidirectional", (9, 3, 5)),
    "lstm_cell_loop": _example("lstm_cell_loop_over_a_size_export", (3, 7, 5)),
    "weight_norm": _vocoder,
    "grn": _timm("convnextv2_atto"),
    "mixer_fill": _timm("mixer_s32_224", img_size=64, drop_rate=0.0),
    "std_conv": _timm("nf_regnet_b0"),
    "own_layer_norm": lambda: _own_layer_norm(),
}


def _own_layer_norm():
    """The official ConvNeXt's hand-written LayerNorm (channels first) and its F.layer_norm class: PrunedOwnLayerNorm."""
    from test_written_layer_norm import ConvNeXtish

    g = torch.Generator().manual_seed(0)
    return ConvNeXtish(), torch.randn(2, 3, 32, 32, generator=g), torch.randn(4, 3, 48, 48, generator=g)

_PAIRS: dict = {}


def compressed_pair(name):
    """(dense model with uneven rows of every group zeroed, its compressed model, a test input), on the CPU."""
    if name not in _PAIRS:
        torch.manual_seed(0)
        model, example, x = MODELS[name]()
        model = randomize(model.eval())
        oto = otofx.OTO(model, example)
        zero_random_rows(model, oto, seed=0)
        small = oto.compress().eval()
        assert n_params(small) < n_params(model), name
        _PAIRS[name] = model, small, x
    return _PAIRS[name]


def check_eval(device, name, dtype):
    """Both models on ``device`` in ``dtype``, eval mode: outputs within the dtype-fitting tolerance, or, in
    half precision, the compressed model no further from the dense model run in float64 than twice the
    dense model's own distance from it (both carry their own roundings: MLP-Mixer in float16 is 1.2x the
    statistical bound apart while the compressed one is the closer of the two to float64)."""
    dense, small, x = compressed_pair(name)
    d = copy.deepcopy(dense).to(device=device, dtype=dtype)
    s = copy.deepcopy(small).to(device=device, dtype=dtype)
    xd = x.to(device=device, dtype=dtype)
    with torch.inference_mode():
        try:
            ref = d(xd)
        except RuntimeError as e:  # the dense model itself cannot run in this dtype on this device
            pytest.skip(f"the dense {name} does not run in {dtype} on {device}: {e}")
        got = s(xd)
    assert ref.abs().max().item() > 0, "reference output is all zero"
    ok, err = outputs_close(ref, got, 1e-4, dtype=dtype, depth=contraction_depth(dense))
    if ok or dtype == torch.float32:
        assert ok, f"{name}: compressed differs from dense with zeroed rows on {device} in {dtype}: relative error {err:.3g}"
        return err
    with torch.inference_mode():
        truth = copy.deepcopy(dense).to(device=device, dtype=torch.float64)(x.to(device=device, dtype=torch.float64))
    scale = truth.abs().max().clamp_min(1.0)
    e_dense = ((ref.double() - truth).abs().max() / scale).item()
    e_small = ((got.double() - truth).abs().max() / scale).item()
    assert e_small <= 2 * e_dense, (f"{name} in {dtype} on {device}: the compressed model is {e_small:.3g} from the dense "
                                    f"model in float64, the dense model in {dtype} {e_dense:.3g}; they differ by {err:.3g}")
    return err


def check_train_step(device, name):
    """Float32, training mode: one forward and backward on ``device``; outputs agree, gradients finite."""
    dense, small, x = compressed_pair(name)
    d = copy.deepcopy(dense).to(device).train()
    s = copy.deepcopy(small).to(device).train()
    x = x.to(device)
    ref, got = d(x), s(x)
    ok, err = outputs_close(ref.detach(), got.detach(), 1e-4, depth=contraction_depth(dense))
    assert ok, f"{name}: training-mode outputs differ on {device}: relative error {err:.3g}"
    got.square().mean().backward()
    for n, p in s.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.device.type == torch.device(device).type, n
            assert torch.isfinite(p.grad).all(), f"{name}: gradient of {n} is not finite"
    return err


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compressed_layer_on_cuda(name, dtype):
    check_eval("cuda", name, DTYPES[dtype])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compressed_layer_trains_on_cuda(name):
    check_train_step("cuda", name)
