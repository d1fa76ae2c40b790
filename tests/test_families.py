"""Today's model families: per-head q/k norms, norms over all heads, fused experts, disentangled attention.

Tiny Hugging Face configs (hidden 32, 4 query heads of 8 over 2 key/value heads, one layer), random
weights with random norm weights and biases (``helpers.randomize``). For each family: which groups
are found (heads counted), and zeroing half of every group's rows compresses exactly (1e-4 relative,
float32). The fixed subset of ``bench/hf_sweep.py`` runs here too.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import otofx
from helpers import assert_exact, randomize, zero_random_rows, zero_rows

pytestmark = pytest.mark.usefixtures("single_thread")

transformers = pytest.importorskip("transformers")

L = 12
COMMON = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64)


def _ids():
    return torch.randint(0, 100, (2, L), generator=torch.Generator().manual_seed(0))


def _build(name):
    T = transformers
    if name == "qwen3":
        return T.Qwen3ForCausalLM(T.Qwen3Config(**COMMON, head_dim=8))
    if name == "gemma3":
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=8))
    if name == "olmo2":
        return T.Olmo2ForCausalLM(T.Olmo2Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    if name == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))
    if name == "qwen2_moe":
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(**COMMON, moe_intermediate_size=16, num_experts=4,
                                                      shared_expert_intermediate_size=48, num_experts_per_tok=2))
    if name == "deberta_v2":
        c = dict(COMMON, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                 max_relative_positions=16)
        c.pop("num_key_value_heads")
        return T.DebertaV2Model(T.DebertaV2Config(**c))
    # heads through ops the sweep found pinning them (issue 14, second pass)
    one = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    if name == "falcon":  # multi-query; the fused linear's weight is used as ``weight.T`` (numpy_T)
        return T.FalconForCausalLM(T.FalconConfig(**one, multi_query=True, new_decoder_architecture=False))
    if name == "gpt_bigcode":  # multi-query: one key/value head expanded to every query head
        return T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4,
                                                          n_positions=64, multi_query=True))
    if name == "bloom":  # ALiBi: per-head slopes computed in the graph from arange(1, H + 1)
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=100, hidden_size=32, n_layer=1, n_head=4))
    if name == "mpt":  # ALiBi: slopes 1 / 2 ** (arange * c)
        return T.MptForCausalLM(T.MptConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=4, expansion_ratio=2,
                                            max_seq_len=64))
    if name == "llama4":  # rotary in complex numbers (view_as_complex), a top-k router
        return T.Llama4ForCausalLM(T.Llama4TextConfig(
            **COMMON, head_dim=8, intermediate_size_mlp=64, num_local_experts=4, num_experts_per_tok=1,
            moe_layers=[0], layer_types=["full_attention"], no_rope_layers=[1], attention_chunk_size=16))
    if name == "hrm":  # a per-head sigmoid gate multiplied into the attention output
        return T.HrmTextForCausalLM(T.HrmTextConfig(**dict(COMMON, num_key_value_heads=4), head_dim=8,
                                                    num_layers_per_stack=1, H_cycles=1, L_cycles=1, L_bp_cycles=[1]))
    if name == "phi3":  # q, k and v in one fused projection under GQA; the config has no head_dim field
        return T.Phi3ForCausalLM(T.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=0, eos_token_id=0))
    if name == "deepseek_v3":  # multi-head latent attention (keys built by slice writes), routed + shared experts
        return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=64))
    if name.startswith("mamba2"):  # state-space heads: in_proj split by tensor_split, B/C groups repeated to heads
        groups = 2 if name == "mamba2_groups" else 1
        return T.Mamba2ForCausalLM(T.Mamba2Config(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_heads=8,
                                                  head_dim=8, state_size=16, n_groups=groups, expand=2, chunk_size=8))
    raise KeyError(name)


def _model(name):
    torch.manual_seed(0)
    return randomize(_build(name).eval())


def _head_groups(oto, q_param):
    """Groups holding the rows of ``q_param`` (dim 0): (rows, positions per row)."""
    return [(z.rows, idx.shape[1]) for z in oto.groups for n, d, idx in z.params if n == q_param and d == 0]


def _kwargs(model):
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else None


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "olmo2"])
def test_qk_norm_heads_found_and_exact(name, caplog):
    """Per-head q/k norms (Qwen3, Gemma 3: over head_dim) and a norm over all heads (OLMo 2: over
    num_heads * head_dim, before the split) keep whole heads as rows: each row is a key/value head
    with its two query heads (2 rows of 16 query positions)."""
    model = _model(name)
    oto = otofx.OTO(model, _ids())
    heads = _head_groups(oto, "model.layers.0.self_attn.q_proj.weight")
    assert heads == [(2, 16)], heads
    z = next(z for z in oto.groups if any(n.endswith("q_proj.weight") and d == 0 for n, d, _ in z.params))
    names = {n for n, _, _ in z.params}
    if name == "olmo2":  # the norm's weight spans every head: its slices belong to the head rows
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= names
    else:  # one [head_dim] weight shared by every head: it stays whole
        assert not any("norm" in n for n in names)
    assert any(z.rows == 64 for z in oto.groups)  # the MLP width
    zero_random_rows(model, oto, seed=3)
    assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    if name == "olmo2":
        # the graph keeps the mean's old divisor; the own class divides by the new width, so the
        # norm's eps and weight absorb the ratio (eps * 16/8, weight * sqrt(16/8) on kept heads)
        assert_exact(model, oto, _ids(), small=oto.compress(form="graph"), ref_kwargs=_kwargs(model))
        small = oto.compress()
        assert isinstance(small, type(model))
        full, q = model.model.layers[0].self_attn.q_norm, small.model.layers[0].self_attn.q_norm
        assert q.weight.shape == (16,) and q.variance_epsilon == pytest.approx(full.variance_epsilon * 2)
        x = _ids()[:1, :5]
        assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False),
                           model.generate(x, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_residual_stream_of_rms_norms_is_a_group(name):
    """Every norm on the residual stream is an RMS norm: the hidden width is one group (the embedding's
    columns, every o_proj/down_proj row, every norm weight entry, every reader's input column); the
    model comes back as its own class at the new hidden size, each norm's eps and weight refolded
    (Gemma's weight read as 1 + w), with the full model's greedy tokens."""
    model = _model(name)
    oto = otofx.OTO(model, _ids())
    stream = [z for z in oto.groups if any(n == "model.embed_tokens.weight" and d == 1 for n, d, _ in z.params)]
    assert [z.rows for z in stream] == [32]
    names = {n for n, _, _ in stream[0].params}
    assert {"model.norm.weight", "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight"} <= names
    assert not any("q_norm" in n for n in names)  # the per-head norms over head_dim are not on the stream
    zero_random_rows(model, oto, seed=5)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model)) and small.config.hidden_size == 16
    full, new = model.model.norm, small.model.norm
    assert new.weight.shape == (16,)
    assert getattr(new, "eps", getattr(new, "variance_epsilon", None)) == pytest.approx(
        getattr(full, "eps", getattr(full, "variance_epsilon", None)) * 2)
    x = _ids()[:1, :5]
    assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False),
                       model.generate(x, max_new_tokens=4, do_sample=False))


def test_residual_stream_pinned_by_request():
    """``pin=`` naming the embedding keeps the hidden width whole; heads and MLP widths stay rows."""
    model = _model("qwen3")
    oto = otofx.OTO(model, _ids(), pin=("model.embed_tokens",))
    assert not any(n == "model.embed_tokens.weight" for z in oto.groups for n, _, _ in z.params)
    assert _head_groups(oto, "model.layers.0.self_attn.q_proj.weight") == [(2, 16)]


@pytest.mark.parametrize("name,width", [("mixtral", 64), ("qwen2_moe", 16)])
def test_fused_experts_widths_found_exact_and_generate(name, width):
    """Each expert's intermediate width is one group, tied across experts (the fused [E, 2I, H] and
    [E, H, I] tensors keep experts equal-width: row i is channel i of every expert); experts are
    pinned (routing picks them by data); Qwen2-MoE's shared expert is another group."""
    model = _model(name)
    oto = otofx.OTO(model, _ids())
    ez = [z for z in oto.groups if any(n.endswith("experts.gate_up_proj") and d == 1 for n, d, _ in z.params)]
    assert [z.rows for z in ez] == [width]
    idx = {n.rsplit(".", 1)[-1]: (d, i.shape) for n, d, i in ez[0].params}
    assert idx == {"gate_up_proj": (1, (width, 2)), "down_proj": (2, (width, 1))}  # gate row i and up row i
    assert any("routing" in p.reason for p in oto.pinned)
    if name == "qwen2_moe":
        assert any(z.rows == 48 and any("shared_expert.gate_proj" in n for n, _, _ in z.params) for z in oto.groups)
    zero_random_rows(model, oto, seed=1)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model))
    if name == "mixtral":
        # a config with head_dim None derives it from hidden_size // num_attention_heads: the hidden
        # width and the head count both halved, so head_dim is written down and the config is exact
        c = small.config
        assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (16, 2, 1, 8)
        with torch.device("meta"):
            rebuilt = type(small)(c)
        assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in small.named_parameters()}
        assert rebuilt.model.layers[0].self_attn.head_dim == small.model.layers[0].self_attn.head_dim == 8
    x = _ids()[:1, :5]
    full = model.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(small.generate(x, max_new_tokens=5, do_sample=False), full)


def test_gemma4_hidden_and_per_layer_widths(tmp_path):
    """Gemma 4: norms written as ``h * (mean(h ** 2) + eps) ** -0.5``, per-layer input embeddings
    (PLE) reshaped by ``hidden_size_per_layer_input``, a full-attention layer of wider heads. The
    hidden width, the PLE width, the heads and the MLP widths are groups; the own class comes back
    at the new sizes with a config that builds it (the text model's reshape width follows the
    config), generates the full model's tokens and survives otofx.save/load."""
    T = transformers
    cfg = T.Gemma4TextConfig(**dict(COMMON, num_hidden_layers=2), head_dim=8, hidden_size_per_layer_input=8,
                             vocab_size_per_layer_input=100, layer_types=["sliding_attention", "full_attention"],
                             sliding_window=8, global_head_dim=16)
    torch.manual_seed(0)
    model = randomize(T.Gemma4ForCausalLM(cfg).eval())
    oto = otofx.OTO(model, _ids())
    rows = {n: z.rows for z in oto.groups for n, d, _ in z.params if d == 1 and n in (
        "model.embed_tokens.weight", "model.embed_tokens_per_layer.weight")}
    assert rows == {"model.embed_tokens.weight": 32, "model.embed_tokens_per_layer.weight": 8}
    assert _head_groups(oto, "model.layers.1.self_attn.q_proj.weight") == [(2, 32)]
    zero_random_rows(model, oto, seed=2)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model))
    c = small.config
    assert (c.hidden_size, c.hidden_size_per_layer_input, c.num_attention_heads, c.intermediate_size) == (16, 4, 2, 32)
    assert small.model.hidden_size_per_layer_input == 4
    x = _ids()[:1, :5]
    full = model.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(small.generate(x, max_new_tokens=5, do_sample=False), full)
    otofx.save(small, tmp_path / "m")
    assert torch.equal(otofx.load(tmp_path / "m").generate(x, max_new_tokens=5, do_sample=False), full)
    # the config describes it in full: the embedding scales sqrt(hidden), the per-layer projection's
    # hidden ** -0.5 and every norm's eps follow it, so the plain class's from_pretrained gives it back
    assert not hasattr(c, "otofx_widths")
    assert small.model.per_layer_model_projection_scale == 16 ** -0.5
    assert small.model.embed_tokens.scalar_embed_scale == 16 ** 0.5
    small.save_pretrained(tmp_path / "hf")
    back = T.Gemma4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, small(_ids()).logits, rtol=0, atol=0)
    assert torch.equal(back.generate(x, max_new_tokens=5, do_sample=False), full)


def test_gemma3n_per_layer_widths_in_its_config(tmp_path):
    """Gemma 3n keeps one MLP width per layer (``intermediate_size`` is a list) and reshapes its
    per-layer inputs by ``hidden_size_per_layer_input``: layers pruned to different widths come back
    as the own class with the list fitted entry by entry and the PLE width re-synced."""
    T = transformers
    cfg = T.Gemma3nTextConfig(**dict(COMMON, num_hidden_layers=2, intermediate_size=[64, 64]), head_dim=8,
                              num_kv_shared_layers=0, vocab_size_per_layer_input=100, hidden_size_per_layer_input=8,
                              layer_types=["sliding_attention", "full_attention"], sliding_window=8, laurel_rank=8)
    torch.manual_seed(0)
    model = randomize(T.Gemma3nForCausalLM(cfg).eval())
    oto = otofx.OTO(model, _ids())

    def rows(z):
        # NB: by the axis a group owns: the hidden width's group (a group too) reads every gate_proj
        names = {(n, d) for n, d, _ in z.params}
        if ("model.layers.0.mlp.gate_proj.weight", 0) in names:
            return torch.tensor([0])
        if ("model.layers.1.mlp.gate_proj.weight", 0) in names:
            return torch.tensor([1, 2, 3])
        if any(n == "model.embed_tokens_per_layer.weight" for n, _ in names):
            return torch.tensor([0, 5])
        return torch.tensor([], dtype=torch.long)

    zero_rows(model, oto, [rows(z) for z in oto.groups])
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model))
    assert small.config.intermediate_size == [63, 61] and small.config.hidden_size_per_layer_input == 6
    assert small.model.hidden_size_per_layer_input == small.model.layers[1].hidden_size_per_layer_input == 6
    with torch.device("meta"):
        rebuilt = type(small)(small.config)
    assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in small.named_parameters()}
    x = _ids()[:1, :5]
    full = model.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False), full)
    otofx.save(small, tmp_path / "m")
    assert torch.equal(otofx.load(tmp_path / "m").generate(x, max_new_tokens=4, do_sample=False), full)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_eager_experts_are_captured_and_keep_the_users_setting(name):
    """``experts_implementation="eager"`` loops over the experts a batch hits (data-dependent): the
    capture runs the experts on batched_mm and finds the same groups; the user's model, and the
    compressed own class, keep "eager" and give the full model's tokens."""
    fused = otofx.OTO(_model(name), _ids())
    model = _model(name)
    model.config._experts_implementation = "eager"
    oto = otofx.OTO(model, _ids())
    assert model.config._experts_implementation == "eager"
    assert sorted(z.rows for z in oto.groups) == sorted(z.rows for z in fused.groups)
    zero_random_rows(model, oto, seed=3)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model)) and small.config._experts_implementation == "eager"
    assert model.config._experts_implementation == "eager"
    x = _ids()[:1, :5]
    assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False),
                       model.generate(x, max_new_tokens=4, do_sample=False))


def test_fused_experts_odd_width_still_generates():
    """A kept width grouped_mm cannot take (strides not a multiple of 16 bytes): the compressed model
    runs its experts with batched_mm and still gives the full model's tokens."""
    model = _model("mixtral")
    oto = otofx.OTO(model, _ids())
    rows = [torch.tensor([0, 5, 9]) if any(n.endswith("experts.down_proj") and d == 2 for n, d, _ in z.params)
            else torch.tensor([], dtype=torch.long) for z in oto.groups]
    zero_rows(model, oto, rows)
    small = oto.compress(form="module")
    assert small.model.layers[0].mlp.experts.down_proj.shape[-1] == 61
    x = _ids()[:1, :5]
    assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False),
                       model.generate(x, max_new_tokens=4, do_sample=False))


def test_deberta_v2_heads_found_and_exact():
    """Disentangled attention: each head is a row with its query/key/value and its relative-position
    key/query projections; the c2p/p2c position indices (expanded over batch x heads) follow."""
    model = _model("deberta_v2")
    oto = otofx.OTO(model, _ids())
    z = next(z for z in oto.groups if any(n.endswith("query_proj.weight") for n, _, _ in z.params))
    assert z.rows == 4
    names = {n.rsplit(".", 2)[-2] for n, _, _ in z.params}
    assert {"query_proj", "key_proj", "value_proj", "pos_key_proj", "pos_query_proj", "dense"} <= names
    zero_random_rows(model, oto, seed=2)
    assert_exact(model, oto, _ids())
    assert_exact(model, oto, _ids(), small=oto.compress(form="graph"))


@pytest.mark.parametrize("name,q,rows,form", [
    ("falcon", "transformer.h.0.self_attention.query_key_value.weight", 4, "module"),
    ("gpt_bigcode", "transformer.h.0.attn.c_attn.weight", 4, "module"),
    ("bloom", "transformer.h.0.self_attention.query_key_value.weight", 4, "kept"),
    ("mpt", "transformer.blocks.0.attn.Wqkv.weight", 4, "kept"),
    ("llama4", "model.layers.0.self_attn.q_proj.weight", 2, "module"),
    ("hrm", "model.L_module.layers.0.self_attn.q_proj.weight", 4, "module"),
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight", 2, "module"),
])
def test_heads_found_and_exact(name, q, rows, form, caplog):
    """Each family's heads are rows of whole heads (8 positions each, 24 where q, k and v interleave per head; multi-query: each query head alone, its
    copies of the one key/value head are dropped with it; Llama 4: a key/value head with its two
    query heads); zeroing half of them compresses exactly. The ALiBi families keep their heads in their
    own class (its forward would compute slopes for the new head count), with a warning; the graph
    form keeps the old slopes of the kept heads and removes the others."""
    model = _model(name)
    oto = otofx.OTO(model, _ids())
    heads = _head_groups(oto, q)  # (rows, positions of the projection per row)
    assert any(r == rows and k % (8 * (4 // rows)) == 0 for r, k in heads), heads
    zero_random_rows(model, oto, seed=4)
    with caplog.at_level("WARNING", logger="otofx"):
        small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, torch.fx.GraphModule) == (form == "graph")
    if form == "kept":  # its own class, the heads' zero rows kept; generate() as the model's
        msg = " ".join(r.getMessage() for r in caplog.records)
        attn = q.rsplit(".", 2)[0]  # the attention module: blamed by name
        assert "keeps the 2 zero row(s) of 1 group(s)" in msg and attn in msg and "bug in otofx" not in msg, msg
        x = _ids()[:1, :5]
        assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False),
                           model.generate(x, max_new_tokens=4, do_sample=False))
        graph = assert_exact(model, oto, _ids(), small=oto.compress(form="graph"), ref_kwargs=_kwargs(model))
        assert sum(p.numel() for p in graph.parameters()) < sum(p.numel() for p in small.parameters())
    if name == "phi3":  # its forward reads config.num_attention_heads; head_dim (hidden // heads) is written down
        c = small.config
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size) == (2, 1, 8, 16)
        x = _ids()[:1, :5]
        assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False),
                           model.generate(x, max_new_tokens=4, do_sample=False))
    if form == "graph":  # the fallback from the model's own class says why, and does not call it an otofx bug
        msg = " ".join(r.getMessage() for r in caplog.records if "returns a torch.fx GraphModule" in r.getMessage())
        assert "forward fails at the new widths" in msg and "bug in otofx" not in msg, msg


def test_state_space_heads_found_and_exact(tmp_path):
    """Mamba 2 (and the hybrids built on its mixer: Bamba, Granite 4, Nemotron-H, Falcon-H1): each SSM
    head is a row (its x and z rows of in_proj, its conv channels, dt, A_log, D and norm weight, its
    out_proj columns). The input projection is cut by ``tensor_split``, the sequence padded to whole
    chunks (``F.pad`` by a width computed at run time), the decay summed by ``cumsum`` along the
    sequence, and the one group of B/C repeated to every head by ``repeat_interleave`` (each head's
    copy dropped with it). Half the heads zeroed: the model's own class is exact (the gated norm
    over all heads divides by the new width: its eps and weight absorb the ratio), generates the
    same tokens, and saves and loads back; the graph is exact too."""
    model = _model("mamba2")
    oto = otofx.OTO(model, _ids())
    z = next(z for z in oto.groups if any(n.endswith("mixer.A_log") for n, _, _ in z.params))
    assert z.rows == 8
    shapes = {n.rsplit("mixer.", 1)[1]: (d, i.shape[1]) for n, d, i in z.params}
    assert shapes["in_proj.weight"] == (0, 8 + 8 + 1) and shapes["out_proj.weight"] == (1, 8), shapes
    assert shapes["A_log"] == (0, 1) and shapes["conv1d.weight"] == (0, 8)
    assert not [p for p in oto.pinned if "no rule" in p.reason]
    zero_random_rows(model, oto, seed=2)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model)) and small.backbone.layers[0].mixer.A_log.shape == (4,)
    assert small.backbone.layers[0].mixer.num_heads == 4
    assert_exact(model, oto, _ids(), small=oto.compress(form="graph"), ref_kwargs=_kwargs(model))
    x = _ids()[:1, :5]
    full = model.generate(x, max_new_tokens=4, do_sample=False)
    assert torch.equal(small.generate(x, max_new_tokens=4, do_sample=False), full)
    otofx.save(small, tmp_path / "m")
    assert torch.equal(otofx.load(tmp_path / "m").generate(x, max_new_tokens=4, do_sample=False), full)


def test_state_space_groups_of_heads_are_rows():
    """Mamba 2 with 2 groups of B/C (4 heads each): a group's B/C channels are read by its 4 heads, so
    a row is a group with its heads; half of them zeroed, the own class holds one group (n_groups
    and the widths re-synced) and is exact."""
    model = _model("mamba2_groups")
    oto = otofx.OTO(model, _ids())
    z = next(z for z in oto.groups if any(n.endswith("mixer.A_log") for n, _, _ in z.params))
    assert z.rows == 2 and dict((n.rsplit("mixer.", 1)[1], i.shape[1]) for n, _, i in z.params)["A_log"] == 4
    zero_random_rows(model, oto, seed=2)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    mixer = small.backbone.layers[0].mixer
    assert isinstance(small, type(model)) and (mixer.n_groups, mixer.num_heads) == (1, 4)


def test_latent_attention_heads_found_exact_generate_and_save(tmp_path):
    """DeepSeek V3's multi-head latent attention writes each head's keys into a fresh buffer (its
    no-position part from kv_b_proj, then the one shared rotary part): capture turns the writes into
    the ``cat`` they compute, so each head is a row of q_b_proj and kv_b_proj rows and o_proj
    columns (16 query positions, 16 key/value positions, 8 output columns). Half of them zeroed: the
    own class is exact, generates the same tokens with its cache, and saves and loads back."""
    model = _model("deepseek_v3")
    oto = otofx.OTO(model, _ids())
    for layer in (0, 1):
        a = f"model.layers.{layer}.self_attn."
        z = next(z for z in oto.groups if any(n == a + "q_b_proj.weight" and d == 0 for n, d, _ in z.params))
        assert z.rows == 4
        shapes = {n[len(a):]: (d, i.shape[1]) for n, d, i in z.params}
        assert shapes == {"q_b_proj.weight": (0, 16), "kv_b_proj.weight": (0, 16), "o_proj.weight": (1, 8)}
        # the low ranks sit behind RMS norms (q_a_layernorm, kv_a_layernorm): each is a group too
        for proj, rank in (("q_a_proj", 16), ("kv_a_proj_with_mqa", 16)):
            assert any(z.rows == rank and any(n == a + proj + ".weight" and d == 0 for n, d, _ in z.params)
                       for z in oto.groups), proj
    assert not any(p.op in ("new_empty.default", "copy_.default") for p in oto.pinned)
    zero_random_rows(model, oto, seed=3)
    small = assert_exact(model, oto, _ids(), ref_kwargs=_kwargs(model))
    assert isinstance(small, type(model))
    attn = small.model.layers[0].self_attn
    assert attn.q_b_proj.out_features < 64 and attn.kv_lora_rank == 8 and attn.q_a_layernorm.weight.shape == (8,)
    x = _ids()[:1, :5]
    full = model.generate(x, max_new_tokens=5, do_sample=False)
    assert torch.equal(small.generate(x, max_new_tokens=5, do_sample=False), full)
    otofx.save(small, tmp_path / "m")
    back = otofx.load(tmp_path / "m")
    assert torch.equal(back.generate(x, max_new_tokens=5, do_sample=False), full)


def _gemma3_vlm():
    """A tiny Gemma3ForConditionalGeneration (text and vision towers of width 32), random weights, and text ids."""
    T = transformers
    cfg = T.Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = randomize(T.Gemma3ForConditionalGeneration(cfg).eval())
    return cfg, model, torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def test_multimodal_gemma3_with_images_compresses_both_towers():
    """Gemma 3 as it ships for 4B and up (Gemma3ForConditionalGeneration) on text and an image: the
    vision tower's heads and MLP widths and the language model's are groups (the projector between
    them is pinned by its norm); half of each zeroed, the own class is exact on both inputs and
    generates the same tokens from the same image."""
    cfg, model, ids = _gemma3_vlm()
    ids[:, 1:5] = cfg.image_token_id
    x = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    oto = otofx.OTO(model, x)
    towers = {n.split(".")[1] for z in oto.groups for n, _, _ in z.params}
    assert towers == {"vision_tower", "language_model"}
    # text: 2 key/value heads; vision: 4 heads; the vision tower's attention-pooling head, which runs and
    # whose result Gemma 3 drops, is sized with what it reads: its heads (1) and widths are groups of their own
    assert sorted(z.rows for z in oto.groups) == [1, 2, 4, 32, 32, 64, 64, 64]
    zero_random_rows(model, oto, seed=5)
    small = oto.compress()
    assert isinstance(small, type(model))
    kw = {"use_cache": False}
    with torch.no_grad():
        torch.testing.assert_close(small(**x, **kw).logits, model(**x, **kw).logits, rtol=1e-4, atol=1e-5)
    one = {"input_ids": ids[:1, :8], "pixel_values": x["pixel_values"][:1]}
    assert torch.equal(small.generate(**one, max_new_tokens=4, do_sample=False),
                       model.generate(**one, max_new_tokens=4, do_sample=False))


def test_multimodal_text_only_capture_names_what_it_did_not_reach(caplog):
    """Gemma 3 as a vision-language model captured on text alone: the vision tower and the projector
    are never reached. The report lists them, compress() warns by name, and the language model is
    compressed (hidden width in the nested text_config) and exact on text."""
    cfg, model, ids = _gemma3_vlm()
    oto = otofx.OTO(model, {"input_ids": ids})
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    assert {(u.module, u.numel) for u in oto.unread} == {
        ("model.vision_tower", vision),
        ("model.multi_modal_projector", sum(p.numel() for p in model.model.multi_modal_projector.parameters()))}
    text = oto.report()
    assert "not reached by the example input" in text and "model.vision_tower" in text
    zero_random_rows(model, oto, seed=5)
    with caplog.at_level("WARNING", logger="otofx"):
        small = assert_exact(model, oto, ids, ref_kwargs={"use_cache": False})
    said = " ".join(r.getMessage() for r in caplog.records if "never reached" in r.getMessage())
    assert "model.vision_tower" in said and "model.multi_modal_projector" in said
    assert isinstance(small, type(model)) and small.config.text_config.hidden_size == 16
    # the language model reads the fitted nested config itself, not a stale copy of the old one
    assert small.model.language_model.config is small.config.text_config
    assert model.model.language_model.config is model.config.text_config
    assert model.config.text_config.hidden_size == 32


def test_unread_parameters_are_named_and_kept():
    """A module the forward never calls is listed (outermost module, numel); a tied weight read under
    one name is read."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)
            self.spare = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
            self.tied = torch.nn.Linear(4, 8)
            self.tied.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    model = Net().eval()
    oto = otofx.OTO(model, torch.randn(2, 4))
    assert [(u.module, u.count, u.numel) for u in oto.unread] == [("spare", 4, 9 + 3 + 6 + 2), ("tied.bias", 1, 8)]
    small = oto.compress()
    assert small.spare[0].weight.shape == (3, 3)


def _sweep():
    path = Path(__file__).resolve().parent.parent / "bench" / "hf_sweep.py"
    spec = importlib.util.spec_from_file_location("hf_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("hf_sweep", mod)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_subset():
    """bench/hf_sweep.py's automatic config shrinker and checks on its fixed CI subset."""
    sweep = _sweep()
    task, family = sweep.CI_SUBSET[0]
    cls = dict(((t, m), c) for t, m, c in sweep.entries((task,)))[(task, family)]
    row = sweep.run_one(task, family, cls, peers=False)
    assert row.built and row.analysed and row.exact, row
    assert row.head_rows and row.mlp_rows
    assert row.hub == "exact", row  # Qwen 3, its hidden width halved: save_pretrained + from_pretrained


@pytest.mark.parametrize("name", ["qwen3", "falcon"])
def test_head_pruned_config_and_save_load(name, tmp_path):
    """After head pruning, the compressed model's config describes the new widths where the
    architecture reads them (Qwen3: num_attention_heads / num_key_value_heads, head_dim kept); where
    it cannot (Falcon derives head_dim from hidden_size / num_attention_heads), the new per-module
    counts go to ``config.otofx_widths``. otofx.save / otofx.load give the same model back."""
    model = _model(name)
    oto = otofx.OTO(model, _ids())
    q = "self_attn.q_proj" if name == "qwen3" else "self_attention.query_key_value"
    rows = [torch.tensor([1]) if z.rows > 1 and any(q in n and d == 0 for n, d, _ in z.params)
            else torch.tensor([], dtype=torch.long) for z in oto.groups]
    zero_rows(model, oto, rows)
    small = oto.compress()
    assert isinstance(small, type(model))
    c = small.config
    if name == "qwen3":  # one key/value head of two left, with its two query heads
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, 8)
        assert not hasattr(c, "otofx_widths")
        rebuilt = type(small)(c)
        assert {n: p.shape for n, p in rebuilt.named_parameters()} == {n: p.shape for n, p in small.named_parameters()}
    else:  # multi-query: three query heads over the one key/value head
        assert c.num_attention_heads == 4
        assert c.otofx_widths["transformer.h.0.self_attention"] == {"num_heads": 3, "split_size": 24,
                                                                    "num_key_value_groups": 3}
    otofx.save(small, tmp_path / "m")
    back = otofx.load(tmp_path / "m")
    kw = _kwargs(model)
    with torch.no_grad():
        assert torch.equal(back(_ids(), **kw).logits, small(_ids(), **kw).logits)
    x = _ids()[:1, :5]
    assert torch.equal(back.generate(x, max_new_tokens=4, do_sample=False),
                       model.generate(x, max_new_tokens=4, do_sample=False))


def _stream_group(oto, model):
    """The group holding the token embedding's columns (the residual stream), or None."""
    name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings()) + ".weight"
    hits = [z for z in oto.groups if any(n == name and d == 1 for n, d, _ in z.params)]
    return hits[0] if hits else None


@pytest.mark.parametrize("family,cls", [
    ("hy_v4", "HYV4ForCausalLM"),  # hyper-connections: hc_mult copies of the stream flattened with it
    ("deepseek_v4", "DeepseekV4ForCausalLM"),  # the same (mHC), with a weightless norm before the mixing
    ("gemma3n_text", "Gemma3nForCausalLM"),  # AltUp: corrected[1:] += first (copy_), magnitude matching
])
def test_hidden_width_of_stream_copies(family, cls):
    """Models that carry several copies of the residual stream (hyper-connections, AltUp) keep one row
    per hidden channel: the merge of the copies with the hidden width keeps the hidden width's rows
    (the copies are mixed by data), an in-place update of a slice of the copies follows its base, and
    AltUp's magnitude matching (``h * rms(g) / rms(h)``) is scaled for in the own class. Half the rows
    zeroed, the model's own class is exact, loads through ``from_pretrained`` where its config allows
    (HY v4, DeepSeek V4: the hyper-connections' norms take their eps back and the stream scales), and
    generates the full model's tokens."""
    sweep = _sweep()
    cfg, model, x, kwargs = sweep.build("causal-lm", family, cls)
    oto = otofx.OTO(model, x)
    stream = _stream_group(oto, model)
    assert stream is not None and stream.rows == cfg.hidden_size, [p.reason for p in oto.pinned]
    zero_random_rows(model, oto, seed=0)
    small = oto.compress(form="module")
    assert isinstance(small, type(model)) and small.config.hidden_size == cfg.hidden_size - cfg.hidden_size // 2
    assert_exact(model, oto, x["input_ids"], small=small, ref_kwargs=kwargs)
    assert_exact(model, oto, sweep.example_input("causal-lm", cfg, 1)["input_ids"], small=small, ref_kwargs=kwargs)
    if family != "gemma3n_text":  # NB: no config field holds Gemma 3n's narrowed per-layer widths
        assert sweep._hub_round_trip(model, small, x, kwargs) == "exact"
    ids = x["input_ids"][:1, :5]
    assert torch.equal(small.generate(ids, max_new_tokens=5, do_sample=False),
                       model.generate(ids, max_new_tokens=5, do_sample=False))


class _GroupedRMSNorm(torch.nn.Module):
    """Qwen4-Exp's hyper-connection norm: an RMS norm over each group of ``group_size`` entries (one
    per copy of the stream), its ``1 + w`` weight over all of them."""

    def __init__(self, width, group_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(width))
        self.group_size, self.eps = group_size, eps

    def forward(self, x):
        g = x.float().reshape(*x.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * (1.0 + self.weight.float())).type_as(x)


class _HyperBlock(torch.nn.Module):
    """Qwen4-Exp's gated residual around an MLP: the block reads the mean of the normed copies, and
    its output is injected into each copy by a gate per copy (``out[..., None, :] * w[..., :, None]``
    flattened back to ``hc_count * hidden_size``)."""

    def __init__(self, hidden, hc):
        super().__init__()
        self.hc_count, self.hidden_size = hc, hidden
        self.norm = _GroupedRMSNorm(hc * hidden, hidden)
        self.inject = torch.nn.Linear(hc * hidden, hc, bias=False)
        self.up, self.down = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)

    def forward(self, h):
        n = self.norm(h)
        mixed = n.unflatten(-1, (self.hc_count, self.hidden_size)).mean(-2)
        out = self.down(torch.relu(self.up(mixed)))
        w = torch.sigmoid(self.inject(n))
        return h + (out.unsqueeze(-2) * w.unsqueeze(-1)).flatten(-2)


class _HyperLM(torch.nn.Module):
    def __init__(self, vocab=50, hidden=16, hc=4):
        super().__init__()
        self.hc = hc
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList([_HyperBlock(hidden, hc) for _ in range(2)])
        self.head = torch.nn.Linear(hidden, vocab)

    def get_input_embeddings(self):  # NB: as a Hugging Face model says which table is the stream's
        return self.embed

    def forward(self, ids):
        h = self.embed(ids).repeat(1, 1, self.hc)
        for b in self.blocks:
            h = b(h)
        return self.head(h.unflatten(-1, (self.hc, -1)).mean(-2))


def test_hyper_connection_stream_of_grouped_norms():
    """Qwen4-Exp's hyper-connections: the stream repeated over ``hc_count`` copies, each block's output
    injected into every copy by a per-copy gate (the flatten merges the gates' axis, a channel axis of
    the inject layer, with the hidden width). The analysis keeps the hidden width's rows there (the
    gates' axis ends pinned: a first run kept it), and the own class re-syncs the grouped norms'
    ``group_size`` (the hidden width) and refolds their eps and ``1 + w`` weight over all the copies."""
    torch.manual_seed(0)
    model = randomize(_HyperLM().eval())
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    oto = otofx.OTO(model, ids)
    stream = [z for z in oto.groups if any(n == "embed.weight" and d == 1 for n, d, _ in z.params)]
    assert [z.rows for z in stream] == [16], [p.reason for p in oto.pinned]
    assert any("merged around the channels of an inner axis" in p.reason for p in oto.pinned)
    zero_random_rows(model, oto, seed=0)
    small = oto.compress(form="module")
    assert isinstance(small, _HyperLM) and small.embed.weight.shape[1] == 8
    assert [b.norm.group_size for b in small.blocks] == [8, 8] and [b.hidden_size for b in small.blocks] == [8, 8]
    assert_exact(model, oto, ids, small=small)
    assert_exact(model, oto, torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(1)), small=small)
