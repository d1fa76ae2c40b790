"""Compressed vit_b_16 and BERT-base on CUDA, float32 and bfloat16, against the dense models.

Full-size torchvision ``vit_b_16`` (input 3x224x224; the dense model keeps ``nn.MultiheadAttention``'s
fused inference path, the compressed one runs ``PrunedMultiheadAttention`` on the flash/efficient
SDPA kernels) and a BERT-base-sized Hugging Face ``BertForSequenceClassification`` (random weights,
``input_ids`` 4x128 with padding in ``attention_mask``). Half of every group's rows is zeroed (the
hidden width too: the compressed LayerNorms are ``PrunedLayerNorm``s, which keep the old divisor), the
analysis and ``compress()`` run on the CPU in float32, then both models move to CUDA in the dtype
and must agree within the pipeline's dtype-fitting tolerance (``otofx.pipeline.outputs_close``:
1e-4 in float32, ``2 u sqrt(depth)`` in bfloat16).

Skipped without CUDA. # NB: float32 comparisons turn TF32 off (cuDNN convolutions use it by
default), which would otherwise put both models ~1e-3 apart for reasons unrelated to pruning.
"""
from __future__ import annotations

import copy

import pytest
import torch

import otofx
from helpers import n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedLayerNorm, PrunedMultiheadAttention
from otofx.pipeline import contraction_depth, outputs_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _vit():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    return model, (torch.randn(1, 3, 224, 224),), {}, (torch.randn(4, 3, 224, 224),), {}


def _bert():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=3))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=g)
    mask = torch.ones(4, 128, dtype=torch.long)
    mask[1, 100:] = 0
    mask[3, 17:] = 0
    return model, (ids[:1],), {}, (ids,), {"attention_mask": mask}


def compressed_pair(build):
    """(dense model with half of every group's rows zeroed, its compressed model, test args, kwargs), on the CPU."""
    model, example, _, args, kwargs = build()
    model = randomize(model.eval())
    oto = otofx.OTO(model, *example)
    zero_random_rows(model, oto, seed=0)
    small = oto.compress().eval()
    assert n_params(small) < n_params(model)
    return model, small, args, kwargs


def check_on(device, dense, small, args, kwargs, dtype):
    """Both models moved to ``device`` in ``dtype``: outputs within the dtype-fitting tolerance; returns the error."""
    d = copy.deepcopy(dense).to(device=device, dtype=dtype)
    s = copy.deepcopy(small).to(device=device, dtype=dtype)

    def move(t):
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() else t

    args = tuple(move(a) for a in args)
    kwargs = {k: move(v) for k, v in kwargs.items()}
    with torch.inference_mode():
        ref, got = d(*args, **kwargs), s(*args, **kwargs)
    ok, err = outputs_close(ref, got, 1e-4, dtype=dtype, depth=contraction_depth(dense))
    leaf = ref if isinstance(ref, torch.Tensor) else ref[0]
    assert leaf.abs().max().item() > 0, "reference output is all zero"
    assert ok, f"compressed differs from dense with zeroed rows on {device} in {dtype}: relative error {err:.3g}"
    return err


@pytest.fixture(scope="module")
def vit():
    return compressed_pair(_vit)


@pytest.fixture(scope="module")
def bert():
    return compressed_pair(_bert)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_vit_b_16_on_cuda(vit, dtype):
    dense, small, args, kwargs = vit
    attn = small.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 6
    assert isinstance(small.encoder.ln, PrunedLayerNorm) and small.hidden_dim == 384  # the residual stream too
    check_on("cuda", dense, small, args, kwargs, DTYPES[dtype])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_bert_base_on_cuda(bert, dtype):
    dense, small, args, kwargs = bert
    assert small.bert.encoder.layer[0].attention.self.query.weight.shape == (384, 384)
    assert isinstance(small.bert.embeddings.LayerNorm, PrunedLayerNorm)  # the hidden width, under LayerNorms
    check_on("cuda", dense, small, args, kwargs, DTYPES[dtype])
