"""diffusers' models from small configs (random weights, no download): compressed into their own class, exact
on the example and on another batch and size. What each one needed:

* UNets (Stable Diffusion's, SDXL's): the resamplers assert ``x.shape[1] == self.channels``, which follows
  the width of what they read (``rebuild._follow_io_widths``); the sinusoidal timestep features'
  columns stay (the graph removes them: no config gives a subset of frequencies);
* DiT: ``nn.LayerNorm(elementwise_affine=False)`` over a stream whose removed channels hold its sin-cos
  position table (``PrunedOwnLayerNorm.fill``); the model takes other sizes, so the own class keeps the
  stream's width (a table read at the example's positions is wrong elsewhere: ``OTO._check_positions``);
* PixArt: ``added_cond_kwargs={"resolution": None, ...}`` (None leaves of a nested input);
* Wan: ``FP32LayerNorm``, a LayerNorm subclass computing ``F.layer_norm`` in float32 (swapped for
  PrunedLayerNorm after a probe);
* UNet3D: ``repeat_interleave(frames, dim=0, output_size=...)`` of the batch keeps its output size
  expression in the graph form.
"""
from __future__ import annotations

import logging

import pytest
import torch

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedLayerNorm

D = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")


def _t(b: int) -> torch.Tensor:
    return torch.arange(b) * 37 + 11


def _check(model, inputs, forms=("module",)):
    """Half of every group's rows zeroed; each form exact on the example and a batch of 2 at half the size
    (the graph form: a batch of 2 at the example's size, where the captured graph takes it: torch 2.11's
    export keeps some of these batches static)."""
    torch.manual_seed(0)
    model = randomize(model.eval())
    oto = otofx.OTO(model, inputs(1, 16))
    zero_random_rows(model, oto, seed=1)
    out = {}
    for form in forms:
        small = oto.compress(form=form)
        assert n_params(small) < 0.6 * n_params(model)
        for b, s in ((1, 16), (2, 16 if form == "graph" else 8)):
            x = inputs(b, s)
            if form == "graph" and b > 1:
                try:
                    oto.graph_module(**x)
                except otofx.ShapeError:
                    continue
            with torch.no_grad():
                ref, got = model(**x), small(**x)
            assert max_rel_diff(ref, got) <= 1e-4, (form, b, s)
        out[form] = small
    return model, oto, out


def test_stable_diffusion_unet_in_its_own_class(caplog):
    unet = D.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=8)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        model, _, got = _check(unet, lambda b, s: dict(sample=torch.randn(b, 4, s, s), timestep=_t(b),
                                                       encoder_hidden_states=torch.randn(b, 7, 24)))
    small = got["module"]
    assert type(small) is D.UNet2DConditionModel
    up = small.up_blocks[0].upsamplers[0]
    assert up.channels == up.conv.in_channels < 64
    # NB: only the timestep features' columns stay (a sinusoid of a subset of frequencies is no config)
    assert "at time_embedding.linear_1;" in caplog.text


def test_dit_keeps_the_stream_holding_its_position_table(caplog):
    dit = D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        model, _, got = _check(dit, lambda b, s: dict(hidden_states=torch.randn(b, 4, s // 2, s // 2),
                                                      timestep=_t(b), class_labels=_t(b) % 1000))
    small = got["module"]
    assert type(small) is D.DiTTransformer2DModel and "position table" in caplog.text
    assert small.pos_embed.proj.out_channels == 32  # the stream
    assert small.transformer_blocks[0].ff.net[0].proj.out_features < 128  # the MLPs go


def test_pixart_with_none_conditions_is_exported_whole():
    pixart = D.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                        caption_channels=24)
    _, oto, got = _check(pixart, lambda b, s: dict(
        hidden_states=torch.randn(b, 4, s // 2, s // 2), timestep=_t(b), encoder_hidden_states=torch.randn(b, 5, 24),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    assert oto.frontend == "export" and type(got["module"]) is D.PixArtTransformer2DModel


def test_wan_fp32_layer_norms_are_swapped():
    wan = D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    _, _, got = _check(wan, lambda b, s: dict(hidden_states=torch.randn(b, 4, 2, s, s),
                                              encoder_hidden_states=torch.randn(b, 12, 16), timestep=_t(b)))
    small = got["module"]
    assert type(small) is D.WanTransformer3DModel and isinstance(small.blocks[0].norm2, PrunedLayerNorm)


def test_unet3d_graph_form_takes_other_batches():
    unet = D.UNet3DConditionModel(block_out_channels=(16, 32), norm_num_groups=4,
                                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8,
                                  attention_head_dim=4, out_channels=4, in_channels=4, layers_per_block=1,
                                  sample_size=16)
    # NB: one timestep for the batch (diffusers broadcasts it): the capture keeps a rank-1 input's size
    _check(unet, lambda b, s: dict(sample=torch.randn(b, 4, 3, s, s), timestep=_t(1),
                                   encoder_hidden_states=torch.randn(b, 4, 8)), forms=("graph", "module"))
