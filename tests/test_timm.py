"""timm models compress to their own class (random weights, small configs; no download).

* ViT and DeiT: timm's ``LayerNorm`` subclass (its forward is ``F.layer_norm``) becomes
  ``PrunedLayerNorm`` like ``nn.LayerNorm``, and ``Attention.attn_dim`` follows the heads left even
  when the model width shrank from the same number (no token embedding keeps the stream apart).
* A torchvision detection-style ResNet with ``FrozenBatchNorm2d`` (buffers only) compresses to its
  own class: the norm is a leaf with batch norm's algebra, its buffers sliced with the channel (traced
  through, they were folded into unnamed constants).
"""
from __future__ import annotations

import logging

import pytest
import torch

import otofx
from helpers import assert_exact, max_rel_diff, randomize, zero_random_rows
from otofx.passes.modules import PrunedLayerNorm

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_vit_compresses_to_its_own_class(name, caplog, tmp_path):
    torch.manual_seed(0)
    model = randomize(timm.create_model(name, pretrained=False, num_classes=10, img_size=32, depth=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    assert model.embed_dim in [z.rows for z in oto.groups]  # the model width is a group
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = assert_exact(model, oto, torch.randn(3, 3, 32, 32))
    assert type(small) is type(model) and not caplog.records, [r.message for r in caplog.records]
    assert any(isinstance(m, PrunedLayerNorm) for m in small.modules())
    attn = small.blocks[0].attn
    assert attn.attn_dim == attn.num_heads * attn.head_dim < model.blocks[0].attn.attn_dim
    otofx.save(small, tmp_path / "vit")
    back = otofx.load(tmp_path / "vit", model=timm.create_model(name, pretrained=False, num_classes=10, img_size=32,
                                                                depth=2).eval())
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_frozen_batch_norm_resnet_compresses_to_its_own_class():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.copy_(torch.randn_like(t) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    x = torch.randn(1, 3, 32, 32)
    oto = otofx.OTO(model, x)
    assert len(oto.groups) >= 8
    zero_random_rows(model, oto, seed=2)
    # NB: the frozen norm's weight and bias are buffers, not zeroed with the rows: its channel is not
    # zero, and the consumers' zeroed columns make the removal exact
    small = assert_exact(model, oto, torch.randn(2, 3, 48, 40))
    assert type(small) is type(model)
    assert small.bn1.weight.shape[0] < 64


def test_efficientformer_heads_go_and_its_cached_biases_are_dropped(caplog):
    """EfficientFormer gathers a per-head bias table (``attention_biases[:, attention_bias_idxs]``):
    its heads are rows, the own class follows (``val_attn_dim``), and the biases the dense model
    cached in eval mode are dropped in the copy (its own ``_apply``), not served at the old head count."""
    torch.manual_seed(0)
    model = randomize(timm.create_model("efficientformer_l1", pretrained=False, num_classes=10)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)  # fills attention_bias_cache
    oto = otofx.OTO(model, x)
    attn = model.stages[3].blocks[4].token_mixer  # its one attention block
    heads = [z for z in oto.groups if any(n.endswith("attention_biases") for n, _, _ in z.params)]
    assert heads and heads[0].rows == attn.num_heads
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = assert_exact(model, oto, torch.randn(2, 3, 224, 224))
    assert type(small) is type(model) and not caplog.records, [r.message for r in caplog.records]
    assert small.stages[3].blocks[4].token_mixer.num_heads < attn.num_heads


def _halved(model, x):
    """``model`` randomised, half of every group's rows zeroed; its OTO.

    # NB: timm's linear weights (std 0.02) beside randomised biases leave the output almost the
    same for any input (the check would pass on a wrong width): here they are of unit gain"""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    randomize(model.eval())
    with torch.no_grad():
        assert max_rel_diff(model(x), model(torch.randn_like(x))) > 0.05
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    return oto


def _tied_own_class(model, side: int, caplog):
    """``model`` with half of every group's rows zero, compressed: its own class, exact on another
    batch, found by the search's tied-widths copy."""
    oto = _halved(model, torch.randn(2, 3, side, side))
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = assert_exact(model, oto, torch.randn(3, 3, side, side))
    assert type(small) is type(model), caplog.text
    assert "takes its tied widths equal" in caplog.text, caplog.text
    return small


def test_eva_attention_reads_its_width_off_the_stream_and_keeps_its_own_class(caplog):
    """EVA's attention (rotary embedding, SwiGLU MLP) reshapes its heads' output by its input's
    width (``reshape(B, N, C)``, ``C = x.shape[-1]``): the own class takes the stream and the heads
    removed only at one width. Three heads of 16 and a stream of 48 with half their rows zero: the
    heads go to two, the stream to their 32 (8 of its 24 zero rows kept), the SwiGLU width goes whole."""
    model = timm.models.eva.Eva(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3, mlp_ratio=8 / 3,
                                swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2), num_classes=10)
    small = _tied_own_class(model, 28, caplog)
    for old, new in zip(model.blocks, small.blocks):
        assert new.attn.num_heads == 2 and new.attn.qkv.in_features == 32 == new.attn.proj.in_features
        assert new.mlp.fc1.out_features < old.mlp.fc1.out_features
    assert small.patch_embed.proj.out_channels == 32


def test_coat_factorised_attention_ties_its_head_width_to_the_stream(caplog):
    """CoaT's factorised attention takes its head width as ``C // num_heads`` of its input's width,
    and its conv position encoding splits the heads in groups by window (three groups, shared by the
    blocks of a stage): the own class keeps just enough of the stream's zero rows to equal the heads
    left (2 + 3 + 3 heads of 2, half zero: 1 + 2 + 2 heads, a stream of 10, not 8)."""
    model = timm.models.coat.CoaT(img_size=32, patch_size=4, embed_dims=(16, 16, 16, 16), serial_depths=(1, 1, 1, 1),
                                  num_heads=8, mlp_ratios=(2, 2, 2, 2), num_classes=10)
    small = _tied_own_class(model, 32, caplog)
    attn = small.serial_blocks1[0].factoratt_crpe
    assert attn.num_heads == 5 and attn.qkv.in_features == 10 == attn.proj.in_features
    assert small.crpe1.channel_splits == [2, 4, 4]
