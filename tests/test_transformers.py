"""Transformers: attention heads and MLP widths, exact, from torchvision ViT/Swin/MaxViT to Hugging Face.

Every model is built from a small config with random weights (no download). For each: the groups
must include whole heads (rows = head count, head_dim positions per projection row) and the MLP
hidden width; zeroing a random half of every group's rows and compressing is exact and smaller.
"""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import otofx
from helpers import assert_exact, fresh_like, n_params, randomize, zero_random_rows, zero_rows

pytestmark = pytest.mark.usefixtures("single_thread")

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

L = 16  # sequence length


def _ids(vocab=100):
    return torch.randint(0, vocab, (2, L))


def _hf(name):
    T = transformers
    if name == "bert":
        c = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
        return T.BertModel(c), _ids(), (4, 8, 64)
    if name == "gpt2":
        c = T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        return T.GPT2Model(c), _ids(), (4, 8, 128)
    if name == "vit":
        c = T.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
        return T.ViTModel(c), torch.randn(2, 3, 32, 32), (4, 8, 64)
    if name == "llama":  # grouped-query attention: 4 query heads over 2 key/value heads
        c = T.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        return T.LlamaModel(c), _ids(), (2, 8, 64)
    if name == "t5":  # the relative position bias is shared by all layers: head h of every layer is one row
        c = T.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return T.T5EncoderModel(c), _ids(), (4, 8, 64)
    if name == "distilbert":
        c = T.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64)
        return T.DistilBertModel(c), _ids(), (4, 8, 64)
    raise KeyError(name)


def _has_heads(oto, heads, head_dim):
    return any(z.rows == heads and any(idx.shape[1] == head_dim for _, _, idx in z.params) for z in oto.groups)


def _has_width(oto, width):
    return any(z.rows == width for z in oto.groups)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "llama", "t5", "distilbert"])
def test_hugging_face_heads_and_mlp_exact(name, attn):
    torch.manual_seed(0)
    model, x, (heads, head_dim, width) = _hf(name)
    model.set_attn_implementation(attn)
    randomize(model.eval())
    oto = otofx.OTO(model, x)
    assert oto.frontend == "export"  # transformers 5 has no fx tracer
    assert _has_heads(oto, heads, head_dim), [(z.rows, [tuple(i.shape) for _, _, i in z.params]) for z in oto.groups]
    assert _has_width(oto, width)
    zero_random_rows(model, oto, seed=3)
    ref_kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else None
    assert_exact(model, oto, fresh_like(x) if x.is_floating_point() else x, ref_kwargs=ref_kwargs)


@pytest.mark.parametrize("name,shape,heads", [
    ("vit_b_16", (1, 3, 32, 32), 12),
    ("vit_b_32", (1, 3, 64, 64), 12),
    ("swin_t", (1, 3, 64, 64), 3),
    ("swin_v2_t", (1, 3, 64, 64), 3),
    ("maxvit_t", (1, 3, 224, 224), 2),
])
def test_torchvision_transformers_heads_and_mlp_exact(name, shape, heads):
    torch.manual_seed(0)
    kw = {"image_size": shape[-1]} if name.startswith("vit") else {}
    model = randomize(torchvision.models.get_model(name, **kw).eval())
    x = torch.randn(shape)
    oto = otofx.OTO(model, x)
    assert any(z.rows == heads for z in oto.groups), [z.rows for z in oto.groups]
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, x)


def _tiny_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)


def _zero_heads(model, oto, layer_param, heads):
    """Zero rows ``heads`` of the head group holding ``layer_param`` (dim 0), nothing else."""
    rows = []
    for z in oto.groups:
        hit = any(n == layer_param and d == 0 for n, d, _ in z.params)
        rows.append(torch.tensor(heads if hit else [], dtype=torch.long))
    assert any(len(r) for r in rows), f"no head group holds {layer_param}"
    zero_rows(model, oto, rows)


def test_torchvision_vit_two_heads_fewer():
    from otofx.passes.modules import PrunedMultiheadAttention

    model = randomize(_tiny_vit().eval())
    x = torch.randn(2, 3, 32, 32)
    oto = otofx.OTO(model, x)
    _zero_heads(model, oto, "encoder.layers.encoder_layer_0.self_attention.in_proj_weight", [0, 2])
    small = assert_exact(model, oto, x)
    attn = small.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2 and attn.head_dim == 8
    assert attn.in_proj_weight.shape == (3 * 16, 32) and attn.out_proj.weight.shape == (32, 16)
    assert attn.kept_heads.tolist() == [1, 3]
    # the other layer keeps all four heads and its stock module
    assert isinstance(small.get_submodule("encoder.layers.encoder_layer_1.self_attention"), nn.MultiheadAttention)
    # saveable, reloadable and exportable
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.allclose(again(x), small(x))
        ep = torch.export.export(small, (x,), strict=False)
        assert torch.allclose(ep.module()(x), small(x), atol=1e-5)


def test_hugging_face_bert_two_heads_fewer():
    model, x, _ = _hf("bert")
    randomize(model.eval())
    oto = otofx.OTO(model, x)
    _zero_heads(model, oto, "encoder.layer.0.attention.self.query.weight", [1, 3])
    small = assert_exact(model, oto, x)
    sd = small.state_dict()
    assert sd["encoder.layer.0.attention.self.query.weight"].shape == (16, 32)
    assert sd["encoder.layer.0.attention.output.dense.weight"].shape == (32, 16)
    assert sd["encoder.layer.1.attention.self.query.weight"].shape == (32, 32)


def test_mha_per_head_attention_mask_follows_kept_heads():
    """A [batch * heads, L, S] mask is sliced to the remaining heads by the replacement module."""
    from otofx.passes.modules import PrunedMultiheadAttention

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    randomize(mha)
    q = torch.randn(2, 5, 8)
    mask = torch.randn(2 * 4, 5, 5)
    keep = torch.tensor([0, 3])
    with torch.no_grad():
        w = mha.in_proj_weight.view(3, 4, 2, 8)
        w[:, [1, 2]] = 0
        mha.in_proj_bias.view(3, 4, 2)[:, [1, 2]] = 0
        mha.out_proj.weight.view(8, 4, 2)[:, [1, 2]] = 0
        ref, _ = mha(q, q, q, attn_mask=mask, need_weights=False)
        import copy

        src = copy.deepcopy(mha)
        src.in_proj_weight = nn.Parameter(mha.in_proj_weight.view(3, 4, 2, 8)[:, keep].reshape(12, 8))
        src.in_proj_bias = nn.Parameter(mha.in_proj_bias.view(3, 4, 2)[:, keep].reshape(12))
        src.out_proj.weight = nn.Parameter(mha.out_proj.weight.view(8, 4, 2)[:, keep].reshape(8, 4))
        small = PrunedMultiheadAttention(src, 2, 2, keep, 4).eval()
        got, _ = small(q, q, q, attn_mask=mask, need_weights=False)
        got_w, _ = small(q, q, q, attn_mask=mask, need_weights=True)
    assert torch.allclose(ref, got, atol=1e-5) and torch.allclose(ref, got_w, atol=1e-5)


def test_mha_averaged_weights_used_pins_heads_but_stays_exact():
    import rule_examples as R

    model, x = R.mha_averaged_weights_used()
    randomize(model.eval())
    oto = otofx.OTO(model, x)
    assert not _has_heads(oto, R.H_, R.HD_)
    assert any("averaged over heads" in p.reason for p in oto.pinned)
    zero_random_rows(model, oto, seed=0)
    assert_exact(model, oto, x)


@pytest.mark.parametrize("factory", ["sdpa_heads", "sdpa_heads_export", "eager_heads_matmul", "einsum_heads",
                                     "packed_qkv_unbind_select", "relative_bias_table_export", "mha_batch_first",
                                     "cosine_attention_heads", "cosine_attention_heads_export",
                                     "mha_per_head_weights_used", "mha_kdim_bias_kv_padding_mask",
                                     "mha_batch_first_export", "mha_seq_first_export"])
def test_attention_spellings_find_whole_heads(factory):
    import rule_examples as R

    model, x = getattr(R, factory)()
    randomize(model.eval())
    oto = otofx.OTO(model, x)
    assert _has_heads(oto, R.H_, R.HD_), [(z.rows, [(n, d, tuple(i.shape)) for n, d, i in z.params]) for z in oto.groups]


def test_grouped_query_rows_hold_a_kv_head_and_its_query_heads():
    import rule_examples as R

    model, x = R.sdpa_grouped_query_heads()
    oto = otofx.OTO(model, x)
    z = next(z for z in oto.groups if any(n == "k.weight" for n, _, _ in z.params))
    idx = {n: i for n, d, i in z.params if d == 0}
    assert z.rows == 2 and idx["k.weight"].shape == (2, R.HD_) and idx["q.weight"].shape == (2, 2 * R.HD_)
    # kv head j serves query heads 2j and 2j + 1
    assert idx["q.weight"][1].tolist() == list(range(2 * R.HD_, 4 * R.HD_))
    zero_random_rows(model, oto, seed=0)
    assert_exact(model, oto, x)


def test_user_model_is_not_mutated_by_hugging_face_capture():
    from helpers import snapshot

    model, x, _ = _hf("gpt2")
    before = snapshot(model)
    use_cache = model.config.use_cache
    otofx.OTO(model, x)
    assert snapshot(model) == before and model.config.use_cache == use_cache
    assert n_params(model) > 0


@pytest.mark.parametrize("family", ["t5", "t5-top-off", "bart"])
def test_encoder_decoder_with_its_default_kv_cache_compresses_and_generates(family):
    """T5 and BART as they come (``config.use_cache=True``): T5's decoder stack holds a copy of the
    config and decides on the cache by itself, so capture turns the cache off in every config the
    modules hold (and puts each back), also when the top config says no cache but the decoder's
    says one (T5Gemma's configs; "t5-top-off"). The compressed model is the model's own class,
    exact, and generates what the zeroed full model generates."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family.startswith("t5"):
        cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
        m = transformers.T5ForConditionalGeneration(cfg)
    else:
        cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                      decoder_ffn_dim=64, max_position_embeddings=64)
        m = transformers.BartForConditionalGeneration(cfg)
    m = randomize(m.eval(), 0)
    if family == "t5-top-off":
        m.config.use_cache = False  # the decoder stack's own copy still says True
    ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    configs = {id(mod.config): mod.config for mod in m.modules() if getattr(mod, "config", None) is not None}
    before = {k: c.use_cache for k, c in configs.items()}
    assert any(before.values())
    oto = otofx.OTO(m, {"input_ids": ids, "decoder_input_ids": ids})
    assert {k: c.use_cache for k, c in configs.items()} == before  # every config put back
    zero_random_rows(m, oto)
    small = oto.compress()
    assert type(small) is type(m) and n_params(small) < n_params(m)
    other = torch.randint(2, 64, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(input_ids=other, decoder_input_ids=other[:, :5]).logits
        got = small(input_ids=other, decoder_input_ids=other[:, :5]).logits
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item()) and ref.abs().max() > 0
    assert torch.equal(m.generate(ids[:, :4], max_new_tokens=4, do_sample=False),
                       small.generate(ids[:, :4], max_new_tokens=4, do_sample=False))
