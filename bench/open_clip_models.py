"""open_clip's model classes (CLIP with ViT, ResNet and timm towers, SigLIP-style heads, CoCa): captured,
analysed, compressed, exact?

Each model is built from a small config of its class (random weights, no download) and given an image and
a token sequence at batch 1; then, as ``bench/diffusers_models.py`` does (``_common.compressed_row``):
groups, half (floor) of every group's rows zeroed, ``compress()`` / ``form="module"`` (the model's own class)
/ ``form="graph"``, the parameters kept, the own class against the zeroed model on a batch of 2 (other
images and tokens; the towers' position tables fix the sizes), and where the own class keeps zero rows.

``pip install open_clip_torch`` (an optional bench dependency: ``pip install -e .[bench]``). Each model runs
in its own process (``--timeout``); ``--only coca,clip-rn`` picks models.
"""
from __future__ import annotations


def _models() -> dict:
    """``{name: (build, inputs)}``; ``inputs(batch, _)`` gives an image and tokens (EOT the largest id)."""
    import torch
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP

    vision = dict(layers=2, width=64, head_width=16, patch_size=8, image_size=32)
    text = dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2)

    def clip(v=None, t=None, **kw):
        return lambda: CLIP(embed_dim=24, vision_cfg={**vision, **(v or {})}, text_cfg={**text, **(t or {})}, **kw)

    def coca():
        m = CoCa(embed_dim=32, vision_cfg={**vision, "attentional_pool": True, "attn_pooler_queries": 5,
                                           "attn_pooler_heads": 2, "output_tokens": True},
                 text_cfg={**text, "embed_cls": True, "output_tokens": True},
                 multimodal_cfg=dict(context_length=16, vocab_size=100, width=32, heads=2, layers=2, dim_head=16))
        # NB: open_clip leaves the decoder's text_projection torch.empty (its init_parameters is never called,
        # and raises if it is): garbage, NaN at times
        torch.nn.init.normal_(m.text_decoder.text_projection, std=32 ** -0.5)
        return m

    def tokens(b, n):
        t = torch.randint(3, 99, (b, n))
        t[:, -3:] = 0  # padding
        t[:, -4] = 99  # the end token: the largest id (argmax pooling)
        return t

    def inputs(side=32, n=16):
        return lambda b, _: dict(image=torch.randn(b, 3, side, side), text=tokens(b, n))

    return {
        "clip-vit": (clip(), inputs()),
        "clip-vit layer-scale avg-pool": (clip(dict(ls_init_value=0.1, pool_type="avg", final_ln_after_pool=True,
                                                    no_ln_pre=True), dict(ls_init_value=0.1)), inputs()),
        "clip-vit custom blocks": (clip(dict(block_type="custom", qk_norm=True, scale_heads=True, scale_attn=True,
                                             scale_fc=True), dict(block_type="custom", qk_norm=True, scale_heads=True)),
                                   inputs()),
        "clip-vit sin-cos": (clip(dict(pos_embed_type="sin_cos_2d")), inputs()),
        "siglip-like": (clip(dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
                             dict(pool_type="last", no_causal_mask=True, proj_bias=True), init_logit_bias=-10.0),
                        inputs()),
        "clip text cls + mlp head": (clip(None, dict(proj_type="mlp", embed_cls=True, pool_type="first")),
                                     inputs(n=17)),
        "clip-rn (ModifiedResNet)": (clip(dict(layers=(1, 1, 1, 1), width=16, head_width=8, image_size=64)),
                                     inputs(64)),
        "clip timm convnext": (clip(dict(timm_model_name="convnext_atto", timm_pool="avg", timm_proj="linear")),
                               inputs()),
        "clip timm vit": (clip(dict(timm_model_name="vit_tiny_patch16_224", timm_pool="", timm_proj="linear",
                                    image_size=224)), inputs(224)),
        "coca": (coca, inputs(n=15)),
    }


SIDE, OTHER_SIDE = 0, 0  # NB: the towers' position tables fix the image and text sizes


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, SIDE, OTHER_SIDE, "open_clip_torch")


if __name__ == "__main__":
    main()
