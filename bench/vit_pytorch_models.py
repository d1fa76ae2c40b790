"""vit-pytorch's vision transformers (lucidrains: ViT, SimpleViT and variants, DeepViT, CaiT, CrossViT, CCT, CvT, PiT,
LeViT, MaxViT, T2T-ViT, NesT, MobileViT, Twins-SVT, ScalableViT, RvT, RegionViT, nViT): captured, analysed,
compressed, exact?

Each model is built small (2 blocks or one per stage, width 16-64, random weights, no download) and given
an image at batch 1; then, as ``bench/diffusers_models.py`` does (``_common.compressed_row``): groups, half
(floor) of every group's rows zeroed, ``compress()`` / ``form="module"`` (the model's own class) /
``form="graph"``, the parameters kept, the own class against the zeroed model on a batch of 2 (the same
image size: most of these models fix it), and where the own class keeps zero rows.

``pip install vit-pytorch`` (in otofx's ``bench`` and ``test`` extras). Each model runs in its own process
(``--timeout``); ``--only CvT,nViT`` picks models.
"""
from __future__ import annotations

C = dict(num_classes=10)


def _models() -> dict:
    """``{name: (build, inputs)}``: small configs of each family."""
    import torch
    import vit_pytorch as V
    from vit_pytorch.simple_vit import SimpleViT
    from vit_pytorch.cait import CaiT
    from vit_pytorch.deepvit import DeepViT
    from vit_pytorch.cross_vit import CrossViT
    from vit_pytorch.cct import CCT
    from vit_pytorch.cvt import CvT
    from vit_pytorch.pit import PiT
    from vit_pytorch.levit import LeViT
    from vit_pytorch.max_vit import MaxViT
    from vit_pytorch.t2t import T2TViT
    from vit_pytorch.nest import NesT
    from vit_pytorch.mobile_vit import MobileViT
    from vit_pytorch.twins_svt import TwinsSVT
    from vit_pytorch.scalable_vit import ScalableViT
    from vit_pytorch.rvt import RvT
    from vit_pytorch.simple_vit_with_qk_norm import SimpleViT as QKViT
    from vit_pytorch.simple_vit_with_register_tokens import SimpleViT as RegViT
    from vit_pytorch.vit_for_small_dataset import ViT as SmallDataViT
    from vit_pytorch.parallel_vit import ViT as ParallelViT
    from vit_pytorch.regionvit import RegionViT
    from vit_pytorch.normalized_vit import nViT
    def img(side, key="img"):  # NB: the forward's argument is named img, x or images
        return lambda b, _: {key: torch.randn(b, 3, side, side)}

    vit = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, **C)
    return {
        "ViT": (lambda: V.ViT(**vit), img(32)),
        "SimpleViT": (lambda: SimpleViT(**vit), img(32)),
        "SimpleViT qk-norm": (lambda: QKViT(**vit), img(32)),
        "SimpleViT registers": (lambda: RegViT(num_register_tokens=2, **vit), img(32)),
        "ViT small-dataset (SPT, LSA)": (lambda: SmallDataViT(**vit), img(32)),
        "ParallelViT": (lambda: ParallelViT(num_parallel_branches=2, **vit), img(32)),
        "DeepViT": (lambda: DeepViT(**vit), img(32)),
        "CaiT": (lambda: CaiT(image_size=32, patch_size=8, dim=32, depth=2, cls_depth=1, heads=4, mlp_dim=64,
                              layer_dropout=0.0, **C), img(32)),
        "CrossViT": (lambda: CrossViT(image_size=32, sm_dim=32, lg_dim=48, sm_patch_size=8, sm_enc_depth=1,
                                      sm_enc_heads=4, sm_enc_mlp_dim=64, lg_patch_size=16, lg_enc_depth=1,
                                      lg_enc_heads=4, lg_enc_mlp_dim=64, cross_attn_depth=1, cross_attn_heads=4,
                                      depth=2, **C), img(32)),
        "CCT": (lambda: CCT(img_size=(32, 32), embedding_dim=32, n_conv_layers=2, kernel_size=3, stride=2,
                            padding=1, pooling_kernel_size=3, pooling_stride=2, pooling_padding=1, num_layers=2,
                            num_heads=4, mlp_ratio=2.0, num_classes=10, positional_embedding="learnable"), img(32, "x")),
        "CvT": (lambda: CvT(s1_emb_dim=16, s1_heads=2, s1_depth=1, s2_emb_dim=32, s2_heads=2, s2_depth=1,
                            s3_emb_dim=48, s3_heads=4, s3_depth=1, **C), img(64, "x")),
        "PiT": (lambda: PiT(image_size=32, patch_size=8, dim=32, depth=(1, 1), heads=4, mlp_dim=64, **C), img(32)),
        "LeViT": (lambda: LeViT(image_size=64, stages=3, dim=(32, 48, 64), depth=1, heads=(2, 3, 4),
                                mlp_mult=2, dropout=0.0, **C), img(64)),
        "MaxViT": (lambda: MaxViT(dim_conv_stem=16, dim=16, dim_head=8, depth=(1, 1), window_size=4,
                                  mbconv_expansion_rate=2, mbconv_shrinkage_rate=0.25, **C), img(32, "x")),
        "T2TViT": (lambda: T2TViT(dim=32, image_size=32, depth=2, heads=4, mlp_dim=64,
                                  t2t_layers=((7, 4), (3, 2), (3, 2)), **C), img(32)),
        "NesT": (lambda: NesT(image_size=32, patch_size=4, dim=32, heads=4, num_hierarchies=2,
                              block_repeats=(1, 1), **C), img(32)),
        "MobileViT": (lambda: MobileViT(image_size=(64, 64), dims=[24, 32, 48], channels=[8, 16, 24, 24, 32, 32, 48,
                                                                                          48, 64, 64, 96], **C),
                      img(64, "x")),
        "TwinsSVT": (lambda: TwinsSVT(s1_emb_dim=16, s1_patch_size=4, s1_local_patch_size=2, s1_global_k=2,
                                      s1_depth=1, s2_emb_dim=32, s2_patch_size=2, s2_local_patch_size=2,
                                      s2_global_k=2, s2_depth=1, s3_emb_dim=48, s3_patch_size=2,
                                      s3_local_patch_size=2, s3_global_k=2, s3_depth=1, s4_emb_dim=64,
                                      s4_patch_size=2, s4_local_patch_size=1, s4_global_k=1, s4_depth=1,
                                      peg_kernel_size=3, **C), img(64, "x")),
        "ScalableViT": (lambda: ScalableViT(dim=16, heads=(1, 2, 4, 8), depth=(1, 1, 1, 1), ssa_dim_key=(16, 16, 16, 16),
                                            reduction_factor=(4, 2, 1, 1), window_size=(4, 2, None, None), **C),
                        img(64)),
        "RvT": (lambda: RvT(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, **C), img(32)),
        "RegionViT": (lambda: RegionViT(dim=(16, 32, 48, 64), depth=(1, 1, 1, 1), window_size=2, **C), img(64, "x")),
        "nViT": (lambda: nViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, **C), img(32, "images")),
    }


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, 0, 0, "vit-pytorch")


if __name__ == "__main__":
    main()
