"""Exchange formats: a compressed model exports with ``torch.export`` and ``torch.onnx.export``, and
ONNX Runtime computes what the compressed model computes.

Written for either form of ``oto.compress()`` (the GraphModule, or the model's own class), and run
as well on a model narrowed by hand (the module form by construction).
"""
from __future__ import annotations

import handpruned as H
import pytest
import torch
from helpers import randomize, zero_random_rows
from torch.utils._pytree import tree_flatten

import otofx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter is written with it
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


def _leaves(y) -> list:
    return [t for t in tree_flatten(y)[0] if isinstance(t, torch.Tensor)]


def _check_exports(small: torch.nn.Module, args: tuple) -> None:
    """torch.export and ONNX Runtime give ``small``'s outputs (to 1e-5 relative, float32)."""
    with torch.no_grad():
        ref = _leaves(small(*args))
        ep = torch.export.export(small, args, strict=False)
        got = _leaves(ep.module()(*args))
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    program = torch.onnx.export(ep, args, dynamo=True, verbose=False)
    proto = program.model_proto
    onnx.checker.check_model(proto)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    outs = sess.run(None, feeds)
    assert len(outs) == len(ref)
    for a, b in zip(ref, outs):
        scale = max(1.0, a.abs().max().item())
        assert b.shape == tuple(a.shape)
        assert abs(torch.from_numpy(b) - a).max().item() <= 1e-5 * scale


def test_compressed_resnet18_exports_to_onnx():
    model = randomize(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto)
    small = oto.compress()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    _check_exports(small, (x,))


def test_compressed_bert_exports_to_onnx():
    torch.manual_seed(0)
    model = randomize(transformers.BertModel(H.bert_config())).eval()
    ids = torch.randint(0, 100, (2, 8))
    oto = otofx.OTO(model, ids)
    zero_random_rows(model, oto)
    small = oto.compress()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    _check_exports(small, (ids,))


def test_hand_pruned_bert_exports_to_onnx():
    model, ids = H.bert()
    _check_exports(model, (ids,))
