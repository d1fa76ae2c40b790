"""Every torchvision classification CNN: zero half of every group's rows, compress, exact.

BN statistics, norm affines and biases are randomised first so the check cannot pass on
near-constant activations; the model must be untouched by the analysis, and strictly smaller after.
"""
from __future__ import annotations

import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import otofx  # noqa: E402

from helpers import assert_exact, randomize, snapshot, zero_random_rows  # noqa: E402

TRANSFORMER_FAMILIES = ("vit", "swin", "maxvit")
# NB: regnet_y_128gf (645M parameters) takes minutes just to initialise on two cores
SKIP = {"regnet_y_128gf"}
MODELS = [n for n in torchvision.models.list_models(module=torchvision.models)
          if not n.startswith(TRANSFORMER_FAMILIES) and n not in SKIP]


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, weights=None, **kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_exact(name):
    torch.manual_seed(0)
    model = build(name).eval()
    randomize(model)
    size = 96 if name == "inception_v3" else 64
    x = torch.randn(2, 3, size, size)
    before = snapshot(model)
    oto = otofx.OTO(model, x)
    assert snapshot(model) == before, "OTO() mutated the model"
    assert oto.groups, "no prunable group found"
    zero_random_rows(model, oto, seed=1, fraction=0.5)
    # verify=False: assert_exact makes the same comparison, once
    assert_exact(model, oto, x, small=oto.compress(verify=False))


def test_train_mode_model_is_not_mutated():
    model = build("resnet18").train()
    before = snapshot(model)
    oto = otofx.OTO(model, torch.randn(2, 3, 32, 32))
    assert snapshot(model) == before
    assert model.training and all(m.training for m in model.modules())
    zero_random_rows(model, oto, seed=0, fraction=0.5)
    small = oto.compress()
    assert small.training
