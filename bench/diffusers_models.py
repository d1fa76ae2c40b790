"""diffusers' model classes (UNets, VAEs, diffusion transformers): captured, analysed, compressed, exact?

Each model is built from a small config of its class (random weights, no download; eval mode; norm
statistics, affines and biases randomised as in the tests) and given one example at batch 1. Then:

* ``front-end``: what captured it (``symbolic_trace``, ``export``, ``parts``); ``groups``: groups found;
* ``auto`` / ``module``: half (floor) of every group's rows zeroed, ``oto.compress()`` (what it returns) and
  ``oto.compress(form="module")`` (the model's own class), each verified by otofx on the example;
* ``kept``: the own class's parameters over the model's; ``graph kept``: the same for
  ``compress(form="graph")`` (every zero row removed; the own class keeps the rows its code cannot take
  removed, and says which);
* ``other input``: the own class against the zeroed model on a batch of 2 at another image (or clip,
  or sequence) size: ``exact`` or the error (``otofx.verify.compare``);
* ``kept rows at``: where the own class keeps zero rows, as its warning names them;
* ``analysis s``, ``compress s``: ``otofx.OTO(model, example)``; the three ``compress()`` calls.

``pip install diffusers`` (an optional bench dependency: ``pip install -e .[bench]``). Each model runs in
its own process (``--timeout``); ``--only dit,sd3`` picks models.
"""
from __future__ import annotations


def _models() -> dict:
    """``{name: (build, inputs)}``; ``inputs(batch, side)`` gives the keyword inputs at a latent side."""
    import diffusers as D
    import torch

    r = torch.randn

    def t(b):
        return torch.arange(b) * 37 + 11  # NB: timesteps, one per sample

    g = 8  # NB: GroupNorm groups: 4 or 8 channels per group at these widths, as Stable Diffusion's 10
    return {
        "unet2d (DDPM)": (lambda: D.UNet2DModel(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=g, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8),
            lambda b, s: dict(sample=r(b, 3, s, s), timestep=t(b))),
        "unet2d_condition (SD 1.x)": (lambda: D.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=g, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=8),
            lambda b, s: dict(sample=r(b, 4, s, s), timestep=t(b), encoder_hidden_states=r(b, 7, 24))),
        "unet2d_condition (SDXL)": (lambda: D.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=g, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64),
            lambda b, s: dict(sample=r(b, 4, s, s), timestep=t(b), encoder_hidden_states=r(b, 7, 64),
                              added_cond_kwargs={"text_embeds": r(b, 32), "time_ids": r(b, 6)})),
        "controlnet": (lambda: D.ControlNetModel(
            block_out_channels=(32, 64), layers_per_block=1, in_channels=4, norm_num_groups=g,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=24,
            conditioning_embedding_out_channels=(16, 32), attention_head_dim=8),
            lambda b, s: dict(sample=r(b, 4, s, s), timestep=t(b), encoder_hidden_states=r(b, 7, 24),
                              controlnet_cond=r(b, 3, 2 * s, 2 * s))),
        "unet3d_condition": (lambda: D.UNet3DConditionModel(
            block_out_channels=(16, 32), norm_num_groups=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=8, attention_head_dim=4,
            out_channels=4, in_channels=4, layers_per_block=1, sample_size=16),
            lambda b, s: dict(sample=r(b, 4, 3, s, s), timestep=t(b), encoder_hidden_states=r(b, 4, 8))),
        "unet1d": (lambda: D.UNet1DModel(sample_size=64, block_out_channels=(32, 32, 64), extra_in_channels=64,
                                         in_channels=2, out_channels=2),
                   lambda b, s: dict(sample=r(b, 2, 4 * s), timestep=t(b))),
        "unet1d (RL)": (lambda: D.UNet1DModel(
            block_out_channels=(32, 32, 64, 64), in_channels=14, out_channels=14, time_embedding_type="positional",
            use_timestep_embedding=True, flip_sin_to_cos=False, freq_shift=1.0, out_block_type="OutConv1DBlock",
            mid_block_type="MidResTemporalBlock1D", down_block_types=("DownResnetBlock1D",) * 4,
            up_block_types=("UpResnetBlock1D",) * 3, act_fn="swish", norm_num_groups=g, layers_per_block=1),
            lambda b, s: dict(sample=r(b, 14, 2 * s), timestep=t(b))),
        "autoencoder_kl": (lambda: D.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
            norm_num_groups=g), lambda b, s: dict(sample=r(b, 3, 2 * s, 2 * s))),
        "autoencoder_tiny": (lambda: D.AutoencoderTiny(
            encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 1),
            num_decoder_blocks=(1, 1), latent_channels=4), lambda b, s: dict(sample=r(b, 3, 2 * s, 2 * s))),
        "vq_model": (lambda: D.VQModel(
            block_out_channels=(32, 64), norm_num_groups=g, in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=3), lambda b, s: dict(sample=r(b, 3, 2 * s, 2 * s))),
        "dit": (lambda: D.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=g),
            lambda b, s: dict(hidden_states=r(b, 4, s // 2, s // 2), timestep=t(b), class_labels=t(b) % 1000)),
        "pixart": (lambda: D.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=g),
            lambda b, s: dict(hidden_states=r(b, 4, s // 2, s // 2), timestep=t(b), encoder_hidden_states=r(b, 5, 24),
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None})),
        "sd3": (lambda: D.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=24, pooled_projection_dim=16, out_channels=4,
            pos_embed_max_size=16),
            lambda b, s: dict(hidden_states=r(b, 4, s, s), encoder_hidden_states=r(b, 5, 24),
                              pooled_projections=r(b, 16), timestep=t(b))),
        "flux": (lambda: D.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8]),
            lambda b, s: dict(hidden_states=r(b, s * s, 4), encoder_hidden_states=r(b, 5, 24),
                              pooled_projections=r(b, 16), timestep=torch.rand(b), img_ids=r(s * s, 3),
                              txt_ids=r(5, 3))),
        "sana": (lambda: D.SanaTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
            num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
            sample_size=16), lambda b, s: dict(hidden_states=r(b, 4, s, s), encoder_hidden_states=r(b, 6, 8),
                                               timestep=t(b))),
        "wan (video)": (lambda: D.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
            lambda b, s: dict(hidden_states=r(b, 4, 2, s, s), encoder_hidden_states=r(b, 12, 16), timestep=t(b))),
        "cogvideox": (lambda: D.CogVideoXTransformer3DModel(
            num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
            text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            temporal_compression_ratio=4, max_text_seq_length=8),
            lambda b, s: dict(hidden_states=r(b, 3, 4, s // 2, s // 2), encoder_hidden_states=r(b, 8, 8),
                              timestep=t(b))),
        "prior_transformer": (lambda: D.PriorTransformer(
            num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8, num_embeddings=7,
            additional_embeddings=4),
            lambda b, s: dict(hidden_states=r(b, 8), timestep=t(b), proj_embedding=r(b, 8),
                              encoder_hidden_states=r(b, 7, 8))),
    }


# the example's latent side, and the other input's (a batch of 2)
SIDE, OTHER_SIDE = 16, 8


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, SIDE, OTHER_SIDE, "diffusers")


if __name__ == "__main__":
    main()
