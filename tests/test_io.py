"""otofx.save / otofx.load: a pickle-free folder (safetensors + JSON) that rebuilds a compressed model.

Round trips for a narrowed torchvision resnet18 (into a fresh dense instance, also one built on the
meta device), Hugging Face BERT, LLaMA and GPT-2 (rebuilt from the saved config alone), a model
holding a PrunedMultiheadAttention, and whatever ``oto.compress()`` returns; then the errors.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import handpruned as H
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from helpers import snapshot

import otofx
from otofx.errors import InputError

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else y[0]


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any call of pickle's or torch's loaders fails the test."""

    def refuse(*a, **k):
        raise AssertionError("otofx.load unpickled something")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                      (torch.serialization, "load")):
        monkeypatch.setattr(mod, name, refuse)


def _files(folder: Path) -> set:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(scope="module")
def resnet_saved(tmp_path_factory):
    """(narrowed resnet18, input, its save folder); tests must not change the model."""
    model, x = H.resnet18()
    folder = otofx.save(model, tmp_path_factory.mktemp("io") / "small")
    return model, x, folder


def test_resnet18_round_trip_into_fresh_dense_instance(resnet_saved, no_unpickling):
    model, x, folder = resnet_saved
    assert _files(folder) == {"model.safetensors", "otofx.json"}
    fresh = torchvision.models.resnet18(num_classes=10)  # dense, training mode
    loaded = otofx.load(folder, fresh)
    assert loaded is fresh  # resized in place
    assert loaded.layer2[1].conv1.weight.shape == model.layer2[1].conv1.weight.shape != (128, 128, 3, 3)
    assert loaded.layer2[1].conv1.out_channels == model.layer2[1].conv1.out_channels
    assert loaded.layer2[1].bn1.num_features == model.layer2[1].bn1.num_features
    assert snapshot(loaded) == snapshot(model)  # every tensor and every training flag (eval)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert torch.equal(_out(loaded, x), _out(model, x))


def test_resnet18_loads_into_meta_instance_on_device_and_dtype(resnet_saved):
    model, x, folder = resnet_saved
    with torch.device("meta"):
        fresh = torchvision.models.resnet18(num_classes=10)
    loaded = otofx.load(folder, fresh, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in loaded.parameters())
    assert loaded.layer1[0].bn1.num_batches_tracked.dtype == torch.long  # only floating tensors are cast
    model64 = H.resnet18()[0].double()
    assert torch.allclose(_out(loaded, x.double()), _out(model64, x.double()), rtol=1e-12, atol=1e-12)


def test_requires_grad_and_frozen_parameters_survive(tmp_path):
    model, _ = H.resnet18()
    model.conv1.weight.requires_grad_(False)
    folder = otofx.save(model, tmp_path / "frozen")
    loaded = otofx.load(folder, torchvision.models.resnet18(num_classes=10))
    assert not loaded.conv1.weight.requires_grad and loaded.fc.weight.requires_grad


def test_bert_rebuilt_from_config_alone(tmp_path, no_unpickling):
    model, ids = H.bert()
    folder = otofx.save(model, tmp_path / "bert")
    assert _files(folder) == {"model.safetensors", "otofx.json", "config.json"}
    loaded = otofx.load(folder)
    assert type(loaded) is transformers.BertModel
    att = loaded.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.query.weight.shape == (16, 32)
    assert loaded.encoder.layer[1].intermediate.dense.weight.shape == (20, 32)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert torch.equal(_out(loaded, ids), _out(model, ids))


def test_gpt2_tied_weights_stored_once_and_tied_again(tmp_path):
    from safetensors import safe_open

    model, ids = H.gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    folder = otofx.save(model, tmp_path / "gpt2")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    loaded = otofx.load(folder)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert loaded.transformer.h[0].mlp.c_fc.weight.shape == (32, 50)
    assert torch.equal(_out(loaded, ids), _out(model, ids))


def test_llama_round_trip_and_bfloat16(tmp_path):
    model, ids = H.llama()
    folder = otofx.save(model, tmp_path / "llama")
    loaded = otofx.load(folder)
    assert loaded.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    assert loaded.model.layers[1].mlp.intermediate_size == 25
    assert torch.equal(_out(loaded, ids), _out(model, ids))
    half = otofx.load(folder, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    ref = _out(model.to(torch.bfloat16), ids)
    assert torch.equal(_out(half, ids), ref)


def test_pruned_multihead_attention_is_rebuilt(tmp_path):
    from otofx.passes.modules import PrunedMultiheadAttention

    model, x = H.attn_net()
    folder = otofx.save(model, tmp_path / "attn")
    loaded = otofx.load(folder, H.AttnNet())
    assert isinstance(loaded.attn, PrunedMultiheadAttention) and loaded.attn.num_heads == 2
    assert loaded.attn.kept_heads.tolist() == [0, 3]
    assert torch.equal(_out(loaded, x), _out(model, x))


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_what_compress_returns(tmp_path):
    """The module form round-trips; a GraphModule is refused with the way out in the message."""
    from helpers import randomize, zero_random_rows

    model = randomize(_SmallCNN().eval())
    x = torch.randn(2, 3, 8, 8)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto)
    small = oto.compress()
    if isinstance(small, fx.GraphModule):
        with pytest.raises(InputError, match="module form"):
            otofx.save(small, tmp_path / "graph")
        assert not (tmp_path / "graph").exists()
    else:
        folder = otofx.save(small, tmp_path / "module")
        loaded = otofx.load(folder, _SmallCNN())
        assert torch.equal(_out(loaded, x), _out(small, x))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_graph_module_refused(tmp_path):
    with pytest.raises(InputError, match=r"GraphModule.*oto\.compress\(form='module'\)"):
        otofx.save(fx.symbolic_trace(_SmallCNN()), tmp_path / "g")


def test_instance_level_forward_refused(tmp_path):
    model = _SmallCNN()
    model.fc.forward = lambda x: x
    with pytest.raises(InputError, match="submodule 'fc' has its own `forward`"):
        otofx.save(model, tmp_path / "f")


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        otofx.load(tmp_path / "nowhere", _SmallCNN())
    folder = otofx.save(_SmallCNN(), tmp_path / "cnn")
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match="has no model.safetensors"):
        otofx.load(folder, _SmallCNN())


def test_bert_without_config_json(tmp_path):
    model, _ = H.bert()
    folder = otofx.save(model, tmp_path / "bert")
    (folder / "config.json").unlink()
    with pytest.raises(InputError, match="has no config.json"):
        otofx.load(folder)


def test_non_hugging_face_model_needs_model_argument(tmp_path):
    folder = otofx.save(_SmallCNN(), tmp_path / "cnn")
    with pytest.raises(InputError, match=r"_SmallCNN, not a Hugging Face model: pass .*model="):
        otofx.load(folder)


def test_class_mismatch(resnet_saved):
    folder = resnet_saved[2]
    with pytest.raises(InputError, match=r"holds a torchvision\.models\.resnet\.ResNet but model= is a .*MobileNetV3"):
        otofx.load(folder, torchvision.models.mobilenet_v3_small())


def test_structure_mismatch_names_the_module_and_leaves_model_untouched(resnet_saved):
    folder = resnet_saved[2]
    fresh = torchvision.models.resnet18(num_classes=10)
    fresh.layer3[0].conv1 = nn.Linear(4, 4)
    before = snapshot(fresh)
    with pytest.raises(InputError, match=r"module 'layer3\.0\.conv1' is a torch\.nn\.modules\.linear\.Linear"):
        otofx.load(folder, fresh)
    assert snapshot(fresh) == before
    # a deeper model: tensors the saved one lacks
    with pytest.raises(InputError, match=r"'layer1\.2\.conv1\.weight' of the given model has no saved value"):
        otofx.load(folder, torchvision.models.resnet34(num_classes=10))


def test_parameter_rank_mismatch_names_the_parameter(tmp_path):
    folder = otofx.save(_SmallCNN(), tmp_path / "cnn")
    fresh = _SmallCNN()
    fresh.fc.weight = nn.Parameter(torch.zeros(24))
    with pytest.raises(InputError, match=r"parameter 'fc\.weight' has 1 dimensions .* saved one has shape \[4, 6\]"):
        otofx.load(folder, fresh)
    missing = _SmallCNN()
    del missing.bn1.running_mean
    with pytest.raises(InputError, match=r"'bn1' \(BatchNorm2d\) of the given model has no buffer 'running_mean'"):
        otofx.load(folder, missing)


def test_bad_save_targets_and_dtype(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        otofx.save(_SmallCNN(), tmp_path / "file")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt"):
        otofx.save(_SmallCNN(), tmp_path / "busy")
    folder = otofx.save(_SmallCNN(), tmp_path / "cnn")
    otofx.save(_SmallCNN(), folder)  # an earlier save's folder is overwritten
    with pytest.raises(InputError, match="floating-point"):
        otofx.load(folder, _SmallCNN(), dtype=torch.int8)
    fresh = _SmallCNN()
    before = snapshot(fresh)
    with pytest.raises(InputError, match="device='nowhere'"):
        otofx.load(folder, fresh, device="nowhere")
    assert snapshot(fresh) == before


def test_damaged_manifest(tmp_path):
    import json

    folder = otofx.save(_SmallCNN(), tmp_path / "cnn")
    manifest = json.loads((folder / "otofx.json").read_text())
    manifest["modules"][1]["attrs"]["__class__"] = "x"
    (folder / "otofx.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="damaged: attribute name '__class__' of module 'conv1'"):
        otofx.load(folder, _SmallCNN())
    manifest["format_version"] = 99
    (folder / "otofx.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format version 99"):
        otofx.load(folder, _SmallCNN())
