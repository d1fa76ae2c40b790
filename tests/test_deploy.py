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
from helpers import (assert_exact, assert_hub_refuses_and_otofx_loads, n_params, randomize, snapshot, zero_random_rows,
                     zero_rows)

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
    assert (widths is None) == rebuilt
    if name == "llama":  # the refolded eps of every norm on the residual stream: the config's rms_norm_eps
        assert rebuilt and widths is None
        assert (small.config.num_attention_heads, small.config.num_key_value_heads) == (2, 1)
        assert small.config.intermediate_size == 32 and small.config.hidden_size == 16
        assert small.config.rms_norm_eps == model.config.rms_norm_eps * 2 == small.model.norm.variance_epsilon
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


def test_backbone_model_whose_config_validates_on_set_returns_its_own_class(tmp_path):
    """Depth Anything reads a DINOv2 backbone whose config checks ``out_indices`` when set: fitting the
    config to the new widths tries its entries too (4 -> 2 when the heads went from 4 to 2) and must
    pass over the values the setter refuses (duplicates), not fail the own class."""
    T = pytest.importorskip("transformers")
    backbone = T.Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                              image_size=32, patch_size=8, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = T.DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32,
                                fusion_hidden_size=16, head_hidden_size=8, patch_size=8)
    torch.manual_seed(0)
    model = randomize(T.DepthAnythingForDepthEstimation(cfg).eval())
    x = torch.randn(2, 3, 32, 32)
    _, small = _own_class_exact(model, x)
    assert small.config.backbone_config.out_indices == [1, 2, 3, 4]
    otofx.save(small, tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(otofx.load(tmp_path / "m")(x).predicted_depth, small(x).predicted_depth,
                                   rtol=0, atol=0)


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


def _round_trip_model(name):
    T = pytest.importorskip("transformers")
    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    if name == "qwen3":  # q/k norms over head_dim take the same rms_norm_eps as the hidden norms
        return T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **small))
    if name == "gemma":  # (1 + w) norms, a scaled embedding, tied head
        return T.GemmaForCausalLM(T.GemmaConfig(head_dim=8, **small))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**small))
    if name == "gpt_oss":  # attention sinks (one per head), experts; head_dim given, as wide as hidden / heads
        return T.GptOssForCausalLM(T.GptOssConfig(**dict(small, intermediate_size=16), head_dim=8, num_local_experts=4,
                                                  num_experts_per_tok=2, layer_types=["sliding_attention",
                                                                                      "full_attention"]))
    if name == "mllama":  # its attention ignores config.head_dim: 2 heads of 8 load as 4 heads of 4
        return T.MllamaForCausalLM(T.MllamaTextConfig(**small, cross_attention_layers=[], pad_token_id=0))
    return _hf(name)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma", "qwen3", "gpt_oss", "gpt2", "bert", "mllama"])
@pytest.mark.parametrize("uniform", [True, False])
def test_save_pretrained_round_trips_when_the_config_describes_the_model(name, uniform, tmp_path):
    """``config.otofx_widths`` absent means the config describes the compressed model in full:
    ``save_pretrained`` + the class's ``from_pretrained`` give it back exactly. The floats the config
    gives follow it: the hidden norms' refolded eps is ``rms_norm_eps``; Qwen 3's q/k norms, over
    unchanged head widths, take it too, their projections scaled by sqrt(new eps / old); Gemma's
    embedding scale ``sqrt(hidden_size)`` is folded into the table and its tied head through the
    final norm. GPT-OSS's config is fitted head counts first (its head_dim, tried early, fits the
    q projection of 2 heads of 8 as 4 of 4 and then the attention sinks never fit). Present, it names what the config cannot hold (per-layer widths; GPT-2's and BERT's
    head counts, whose head width is hidden / heads; Mllama's, whose attention ignores ``head_dim``, so
    that a config giving the new shapes would build other heads): ``from_pretrained`` refuses the shapes, and
    ``otofx.save`` / ``otofx.load`` give the model back exactly (GPT-OSS's experts with the kernel
    they ran: the default grouped_mm refuses widths that are not a multiple of 16 bytes)."""
    torch.manual_seed(0)
    model = randomize(_round_trip_model(name).eval())
    ids = torch.randint(1, 100, (2, 12))
    oto = otofx.OTO(model, ids)
    if uniform:
        zero_random_rows(model, oto, seed=4)
    else:  # a different number of rows in each group
        g = torch.Generator().manual_seed(4)
        zero_rows(model, oto, [torch.randperm(z.rows, generator=g)[: 1 + i % max(z.rows - 1, 1)].sort().values
                               for i, z in enumerate(oto.groups)])
    small = oto.compress()
    assert type(small) is type(model)
    with torch.no_grad():
        want = small(ids)[0]
        torch.testing.assert_close(want, model(ids)[0], rtol=1e-4, atol=1e-5)
    widths = getattr(small.config, "otofx_widths", None)
    small.save_pretrained(tmp_path / "hf")
    if uniform and name not in ("gpt2", "bert", "mllama"):
        assert widths is None, widths
        back = type(model).from_pretrained(tmp_path / "hf").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(ids)[0], want, rtol=1e-5, atol=1e-6)
        assert small.config.rms_norm_eps == 2 * model.config.rms_norm_eps
        if name == "qwen3":
            attn, old = small.model.layers[1].self_attn, model.model.layers[1].self_attn
            assert attn.q_norm.variance_epsilon == small.config.rms_norm_eps
            kept = attn.q_proj.weight.abs().sum(1) > 0
            assert torch.allclose(attn.q_proj.weight.abs().sum(), old.q_proj.weight.abs().sum() * 2 ** 0.5)
            assert kept.all()
        if name == "gemma":
            emb = small.model.embed_tokens
            assert emb.scalar_embed_scale == small.config.hidden_size ** 0.5 == float(emb.embed_scale)
            assert small.lm_head.weight is emb.weight
    else:
        assert widths is not None
        with pytest.raises(Exception, match="(?i)size|shape"):
            type(model).from_pretrained(tmp_path / "hf")
    otofx.save(small, tmp_path / "otofx")
    again = otofx.load(tmp_path / "otofx")
    with torch.no_grad():
        torch.testing.assert_close(again(ids)[0], want, rtol=0, atol=0)


def test_floats_left_alone_when_their_fold_breaks_the_forward(monkeypatch, caplog, tmp_path):
    """The weight folds that make floats follow the config assume the class's forward; when the
    result fails verification, ``compress()`` keeps the copy without them (the eps refolded, named
    in ``config.otofx_widths``) and says so. The config then keeps the old widths, so that
    ``from_pretrained`` refuses the folder rather than load other eps."""
    import otofx.rebuild as rb

    real = rb._float_fold

    def broken(new, gm, name, attr, have, want, cuts, sites=None):
        fold = real(new, gm, name, attr, have, want, cuts, sites)
        if fold is None:
            return None

        def worse():
            fold()
            with torch.no_grad():
                next(new.parameters()).mul_(3)
        return worse

    monkeypatch.setattr(rb, "_float_fold", broken)
    torch.manual_seed(0)
    model = randomize(_round_trip_model("qwen3").eval())
    ids = torch.randint(1, 100, (2, 12))
    oto = otofx.OTO(model, ids)
    zero_random_rows(model, oto, seed=4)
    with caplog.at_level(logging.INFO, logger="otofx"):
        small = oto.compress()
    assert type(small) is type(model) and "without the config's floats" in caplog.text
    assert "from_pretrained refuses its save_pretrained folder rather than load a different model" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(small(ids)[0], model(ids)[0], rtol=1e-4, atol=1e-5)
    eps = {k for a in small.config.otofx_widths.values() for k, v in a.items() if type(v) is float}
    assert eps == {"variance_epsilon"} and small.config.rms_norm_eps == model.config.rms_norm_eps
    # the config keeps the old widths: from_pretrained refuses the checkpoint rather than load other eps
    assert small.config.hidden_size == model.config.hidden_size
    assert small.model.embed_tokens.embedding_dim < model.config.hidden_size
    assert_hub_refuses_and_otofx_loads(model, small, tmp_path, ids)
    # generate() reads the config for its cache: the old widths must not break it
    small.config.use_cache = model.config.use_cache = True
    want = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(small.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0), want)


class _QNorm(nn.Module):
    """q_proj, a view into heads, a per-head RMS norm (Qwen 3's q_norm); ``leak`` also returns q."""

    def __init__(self, leak=False):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.norm_w = nn.Parameter(torch.ones(4))
        self.eps, self.leak = 1e-6, leak

    def forward(self, x):
        q = self.q(x).view(x.shape[0], 2, 4)
        h = q.float()
        out = self.norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps))
        return (out, q) if self.leak else out


class _TiedLM(nn.Module):
    """An embedding scaled by a float, a final RMS norm, a head tied to the embedding; ``leak``
    also returns the final norm's output; ``scale`` multiplies a projection's output by a float."""

    def __init__(self, leak=False):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.norm_w = nn.Parameter(torch.ones(8))
        self.s, self.leak = 0.25, leak

    def forward(self, ids):
        h = self.proj(self.embed(ids)) * self.s
        n = self.norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        logits = nn.functional.linear(n[:, -2:], self.embed.weight)
        return (logits, n) if self.leak else logits


def test_scale_fold_sources_are_read_off_the_graph():
    """The three readings behind the float folds, and their refusals when a value has another reader."""
    from otofx.passes.resize import constant_scale_sources, rms_input_producer, tied_head_norms

    gm = fx.symbolic_trace(_QNorm())
    assert rms_input_producer(gm, "") == (("q.weight", None), ("q.bias", None))
    assert rms_input_producer(fx.symbolic_trace(_QNorm(leak=True)), "") is None  # q is also an output
    gm = fx.symbolic_trace(_TiedLM())
    assert tied_head_norms(gm, {"embed.weight"}) == [("norm_w", False)]
    assert tied_head_norms(fx.symbolic_trace(_TiedLM(leak=True)), {"embed.weight"}) is None
    assert constant_scale_sources(gm, 0.25, "") == ["proj.weight", "proj.bias"]
    assert constant_scale_sources(gm, 0.25, "embed") is None  # not a parameter of that module
    assert constant_scale_sources(gm, 0.5, "") is None  # no product with that literal

    class Gate(nn.Module):  # Dory's sigmoid(x * (s_gate * s_gate_scale) ** 2): the parameter itself
        def __init__(self):
            super().__init__()
            self.g, self.scale = nn.Parameter(torch.rand(8)), 3.0

        def forward(self, x):
            return torch.sigmoid(x * (self.g * self.scale).square())

    assert constant_scale_sources(fx.symbolic_trace(Gate()), 3.0, "") == ["g"]

    # each reading is exact when applied: the norm's eps times c**2 and its input times c
    torch.manual_seed(0)
    m, x = _QNorm(), torch.randn(3, 8) * 1e-3
    want = m(x)
    with torch.no_grad():
        m.q.weight.mul_(3.0)
        m.q.bias.mul_(3.0)
    m.eps *= 9.0
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)


class _RmsNoWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.eps = 1e-6

    def forward(self, h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)


class _NormInputs(nn.Module):
    """A weightless norm module fed by: a fused projection's first piece (DeepSeek's latent), a rotary
    embedding of q (HunYuan), and both q and k (Llama 4's one qk_norm for both)."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.q, self.k, self.kv = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 12)
        self.norm = _RmsNoWeight()
        self.register_buffer("cos", torch.rand(8))
        self.register_buffer("sin", torch.rand(8))

    def forward(self, x):
        if self.mode == "fused":
            a, b = self.kv(x).split([8, 4], dim=-1)
            return self.norm(a), b * 2
        if self.mode == "rope":
            q = self.q(x)
            rot = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)
            return self.norm(q * self.cos + rot * self.sin)
        return self.norm(self.q(x)) + self.norm(self.k(x))


@pytest.mark.parametrize("mode, want", [
    ("fused", (("kv.weight", (0, 8)), ("kv.bias", (0, 8)))),
    ("rope", (("q.weight", None), ("q.bias", None))),
    ("twice", (("q.weight", None), ("q.bias", None), ("k.weight", None), ("k.bias", None))),
])
def test_norm_inputs_scale_through_splits_rotary_and_repeated_calls(mode, want):
    """The layers whose outputs feed a norm, found through a fused projection's split (its rows
    only), a rotary embedding and a norm module called twice; scaling them by c with the eps times
    c**2 leaves every output as it was."""
    from otofx.passes.resize import rms_input_producer, scale_parameter

    torch.manual_seed(0)
    m = _NormInputs(mode)
    got = rms_input_producer(fx.symbolic_trace(m), "norm")
    assert got == want
    x = torch.randn(3, 8) * 1e-3
    before = m(x)
    for name, rows in got:
        scale_parameter(m, name, 2.0, rows=rows)
    m.norm.eps *= 4.0
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-6)


def _hybrid(name, tie):
    T = pytest.importorskip("transformers")
    cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64, linear_conv_kernel_dim=4,
               linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
               layer_types=["linear_attention", "full_attention"], tie_word_embeddings=tie, use_cache=False)
    if name == "qwen3_next":  # experts, a gated shared expert
        return T.Qwen3NextForCausalLM(T.Qwen3NextConfig(**cfg, moe_intermediate_size=16, num_experts=4,
                                                        num_experts_per_tok=2, shared_expert_intermediate_size=32))
    if not hasattr(T, "Qwen3_5ForCausalLM"):
        pytest.skip("no Qwen 3.5 in this transformers")
    return T.Qwen3_5ForCausalLM(T.Qwen3_5TextConfig(**cfg))


# NB: one model (the capture of a linear-attention model takes ~20 s); Qwen 3.5 (no experts, untied)
# takes the same path, and bench/hf_sweep.py's from_pretrained column checks it
@pytest.mark.parametrize("name,tie", [("qwen3_next", True)])
def test_hybrid_linear_attention_round_trips_with_the_stream_scaled(name, tie, tmp_path):
    """Qwen 3.5 and Qwen3-Next: the linear-attention norms share ``rms_norm_eps`` with the hidden
    norms but keep their width, so the config cannot take the hidden norms' refolded eps. The layers
    that write the residual stream (embedding, output projections, experts, the gated shared expert)
    are scaled by sqrt(new / old) instead, the eps stay the config's, and ``from_pretrained`` of the
    ``save_pretrained`` folder gives the model back (a tied head is scaled back through the final norm)."""
    torch.manual_seed(0)
    model = randomize(_hybrid(name, tie).eval())
    ids = torch.randint(1, 100, (2, 12))
    oto = otofx.OTO(model, ids)
    zero_random_rows(model, oto, seed=4)
    small = oto.compress()
    assert type(small) is type(model)
    assert small.model.embed_tokens.weight.shape[1] < 32  # the stream is narrower
    assert getattr(small.config, "otofx_widths", None) is None
    assert small.config.rms_norm_eps == model.config.rms_norm_eps
    with torch.no_grad():
        want = small(ids)[0]
        torch.testing.assert_close(want, model(ids)[0], rtol=1e-4, atol=1e-5)
    if tie:
        assert small.lm_head.weight is small.model.embed_tokens.weight
    small.save_pretrained(tmp_path / "hf")
    back = type(model).from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], want, rtol=1e-5, atol=1e-6)
