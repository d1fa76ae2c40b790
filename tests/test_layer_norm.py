"""A residual stream read through LayerNorms is prunable (BERT, GPT-2, ViT, ConvNeXt).

The features a layer norm normalises are rows when every one of them is zero with its row: a
removed zero feature adds nothing to the sums of values and squares, so the compressed norm keeps
the old divisor (``layer_norm_kept_divisor`` in the graph, ``PrunedLayerNorm`` in the model's own
class). These tests check the function against torch's norm over the zero-padded input, the own
class on the models whose width LayerNorm used to pin, and what the model can be shipped as.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import otofx
from helpers import assert_exact, assert_hub_refuses_and_otofx_loads, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedLayerNorm, PrunedLayerNorm2d, layer_norm_kept_divisor


@settings(max_examples=40, deadline=None, derandomize=True)
@given(old=st.integers(2, 64), frac=st.floats(0.02, 1.0), offset=st.floats(-20.0, 20.0),
       eps=st.sampled_from([1e-12, 1e-6, 1e-5, 0.5]), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_kept_divisor_is_layer_norm_over_the_zero_padded_input(old, frac, offset, eps, bias, dtype):
    new = max(1, min(old, round(old * frac)))
    g = torch.Generator().manual_seed(old * 131 + new)
    x = (torch.randn(3, 7, new, generator=g, dtype=torch.float64) * 3 + offset)
    w = torch.rand(new, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(new, generator=g, dtype=torch.float64) - 0.5 if bias else None
    pad = torch.zeros(3, 7, old - new, dtype=torch.float64)
    ref = F.layer_norm(torch.cat([x, pad], -1), (old,), torch.cat([w, torch.zeros(old - new, dtype=w.dtype)]),
                       None if b is None else torch.cat([b, torch.zeros(old - new, dtype=b.dtype)]), eps)[..., :new]
    got = layer_norm_kept_divisor(x.to(dtype), (new,), w.to(dtype), None if b is None else b.to(dtype), eps,
                                  old=old, new=new)
    assert got.dtype == dtype
    # the input's own rounding (bfloat16: 8 bits) bounds what any norm of it can give
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 1e-2}[dtype]
    assert (got.double() - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())


def _vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def _hf(name):
    T = pytest.importorskip("transformers")
    if name != "distilbert":
        from test_deploy import _hf as tiny  # BERT's classifier, GPT-2's LM head

        return tiny(name)
    return T.DistilBertForMaskedLM(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                      max_position_embeddings=64))


def _stream(oto, table: str):
    """The group holding ``table``'s columns (the residual stream)."""
    return next(z for z in oto.groups if any(name == table and dim == 1 for name, dim, _ in z.params))


@pytest.mark.parametrize("name", ["vit", "convnext"])
def test_torchvision_stream_under_layer_norm_is_pruned_in_its_own_class(name, tmp_path):
    torch.manual_seed(0)
    if name == "vit":
        model, x, other = _vit(), torch.randn(2, 3, 32, 32), torch.randn(5, 3, 32, 32)
        stream = "class_token"
    else:  # stem and downsampling LayerNorm2d (channels first), block LayerNorm (channels last)
        model = torchvision.models.ConvNeXt(
            [torchvision.models.convnext.CNBlockConfig(16, 32, 1), torchvision.models.convnext.CNBlockConfig(32, None, 1)],
            num_classes=10)
        x, other = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 48, 40)
        stream = "features.0.0.weight"
    model = randomize(model.eval())
    oto = otofx.OTO(model, x)
    width = next(z for z in oto.groups if any(n == stream for n, _, _ in z.params)).rows
    zero_random_rows(model, oto, seed=3)
    small = oto.compress()
    assert type(small) is type(model)
    assert_exact(model, oto, x, small=small)
    assert_exact(model, oto, other, small=small)  # another batch (and image size: ConvNeXt)
    norms = [m for m in small.modules() if isinstance(m, PrunedLayerNorm)]
    assert norms and all(m.full_width > m.normalized_shape[-1] for m in norms)
    if name == "vit":
        assert small.hidden_dim == width - width // 2 and small.class_token.shape[-1] == small.hidden_dim
    else:
        assert any(isinstance(m, PrunedLayerNorm2d) for m in norms)
    small.train()(x).sum().backward()  # trains
    with torch.no_grad():
        half = small.eval().to(torch.bfloat16)(x.to(torch.bfloat16)).float()
        ref = model(x)
    assert (half - ref).abs().max() <= 0.05 * max(1.0, ref.abs().max().item())
    small.float()
    otofx.save(small, tmp_path / "m")
    fresh = _vit() if name == "vit" else type(model)(
        [torchvision.models.convnext.CNBlockConfig(16, 32, 1), torchvision.models.convnext.CNBlockConfig(32, None, 1)],
        num_classes=10)
    back = otofx.load(tmp_path / "m", model=fresh.eval())
    with torch.no_grad():
        torch.testing.assert_close(back(other), small(other), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bert", "gpt2", "distilbert"])
def test_hugging_face_stream_under_layer_norm_is_pruned_in_its_own_class(name, tmp_path):
    """The hidden width of a LayerNorm model is a group; the compressed copy is its own class with
    ``PrunedLayerNorm`` in place of every norm over it. No config builds that norm (its divisor is
    the old width), so ``from_pretrained`` refuses the checkpoint instead of loading ``nn.LayerNorm``,
    and ``otofx.save`` / ``otofx.load`` give it back exactly."""
    torch.manual_seed(0)
    model = randomize(_hf(name).eval())
    ids = torch.randint(1, 100, (2, 12))
    oto = otofx.OTO(model, ids)
    table = model.get_input_embeddings()
    tname = next(n for n, m in model.named_modules() if m is table) + ".weight"
    hidden = _stream(oto, tname).rows
    zero_random_rows(model, oto, seed=3)
    small = oto.compress()
    assert type(small) is type(model)
    assert small.get_input_embeddings().weight.shape[1] == hidden - hidden // 2
    cache = {"use_cache": False} if getattr(model.config, "use_cache", False) else None
    assert_exact(model, oto, ids, small=small, ref_kwargs=cache)
    assert_exact(model, oto, torch.randint(1, 100, (3, 9)), small=small, ref_kwargs=cache)
    assert n_params(small) < n_params(model)
    norms = {n: m for n, m in small.named_modules() if isinstance(m, PrunedLayerNorm)}
    assert norms and all(m.full_width == hidden for m in norms.values())
    widths = small.config.otofx_widths
    assert {widths[n]["class"] for n in norms} == {"PrunedLayerNorm"}
    assert_hub_refuses_and_otofx_loads(model, small, tmp_path, ids)
    if name == "gpt2":
        prompt = ids[:, :5]
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        got = small.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
        assert torch.equal(ref, got)


def test_compressed_again_keeps_the_first_divisor():
    """Compressing a compressed model again: its PrunedLayerNorms keep dividing by the first width."""
    torch.manual_seed(0)
    model = randomize(_vit().eval())
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=3)
    small = oto.compress()
    oto2 = otofx.OTO(small, x)
    zero_random_rows(small, oto2, seed=4)
    smaller = oto2.compress()
    assert type(smaller) is type(model)
    norms = [m for m in smaller.modules() if isinstance(m, PrunedLayerNorm)]
    assert norms and {m.full_width for m in norms} == {32} and norms[0].normalized_shape[-1] < 16
    assert_exact(small, oto2, x, small=smaller)  # small (a PrunedLayerNorm model) with its rows zeroed


class _OwnNorm(nn.LayerNorm):
    """A LayerNorm subclass with its own forward that is not F.layer_norm (the Annotated Transformer's: the
    unbiased std, eps outside the root): otofx cannot swap it."""

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps) * self.weight + self.bias


class _Fp32Norm(nn.LayerNorm):
    """diffusers' FP32LayerNorm: F.layer_norm in float32, cast back. PrunedLayerNorm computes the same."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, norm=nn.LayerNorm):
        super().__init__()
        self.inp, self.up, self.down, self.head = nn.Linear(6, 16), nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)
        self.n0, self.n1 = norm(16), norm(16)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.down(F.gelu(self.up(self.n0(h))))
        return self.head(self.n1(h))


def test_layer_norm_subclass_with_its_own_forward_keeps_its_width_in_the_own_class(caplog):
    """A LayerNorm subclass with its own forward divides by its width, and otofx cannot swap it: the
    model's own class keeps the zero rows of that width (with a warning naming the module) and
    loses the others; the graph form removes them too."""
    torch.manual_seed(0)
    model = randomize(_Block(_OwnNorm).eval())
    x = torch.randn(4, 5, 6)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [16, 32]
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level("WARNING", logger="otofx"):
        small = oto.compress()
    assert type(small) is _Block and "_OwnNorm" in caplog.text and "keeps the 8 zero row" in caplog.text
    assert small.n0.weight.shape == (16,) and small.up.out_features == 16
    assert_exact(model, oto, x, small=small)
    graph = oto.compress(form="graph")
    assert graph.n0.weight.shape == (8,)
    assert_exact(model, oto, x, small=graph)
    plain = randomize(_Block().eval())
    oto = otofx.OTO(plain, x)
    zero_random_rows(plain, oto, seed=1)
    small = oto.compress()
    assert type(small) is _Block and isinstance(small.n0, PrunedLayerNorm) and small.n0.weight.shape == (8,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_norm_subclass_computing_layer_norm_is_swapped(dtype):
    """A subclass whose own forward computes F.layer_norm of its tensors (in float32 and cast back: diffusers'
    FP32LayerNorm, Wan's) is found so by a probe and swapped for PrunedLayerNorm: its width goes too."""
    torch.manual_seed(0)
    model = randomize(_Block(_Fp32Norm).eval())
    x = torch.randn(4, 5, 6)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = assert_exact(model, oto, x, small=oto.compress(form="module"))
    assert type(small) is _Block and isinstance(small.n0, PrunedLayerNorm) and small.n0.weight.shape == (8,)
    half, small_half = model.to(dtype), small.to(dtype)
    with torch.no_grad():
        ref, got = half(x.to(dtype)).float(), small_half(x.to(dtype)).float()
    assert (ref - got).abs().max() <= 0.05 * ref.abs().max()


class _ChannelsFirstNorm(nn.LayerNorm):
    """segmentation_models_pytorch's LayerNorm2d (UPerNet's feature norms): a LayerNorm subclass normalising the
    channels of NCHW input, permuted to channels-last around F.layer_norm."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class _ConvNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n, self.c2 = nn.Conv2d(3, 16, 3, padding=1), _ChannelsFirstNorm(16, eps=1e-6), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.n(self.c1(x))))


def test_a_channels_first_layer_norm_subclass_is_swapped():
    """A subclass computing F.layer_norm over the channels of NCHW input (permuted around it) is found so by
    the same probe and swapped for PrunedLayerNorm2d: its width goes in the model's own class, at any size."""
    torch.manual_seed(0)
    model = randomize(_ConvNormNet().eval())
    x = torch.randn(2, 3, 8, 8)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    small = assert_exact(model, oto, x, small=oto.compress(form="module"))
    assert type(small) is _ConvNormNet and isinstance(small.n, PrunedLayerNorm2d) and small.n.weight.shape == (8,)
    other = torch.randn(3, 3, 11, 7)
    assert_exact(model, oto, other, small=small)


def test_pinning_the_layer_norms_keeps_a_model_from_pretrained_can_load(tmp_path):
    """``pin=(torch.nn.LayerNorm,)`` pins every LayerNorm's width (a type stands for every module of
    it): Phi keeps its hidden width, its config describes the compressed model, and
    ``from_pretrained`` of its ``save_pretrained`` folder gives it back exactly. Without the pin its
    hidden width is a group, and loading refuses the shapes."""
    T = pytest.importorskip("transformers")
    config = T.PhiConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)
    ids = torch.randint(1, 100, (2, 9))
    for pin in ((), (nn.LayerNorm,)):
        torch.manual_seed(0)
        model = randomize(T.PhiForCausalLM(config).eval())
        oto = otofx.OTO(model, ids, pin=pin)
        stream = [z for z in oto.groups if any(n == "model.embed_tokens.weight" for n, _, _ in z.params)]
        assert bool(stream) == (not pin)
        zero_random_rows(model, oto, seed=3)
        small = oto.compress()
        assert type(small) is type(model)
        folder = tmp_path / f"hf{len(pin)}"
        small.save_pretrained(folder)
        if pin:
            assert getattr(small.config, "otofx_widths", None) is None
            back = type(model).from_pretrained(folder).eval()
            with torch.no_grad():
                torch.testing.assert_close(back(ids).logits, small(ids).logits, rtol=1e-5, atol=1e-6)
        else:
            with pytest.raises(Exception, match="(?i)size|shape"):
                type(model).from_pretrained(folder)
    with pytest.raises(otofx.OTOError, match="pin=\\[GroupNorm\\]: PhiForCausalLM has no module of that type"):
        otofx.OTO(model, ids, pin=(nn.GroupNorm,))
