"""compress() gives back the user's own class: torchvision and Hugging Face models, generate with a KV cache.

The module form (``form="auto"``/``"module"``) is a re-sized copy of the model (smaller layers, the
class's own forward); it must equal the zeroed dense model, leave the model and its config alone,
and for causal LMs generate the same greedy tokens with ``use_cache=True``. A forward that writes a
width into its code cannot be re-sized: ``auto`` then logs why and returns the GraphModule.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import otofx
from helpers import assert_exact, n_params, randomize, snapshot, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")

torchvision = pytest.importorskip("torchvision")


def _own_class_exact(model, x, ref_kwargs=None, **compress_kw):
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=3)
    before = snapshot(model)
    small = oto.compress(**compress_kw)
    assert type(small) is type(model), type(small).__name__
    assert snapshot(model) == before, "compress() mutated the model"
    assert_exact(model, oto, x, small=small, ref_kwargs=ref_kwargs)
    # nothing is shared with the user's model
    ptrs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in ptrs for p in small.parameters())
    return oto, small


# ---------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_returns_its_own_class(name):
    model = randomize(torchvision.models.get_model(name, num_classes=10).eval())
    _, small = _own_class_exact(model, torch.randn(2, 3, 32, 32))
    for conv in (m for m in small.modules() if isinstance(m, nn.Conv2d)):
        assert conv.weight.shape[0] == conv.out_channels and conv.weight.shape[1] * conv.groups == conv.in_channels
    if name == "mobilenet_v3_small":  # depthwise convs re-synced
        dw = small.features[1].block[0][0]
        assert 1 < dw.groups == dw.in_channels == dw.out_channels < 16
    bn = next(m for m in small.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_features == bn.running_mean.shape[0]


def test_torchvision_vit_heads_become_pruned_attention():
    from otofx.passes.modules import PrunedMultiheadAttention

    model = randomize(torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                           hidden_dim=32, mlp_dim=64, num_classes=10).eval())
    _, small = _own_class_exact(model, torch.randn(2, 3, 32, 32))
    attn = small.encoder.layers[0].self_attention
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2
    assert small.encoder.layers[0].num_heads == 2
    assert small.encoder.layers[0].mlp[0].out_features == 32


def test_training_flag_and_forms():
    model = randomize(torchvision.models.get_model("resnet18", num_classes=10)).train()
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=0)
    small = oto.compress(form="module")
    assert small.training and model.training and all(m.training for m in small.modules())
    assert oto.verify(small) <= 1e-4
    assert isinstance(oto.compress(form="graph"), fx.GraphModule)
    fuse = otofx.pipeline.GraphPass(lambda gm: gm)
    assert isinstance(oto.compress(passes=[fuse]), fx.GraphModule)  # graph passes imply the graph form
    with pytest.raises(otofx.InputError, match="form"):
        oto.compress(form="tree")
    with pytest.raises(otofx.InputError, match="passes"):
        oto.compress(form="module", passes=[fuse])
    # a plan given to either form
    plan = oto.plan()
    assert n_params(oto.compress(plan=plan)) == n_params(oto.compress(plan=plan, form="graph")) < n_params(model)


class HardCodedWidth(nn.Module):
    """A forward that writes the hidden width into its code: the module tree cannot shrink."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h.reshape(-1, 16))


def test_hard_coded_width_falls_back_to_the_graph(caplog):
    model = randomize(HardCodedWidth().eval())
    x = torch.randn(3, 8)
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=0)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = oto.compress()
    assert isinstance(small, fx.GraphModule)
    assert any("GraphModule" in r.getMessage() and "HardCodedWidth" in r.getMessage() for r in caplog.records)
    assert_exact(model, oto, x, small=small)
    with pytest.raises(otofx.OTOError, match="forward fails at the new widths"):
        oto.compress(form="module")


class _RMS(nn.Module):
    """An RMS norm over its input's last axis: ``w * x * rsqrt(mean(x ** 2) + eps)`` (``one_plus``:
    Gemma's ``(1 + w)``; ``centred``: a LayerNorm without bias, which subtracts the mean first)."""

    def __init__(self, n, one_plus=False, centred=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon, self.one_plus, self.centred = 1e-2, one_plus, centred

    def forward(self, x):
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return y * ((1 + self.weight) if self.one_plus else self.weight)


class _NormedMLP(nn.Module):
    """Four rows of four positions each (as heads are), then an RMS norm over all of them."""

    def __init__(self, **kw):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(6, 4), _RMS(16, **kw), nn.Linear(16, 3)

    def forward(self, x):
        return self.down(self.norm(torch.relu(self.up(x)).repeat_interleave(4, dim=-1)))


@pytest.mark.parametrize("one_plus", [False, True])
def test_rms_norm_over_a_pruned_width_is_refolded_in_the_own_class(one_plus, tmp_path):
    """An RMS norm over rows of several entries (OLMo 2's q/k norms over all heads, Mamba 2's gated norm): the graph keeps the
    mean's old divisor; the own class divides by the new width, so its eps becomes eps * old/new and
    its weight w * sqrt(old/new) ((1 + w) likewise): exact in its own class, and otofx.save keeps the
    new eps. A norm that subtracts the mean first is not an RMS norm: no fold, the graph comes back."""
    torch.manual_seed(0)
    model = randomize(_NormedMLP(one_plus=one_plus).eval())
    x = torch.randn(5, 6)
    oto = otofx.OTO(model, x)
    assert [z.rows for z in oto.groups] == [4]
    zero_random_rows(model, oto, seed=1)  # 2 rows of 4: 8 of the norm's 16 entries
    small = oto.compress()
    assert type(small) is _NormedMLP and small.norm.weight.shape == (8,)
    assert small.norm.variance_epsilon == pytest.approx(2e-2) and model.norm.variance_epsilon == 1e-2
    assert_exact(model, oto, x, small=small)
    otofx.save(small, tmp_path / "m")
    back = otofx.load(tmp_path / "m", model=_NormedMLP(one_plus=one_plus))
    assert back.norm.variance_epsilon == pytest.approx(2e-2)
    torch.testing.assert_close(back(x), small(x), rtol=0, atol=0)

    centred = randomize(_NormedMLP(centred=True).eval())
    oto = otofx.OTO(centred, x)
    if oto.groups:  # the mean subtracted pins the width, or it is exact in the graph only
        zero_random_rows(centred, oto, seed=1)
        got = oto.compress()
        assert_exact(centred, oto, x, small=got)
        if type(got) is _NormedMLP:
            assert got.norm.variance_epsilon == 1e-2


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def _hf(name):
    T = pytest.importorskip("transformers")
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0, pad_token_id=0))
    if name == "llama":  # grouped-query attention: 4 query heads over 2 key/value heads
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    if name == "t5":
        return T.T5EncoderModel(T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))
    if name == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                    max_position_embeddings=64))
    raise KeyError(name)


def _meta_shapes(cls, config):
    with torch.device("meta"):
        built = cls(config)
    return {k: tuple(v.shape) for k, v in built.state_dict().items()}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5", "distilbert"])
def test_hugging_face_returns_its_own_class(name):
    torch.manual_seed(0)
    model = randomize(_hf(name).eval())
    ids = torch.randint(0, 100, (2, 16))
    config = model.config.to_dict()
    cache = {"use_cache": False} if getattr(model.config, "use_cache", False) else None
    _, small = _own_class_exact(model, ids, ref_kwargs=cache)
    assert model.config.to_dict() == config, "compress() changed the user's config"
    assert small.config is not model.config
    assert getattr(small.config, "use_cache", None) == config.get("use_cache")
    # the config describes the new widths: it rebuilds the same shapes, or says what it cannot
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    widths = getattr(small.config, "otofx_widths", None)
    rebuilt = _meta_shapes(type(small), small.config) == shapes
    # NB: a refolded RMS norm's eps (the residual stream's, LLaMA) is a float the config cannot hold
    refolded = any(type(v) is float for attrs in (widths or {}).values() for v in attrs.values())
    assert (widths is None) == (rebuilt and not refolded)
    if name == "llama":
        assert rebuilt and refolded
        assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
        assert small.config.intermediate_size == 32 and small.config.hidden_size == 16
        assert widths["model.norm"]["variance_epsilon"] == pytest.approx(model.config.rms_norm_eps * 2)
    if name == "bert":
        assert small.config.intermediate_size == 32 and small.classifier.out_features == 3
        assert small.bert.encoder.layer[0].attention.self.all_head_size == 16
    if name == "gpt2":
        attn = small.transformer.h[0].attn
        assert (attn.num_heads, attn.split_size, attn.c_attn.nf) == (2, 16, 48)
        assert small.lm_head.weight is small.transformer.wte.weight  # tied weights stay tied
        assert widths["transformer.h.0.attn"]["num_heads"] == 2
    if name == "t5":
        assert small.config.num_heads == 2 and small.encoder.block[1].layer[0].SelfAttention.n_heads == 2


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_compressed_llm_generates_with_kv_cache(name):
    torch.manual_seed(0)
    model = randomize(_hf(name).eval())
    ids = torch.randint(1, 100, (2, 12))
    oto = otofx.OTO(model, ids)
    zero_random_rows(model, oto, seed=5)
    small = oto.compress()
    assert type(small) is type(model) and small.config.use_cache
    with torch.no_grad():
        out = small(ids)
    assert out.past_key_values is not None and out.past_key_values.get_seq_length() == 12
    prompt, mask = ids[:, :6], torch.ones(2, 6, dtype=torch.long)
    ref = model.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    got = small.generate(prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    assert got.shape == (2, 14) and torch.equal(ref, got)
    assert n_params(small) < n_params(model)
