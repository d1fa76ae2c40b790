"""segmentation_models_pytorch's architectures over several encoders: captured, analysed, compressed, exact?

Each model is built with random weights (``encoder_weights=None``, no download) and given a 64x64 image at
batch 1 (PAN 128x128); then, as ``bench/diffusers_models.py`` does (``_common.compressed_row``):

* ``front-end``: what captured it; ``groups``: groups found;
* ``auto`` / ``module``: half (floor) of every group's rows zeroed, ``oto.compress()`` and
  ``oto.compress(form="module")`` (the model's own class), each verified by otofx on the example;
* ``kept``: the own class's parameters over the model's; ``graph kept``: the same for ``form="graph"``
  (every zero row removed). NB: smp keeps encoder layers its forward never runs (PSPNet's encoder_depth=3
  leaves resnet's layer3/4, EfficientNet's head conv): they stay in the own class, the graph drops them;
* ``other input``: the own class against the zeroed model on a batch of 2 at 96x96 (PAN: 128 and 160);
* ``kept rows at``: where the own class keeps zero rows, as its warning names them.

``pip install segmentation_models_pytorch`` (an optional bench dependency: ``pip install -e .[bench]``).
Each model runs in its own process (``--timeout``); ``--only manet,upernet/resnet18`` picks models.
"""
from __future__ import annotations

ARCHS = ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "PAN", "UPerNet",
         "Segformer")
ENCODERS = ("resnet18", "efficientnet-b0", "mobilenet_v2", "mit_b0", "densenet121", "vgg11_bn", "dpn68",
            "tu-convnext_atto", "se_resnet50", "xception")
# pairs smp itself refuses (the encoder's depth does not fit the decoder; no dilated mode for DeepLab and PAN)
REFUSED = {("UnetPlusPlus", "mit_b0"), ("Linknet", "mit_b0")} | {
    (arch, enc) for arch in ("DeepLabV3", "DeepLabV3Plus", "PAN") for enc in ("densenet121", "vgg11_bn", "xception")}
# PAN's feature pyramid attention pools its input to 1/256 of the image side: it takes 128x128 and up
SIDES = {"PAN": (64, 80)}


def _models() -> dict:
    """``{name: (build, inputs)}``; ``inputs(batch, side)`` gives the image at twice ``side``."""
    import segmentation_models_pytorch as smp
    import torch

    out = {}
    for arch in ARCHS:
        for enc in ENCODERS:
            if (arch, enc) in REFUSED:
                continue
            out[f"{arch.lower()}/{enc}"] = (
                lambda arch=arch, enc=enc: getattr(smp, arch)(encoder_name=enc, encoder_weights=None, classes=3),
                lambda b, s, arch=arch: {"x": torch.randn(b, 3, *[2 * SIDES.get(arch, (SIDE, OTHER_SIDE))[s != SIDE]] * 2)})
    return out


# the example's half side, and the other input's (a batch of 2)
SIDE, OTHER_SIDE = 32, 48


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, SIDE, OTHER_SIDE, "segmentation_models_pytorch")


if __name__ == "__main__":
    main()
