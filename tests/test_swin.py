"""torchvision Swin (V1 and V2) compressed to its own class, at any batch and image size.

torchvision's window attention reads the head width from its input width, which head pruning leaves
unchanged; ``compress()`` puts :class:`otofx.passes.modules.PrunedWindowAttention` (explicit head
count and width; the bias table, V2's logit scale and position-MLP outputs sliced by heads) in its
place. The compressed model must be a ``SwinTransformer``, equal the zeroed dense model at the
example size and at other batch and image sizes (padding to whole windows included), in eval and
train mode (stochastic depth on, seeded), in bfloat16, and after ``otofx.save``/``otofx.load``.

Rows zeroed are the first half of every group, so the heads left are never the first ones: a rewrite
that takes the bias table's (or logit scale's) first columns instead of the kept heads' is caught.
"""
from __future__ import annotations

import pytest
import torch

import otofx
from helpers import RTOL, max_rel_diff, n_params, randomize, zero_rows

pytestmark = pytest.mark.usefixtures("single_thread")

torchvision = pytest.importorskip("torchvision")
from torchvision.models.swin_transformer import (  # noqa: E402
    PatchMergingV2, ShiftedWindowAttention, SwinTransformer, SwinTransformerBlockV2)

from otofx.passes.modules import PrunedWindowAttention  # noqa: E402
from otofx.verify import fitted_rtol  # noqa: E402

X = (1, 3, 64, 64)  # the example: 16x16 patches, then 8x8, windows of 4x4
OTHER_SIZES = [(3, 3, 64, 64), (1, 3, 96, 96), (3, 3, 128, 128), (2, 3, 72, 88)]  # 72x88: windows padded


def _swin(v2: bool, seed: int = 0, stochastic_depth: float = 0.0) -> SwinTransformer:
    torch.manual_seed(seed)
    kw = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10, stochastic_depth_prob=stochastic_depth, **kw)
    randomize(model.eval(), seed=seed)
    # NB: the bias table starts at std 0.02, too small to tell heads apart at 1e-4; the logit scales
    # start equal (log 10) for every head
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ShiftedWindowAttention):
                if v2:
                    m.logit_scale.copy_(torch.rand(m.logit_scale.shape) * 2 + 1)
                else:
                    m.relative_position_bias_table.normal_()
    return model


def _zero_first_half(model, oto) -> None:
    zero_rows(model, oto, [torch.arange(z.rows // 2) for z in oto.groups])


def _out(model, x, train: bool = False, seed: int = 0):
    model.train(train)
    try:
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(x)
    finally:
        model.eval()


@pytest.fixture(scope="module", params=[False, True], ids=["swin_v1", "swin_v2"])
def compressed(request):
    """(V2?, zeroed dense model, its OTO, compress()'s result), stochastic depth 0.5."""
    from otofx import capture

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture, "SPATIAL_FACTOR", 0.0)  # the module form is the point: no dynamic-image capture
        model = _swin(request.param, stochastic_depth=0.5)
        oto = otofx.OTO(model, torch.randn(X))
        _zero_first_half(model, oto)
        return request.param, model, oto, oto.compress()


def test_swin_is_its_own_class_with_fewer_heads(compressed):
    _, model, oto, small = compressed
    assert type(small) is SwinTransformer
    assert n_params(small) < n_params(model)
    attns = [m for m in small.modules() if isinstance(m, PrunedWindowAttention)]
    assert len(attns) == 4 and sorted(a.num_heads for a in attns) == [1, 1, 2, 2]
    for a in attns:
        assert a.qkv.weight.shape == (3 * a.num_heads * 8, a.qkv.in_features)  # head width 8 = 16/2 = 32/4
        assert a.proj.weight.shape[1] == a.num_heads * 8
        assert a.kept_heads.tolist() == list(range(a.heads_before // 2, a.heads_before))
        per_head = a.logit_scale if a.cosine else a.relative_position_bias_table
        assert per_head.shape[0 if a.cosine else 1] == a.num_heads
        if a.cosine:
            assert a.cpb_mlp[2].weight.shape[0] == a.num_heads


def test_swin_exact_at_the_example_and_other_batch_and_image_sizes(compressed):
    _, model, _, small = compressed
    for shape in [X, *OTHER_SIZES]:
        x = torch.randn(shape)
        err = max_rel_diff(_out(model, x), _out(small, x))
        assert err <= RTOL, f"input {shape}: relative error {err:.3g}"


def test_swin_train_mode_follows_the_flag(compressed):
    """Stochastic depth draws one number per sample and block, the same draws in both models."""
    _, model, _, small = compressed
    for shape in (X, (3, 3, 96, 96)):
        x = torch.randn(shape)
        train = _out(model, x, train=True, seed=5)
        assert max_rel_diff(train, _out(model, x)) > 1e-2  # train mode is not eval mode here
        err = max_rel_diff(train, _out(small, x, train=True, seed=5))
        assert err <= RTOL, f"train mode, input {shape}: relative error {err:.3g}"
    assert not any(m.training for m in small.modules())


def test_swin_bfloat16(compressed):
    _, model, _, small = compressed
    dense16, small16 = _copy(model).to(torch.bfloat16), _copy(small).to(torch.bfloat16)
    tol = fitted_rtol(RTOL, torch.bfloat16, 20)
    for shape in (X, (2, 3, 96, 96)):
        x = torch.randn(shape, dtype=torch.bfloat16)
        ref = _out(dense16, x)
        assert ref.dtype == torch.bfloat16
        err = max_rel_diff(ref, _out(small16, x))
        assert err <= tol, f"bfloat16, input {shape}: relative error {err:.3g} > {tol:.3g}"


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_swin_save_load_round_trip(compressed, tmp_path):
    v2, _, _, small = compressed
    otofx.save(small, tmp_path / "swin")
    loaded = otofx.load(tmp_path / "swin", model=_swin(v2, seed=7))
    assert type(loaded) is SwinTransformer
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    for shape in (X, (2, 3, 96, 96)):
        x = torch.randn(shape)
        assert max_rel_diff(_out(small, x), _out(loaded, x)) <= 1e-6


def test_swin_graph_form_says_which_size_it_takes(compressed):
    """The fixture's capture left the image sizes static: the graph form runs any batch at 64x64 and
    refuses 96x96 with otofx's error, which points at the module form."""
    _, model, oto, _ = compressed
    graph = oto.compress(form="graph")
    assert isinstance(graph, torch.fx.GraphModule)
    x = torch.randn(3, 3, 64, 64)
    assert max_rel_diff(_out(model, x), _out(graph, x)) <= RTOL
    with pytest.raises(otofx.ShapeError, match=r"input 'x' has size \(2, 3, 96, 96\), but this graph takes 'x' of "
                       r"size \(any, 3, 64, 64\) only.*oto.compress\(\)"):
        _out(graph, torch.randn(2, 3, 96, 96))


def test_swin_compressed_again(compressed):
    """A compressed Swin (PrunedWindowAttention inside) is analysed and compressed once more."""
    from otofx import capture

    small = _copy(compressed[3])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture, "SPATIAL_FACTOR", 0.0)
        oto = otofx.OTO(small, torch.randn(X))
    heads = [z for z in oto.groups if z.rows == 2]
    assert heads, [z.rows for z in oto.groups]  # the two-head layers' heads are groups again
    _zero_first_half(small, oto)
    smaller = oto.compress()
    assert type(smaller) is SwinTransformer and n_params(smaller) < n_params(small)
    assert sorted(m.num_heads for m in smaller.modules() if isinstance(m, PrunedWindowAttention)) == [1, 1, 1, 1]
    last = smaller.features[3][1].attn
    assert last.heads_before == 4 and last.kept_heads.tolist() == [3]
    for shape in (X, (2, 3, 96, 96)):
        x = torch.randn(shape)
        assert max_rel_diff(_out(small, x), _out(smaller, x)) <= RTOL


# ---------------------------------------------------------------------------------------------
# MaxViT: its attention writes its output back at the input width (PrunedRelativeAttention)
# ---------------------------------------------------------------------------------------------


def _maxvit(seed: int = 0):
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(seed)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)
    randomize(model.eval(), seed=seed)
    # NB: at its initial scales the attention (std 0.02 bias tables, default-initialised projections)
    # moves the logits by less than 1e-4: a wrong head would go unnoticed
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
            elif name.endswith(("to_qkv.weight", "merge.weight", "classifier.5.weight")):
                p.normal_(std=p.shape[1] ** -0.5 * 3)
    return model


def test_maxvit_is_its_own_class_exact_and_saveable(tmp_path):
    from torchvision.models.maxvit import MaxVit

    from otofx.passes.modules import PrunedRelativeAttention

    model = _maxvit()
    oto = otofx.OTO(model, torch.randn(1, 3, 32, 32))
    _zero_first_half(model, oto)
    small = oto.compress()
    assert type(small) is MaxVit and n_params(small) < n_params(model)
    attns = [m for m in small.modules() if isinstance(m, PrunedRelativeAttention)]
    assert len(attns) == 4 and sorted(a.n_heads for a in attns) == [1, 1, 2, 2]
    assert all(a.kept_heads.tolist() == list(range(a.heads_before // 2, a.heads_before)) for a in attns)
    for shape in ((1, 3, 32, 32), (3, 3, 32, 32)):  # MaxViT takes the image size it was built for only
        x = torch.randn(shape)
        assert max_rel_diff(_out(model, x), _out(small, x)) <= RTOL
    x16 = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    err = max_rel_diff(_out(_copy(model).to(torch.bfloat16), x16), _out(_copy(small).to(torch.bfloat16), x16))
    assert err <= fitted_rtol(RTOL, torch.bfloat16, 20)
    otofx.save(small, tmp_path / "maxvit")
    loaded = otofx.load(tmp_path / "maxvit", model=_maxvit(seed=3))
    assert type(loaded.get_submodule(_path_of(small, attns[0]))) is PrunedRelativeAttention
    assert max_rel_diff(_out(small, x), _out(loaded, x)) <= 1e-6


def _path_of(root, module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


# -- video Swin (torchvision's SwinTransformer3d) -----------------------------------------------------


def _swin3d(seed: int = 0, stochastic_depth: float = 0.0):
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d, SwinTransformer3d

    torch.manual_seed(seed)
    model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                              window_size=[2, 4, 4], num_classes=10, stochastic_depth_prob=stochastic_depth)
    randomize(model.eval(), seed=seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ShiftedWindowAttention3d):
                m.relative_position_bias_table.normal_()
    return model


def _features(model, x, train: bool = False):
    """The normalised features before pooling (the pooled logits average a wrong head away)."""
    out = {}
    hook = model.norm.register_forward_hook(lambda mod, args, y: out.setdefault("y", y))
    try:
        _out(model, x, train)
    finally:
        hook.remove()
    return out["y"]


def test_video_swin_is_its_own_class_at_any_size_and_saveable(tmp_path):
    """Clips of other lengths and sizes: padded, and along an axis of at most one window the window
    shrinks to it (and the bias of its smaller volume is read), as torchvision's video Swin does."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    from otofx import capture
    from otofx.passes.modules import PrunedWindowAttention3d

    model = _swin3d(stochastic_depth=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(capture, "SPATIAL_FACTOR", 0.0)
        oto = otofx.OTO(model, torch.randn(1, 3, 8, 32, 32))
        _zero_first_half(model, oto)
        small = oto.compress()
    assert type(small) is SwinTransformer3d and n_params(small) < n_params(model)
    attns = [m for m in small.modules() if isinstance(m, PrunedWindowAttention3d)]
    assert sorted(a.num_heads for a in attns) == [1, 1, 2, 2]
    assert all(a.kept_heads.tolist() == list(range(a.heads_before // 2, a.heads_before)) for a in attns)
    for shape in ((1, 3, 8, 32, 32), (2, 3, 8, 32, 32), (1, 3, 6, 40, 24), (1, 3, 2, 16, 16)):
        x = torch.randn(shape)
        assert max_rel_diff(_features(model, x), _features(small, x)) <= RTOL, shape
    x = torch.randn(2, 3, 4, 32, 32)
    train = _features(model, x, train=True)
    assert max_rel_diff(train, _features(model, x)) > 1e-2  # stochastic depth is on
    assert max_rel_diff(train, _features(small, x, train=True)) <= RTOL
    otofx.save(small, tmp_path / "swin3d")
    loaded = otofx.load(tmp_path / "swin3d", model=_swin3d(seed=5))
    assert type(loaded.get_submodule(_path_of(small, attns[0]))) is PrunedWindowAttention3d
    assert max_rel_diff(_features(small, x), _features(loaded, x)) <= 1e-6


def test_a_plan_of_rows_that_are_not_zero_is_removed_not_kept():
    # compress(plan=...) removes the plan's rows whatever their values (SCOP's prune_lowest). Where the
    # own class cannot take a width LayerNorms normalise (part of a window attention's heads), it
    # may keep only rows that are zero; these are not, so the graph form removes them (the own class
    # used to keep them with their values: 3e-2 off the model with the plan's rows zeroed)
    from otofx.passes.prune import plan_rows
    from otofx.scop import scores
    from otofx.scop.prune import choose_rows, zeroed_copy

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    oto = otofx.OTO(model, x)
    plan = plan_rows(oto.zigset, [r.numpy() for r in choose_rows(oto, scores.l1(oto), 0.5)])
    small = oto.compress(plan=plan, verify=False)  # verify compares with the model, whose rows are not zero
    assert n_params(small) < n_params(model)
    with torch.no_grad():
        assert max_rel_diff(zeroed_copy(oto, plan)(x), small(x)) <= RTOL
