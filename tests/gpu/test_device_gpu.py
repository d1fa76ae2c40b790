"""Compressed models on CUDA: compressed on the CPU then moved, compressed where they live (bf16 on
CUDA), and ``torch.compile(backend="otofx")`` on CUDA models, each against the dense model.

Skipped without CUDA. # NB: float32 comparisons turn TF32 off (cuDNN convolutions use it by
default; tests/gpu/conftest.py's ``no_tf32``), which would otherwise put both models ~1e-3 apart.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

import otofx
import otofx.backend as B
from helpers import n_params, randomize, zero_random_rows
from otofx.pipeline import contraction_depth, outputs_close, run_eval

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_backend():
    torch._dynamo.reset()
    B.clear_results()
    yield
    torch._dynamo.reset()


def _llama():
    c = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                 use_cache=False)
    return randomize(transformers.LlamaModel(c).eval()), torch.randint(0, 100, (2, 16))


def _resnet():
    return randomize(torchvision.models.resnet18(num_classes=10).eval()), torch.randn(2, 3, 64, 64)


BUILD = {"llama": _llama, "resnet18": _resnet}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def _close(dense, small, x, dtype, depth):
    want, got = _first(run_eval(dense, (x,))), _first(run_eval(small, (x,)))
    assert got.device.type == "cuda" and got.dtype == want.dtype
    ok, err = outputs_close(want, got, dtype=dtype, depth=depth)
    assert ok, f"relative error {err:.3g}"


@pytest.mark.parametrize("name,form", [("llama", "graph"), ("llama", "module"), ("resnet18", "graph"),
                                       ("resnet18", "module")])
def test_compressed_on_cpu_then_moved_to_cuda(name, form):
    model, x = BUILD[name]()
    oto = otofx.OTO(model, x, frontend="export" if name == "llama" else "auto")
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form=form).to(CUDA)
    dense = copy.deepcopy(model).to(CUDA)
    _close(dense, small, x.to(CUDA), torch.float32, 1)


@pytest.mark.parametrize("name", ["llama", "resnet18"])
def test_compress_a_cuda_bf16_model(name):
    model, x = BUILD[name]()
    model = model.to(CUDA, torch.bfloat16)
    x = x.to(CUDA, torch.bfloat16) if x.is_floating_point() else x.to(CUDA)
    oto = otofx.OTO(model, x, frontend="export" if name == "llama" else "auto")
    zero_random_rows(model, oto, seed=1)
    for form in ("auto", "graph"):
        small = oto.compress(form=form)  # verified against the dense model on CUDA
        assert n_params(small) < n_params(model)
        assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in small.parameters())
        _close(model, small, x, torch.bfloat16, contraction_depth(oto.graph_module))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_on_a_cuda_model(dtype):
    model, x = _resnet()
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    model = model.to(CUDA, dtype)
    x = x.to(CUDA, dtype)
    compiled = torch.compile(model, backend="otofx")
    with torch.inference_mode():
        got = compiled(x)
        want = model(x)
    (res,) = B.results()
    assert res.pruned, res.reason
    ok, err = outputs_close(want, got, dtype=dtype, depth=18)
    # NB: inductor fuses and reorders the float32 sums too; its own checks allow 1e-4 relative
    assert ok, f"relative error {err:.3g}"


def test_load_onto_cuda_in_bf16(tmp_path):
    model, x = _resnet()
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    otofx.save(small, tmp_path / "small")
    loaded = otofx.load(tmp_path / "small", torchvision.models.resnet18(num_classes=10), device="cuda",
                        dtype=torch.bfloat16)
    _close(small.to(CUDA, torch.bfloat16), loaded, x.to(CUDA, torch.bfloat16), torch.bfloat16, 18)


def test_compress_cuda_float32_with_tf32_on():
    """torch's default on CUDA runs float32 convolutions in TF32 (10 mantissa bits): verification
    fits its tolerance to that (otofx.pipeline.tf32_in_use) instead of failing at 1e-4."""
    torch.backends.cudnn.allow_tf32 = True
    model, x = _resnet()
    model, x = model.to(CUDA), x.to(CUDA)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="graph")
    assert n_params(small) < n_params(model)
    _close(model, small, x, torch.float16, contraction_depth(oto.graph_module))
