"""vit-pytorch's vision transformers (lucidrains): their own class back, exact, with the graph form's widths.

The library writes its models with einops layers and small hand-written norms, and three of its habits
broke otofx before (each model here failed or kept rows then):

* SimpleViT adds a sin-cos table kept as a plain tensor attribute (no buffer) to the stream: the graph form
  copied the table whole and did not run, the own class refused the plan and kept the stream;
* CvT's (and Twins-SVT's, ScalableViT's) channel LayerNorm takes ``var`` before the ``mean`` it is centred
  by: the graph form's rewrite read the mean before it was computed and did not build;
* nViT splits heads with ``Rearrange('b n (h d) -> b h n d', h=heads)``: the layer's axis length stayed at
  the old head count in the own class (``otofx.rebuild._follow_einops``).
"""
from __future__ import annotations

import pytest
import torch

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows

vit_pytorch = pytest.importorskip("vit_pytorch")

pytestmark = pytest.mark.usefixtures("single_thread")


def _simple_vit():
    from vit_pytorch.simple_vit import SimpleViT

    return SimpleViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=10), 32


def _cvt():
    from vit_pytorch.cvt import CvT

    return CvT(s1_emb_dim=16, s1_heads=2, s1_depth=1, s2_emb_dim=32, s2_heads=2, s2_depth=1, s3_emb_dim=48,
               s3_heads=4, s3_depth=1, num_classes=10), 64


def _nvit():
    from vit_pytorch.normalized_vit import nViT

    return nViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4, dim_head=8, mlp_dim=64, num_classes=10), 32


def _vit():
    from vit_pytorch import ViT

    return ViT(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=10), 32


@pytest.mark.parametrize("factory", [_simple_vit, _cvt, _nvit, _vit], ids=lambda f: f.__name__.strip("_"))
def test_own_class_with_the_graph_forms_widths(factory):
    torch.manual_seed(0)
    model, side = factory()
    model = randomize(model.eval())
    x = torch.randn(1, 3, side, side)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is type(model)
    graph = oto.compress(form="graph")
    assert n_params(small) == n_params(graph) < 0.8 * n_params(model)
    other = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref = model(other)
        assert max_rel_diff(ref, small(other)) < 1e-4
        assert max_rel_diff(ref, graph(other)) < 1e-4
