"""Adapters and embedding pipelines around Hugging Face models: peft's PeftModel and sentence-transformers.

* peft (LoRA, rsLoRA, IA3, LoHa; GPT-2's Conv1D with ``fan_in_fan_out``): the base layers' rows and the
  adapters' go together (a LoRA's ``lora_B`` rows join its base layer's, ``lora_A`` reads what the base
  reads) and the LoRA rank is a group of its own; the compressed model is a PeftModel that generates the
  same tokens, merges (``merge_and_unload``) to a plain Hugging Face model with the same outputs, saves its
  adapter with ``save_pretrained`` and round-trips through ``otofx.save``/``otofx.load``; a head saved with
  ``modules_to_save`` keeps its original beside the trained copy, which is sliced as the copy is, so
  ``disable_adapter()`` and ``unload()`` stay exact. DoRA divides each
  output row by the norm of its merged weight row, which is 0 / 0 for a zero row: those rows are pinned and
  the report says why.
* sentence-transformers: each module adds its results to the features dict it was given, which made the
  export refuse its own example (captured in parts, the hidden width kept); BertModel's pooler runs and its
  result is dropped (its parameters were unread and kept their widths, and the own class failed there).
  ``free_outputs="auto"`` frees ``token_embeddings``, so the hidden width is a group.
"""
from __future__ import annotations

import os

import pytest
import torch

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def _adapted(kind: str):
    from peft import IA3Config, LoHaConfig, LoraConfig, get_peft_model

    if kind == "gpt2 lora":
        return get_peft_model(_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                                  fan_in_fan_out=True, init_lora_weights=False))
    config = {"lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=_ALL, init_lora_weights=False),
              "rslora": lambda: LoraConfig(r=4, target_modules="all-linear", use_rslora=True,
                                           init_lora_weights=False),
              "ia3": lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"], init_ia3_weights=False),
              "loha": lambda: LoHaConfig(r=4, target_modules=_ALL, init_weights=False),
              "dora": lambda: LoraConfig(r=4, target_modules=_ALL, use_dora=True, init_lora_weights=False)}[kind]
    return get_peft_model(_llama(), config())


def _tokens(b, n, seed=0):
    return torch.randint(0, 100, (b, n), generator=torch.Generator().manual_seed(seed))


def _compressed(kind: str):
    torch.manual_seed(0)
    model = randomize(_adapted(kind).eval())
    oto = otofx.OTO(model, {"input_ids": _tokens(1, 16)})
    zero_random_rows(model, oto, seed=1)
    return model, oto, oto.compress()


@pytest.mark.parametrize("kind", ["lora", "rslora", "ia3", "loha", "gpt2 lora"])
def test_adapted_model_compresses_to_a_peft_model_that_generates_and_merges(kind):
    model, oto, small = _compressed(kind)
    assert type(small) is type(model) and n_params(small) == n_params(oto.compress(form="graph"))
    assert n_params(small) < 0.5 * n_params(model), oto.report()
    x = _tokens(2, 24, seed=3)
    with torch.no_grad():
        want = model(input_ids=x).logits
        assert max_rel_diff(want, small(input_ids=x).logits) < 1e-4
        prompt = _tokens(1, 5, seed=4)
        assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False),
                           small.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
        merged = small.merge_and_unload()  # NB: the compressed copy is ours to change
        assert type(merged) is type(model.get_base_model())
        assert max_rel_diff(want, merged(input_ids=x).logits) < 1e-4


def test_lora_rank_is_a_group_and_the_adapter_saves():
    model, oto, small = _compressed("lora")
    ranks = [z for z in oto.groups if all(".lora_A." in n or ".lora_B." in n for n, _, _ in z.params)]
    assert len(ranks) == 14 and all(z.rows == 4 for z in ranks), oto.report()
    a = small.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert a.lora_A["default"].out_features == a.lora_B["default"].in_features < 4
    assert a.base_layer.out_features == a.lora_B["default"].out_features < 32
    assert small.training is False and all(p.requires_grad == q.requires_grad for p, q in
                                           zip(small.parameters(), model.parameters()))


def test_saves_and_loads_into_a_fresh_peft_model(tmp_path):
    model, oto, small = _compressed("lora")
    path = os.path.join(tmp_path, "small.otofx")
    otofx.save(small, path)
    torch.manual_seed(7)
    loaded = otofx.load(path, _adapted("lora").eval())
    x = _tokens(2, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(small(input_ids=x).logits, loaded(input_ids=x).logits)
    small.save_pretrained(os.path.join(tmp_path, "adapter"))
    assert os.path.exists(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))


def test_dora_rows_are_pinned_with_the_reason():
    """DoRA's output is ``m / ||W + s B A||_row`` times the row: a zeroed row is 0 / 0, so no output row
    of an adapted layer is zero-invariant (only their inputs would be, and those are other layers' rows)."""
    torch.manual_seed(0)
    model = randomize(_adapted("dora").eval())
    oto = otofx.OTO(model, {"input_ids": _tokens(1, 16)})
    reasons = {p.reason for p in oto.pinned}
    assert "divides by this channel" in reasons, reasons
    assert not any("linalg_norm" in r for r in reasons), reasons  # NB: the norm has its rule
    # only the LoRA ranks remain: no base layer's row is in a group
    assert oto.groups and not any("base_layer" in n and d == 0 for z in oto.groups for n, d, _ in z.params)


def _sentence_transformer(folder, dense: bool):
    from transformers import BertConfig, BertModel, BertTokenizer

    st = pytest.importorskip("sentence_transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(words))
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4)).save_pretrained(folder)
    models = _st_modules()
    mods = [models.Transformer(str(folder)), models.Pooling(32, pooling_mode="mean")]
    if dense:
        mods.append(models.Dense(32, 16))
    mods.append(models.Normalize())
    return randomize(st.SentenceTransformer(modules=mods, device="cpu").eval())


def _st_modules():
    try:  # NB: sentence-transformers 6 moved the modules (``models`` still imports, with a warning)
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def _features(model, texts):
    prepare = getattr(model, "preprocess", None) or model.tokenize
    return {k: v for k, v in prepare(texts).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "plain"])
def test_sentence_transformer_hidden_width_and_pooler(tmp_path, dense):
    model = _sentence_transformer(tmp_path, dense)
    feats = _features(model, ["w1 w2 w3 w4", "w5 w6"])
    keys = sorted(feats)
    oto = otofx.OTO(model, (feats,))
    assert sorted(feats) == keys and oto.frontend == "export" and not oto.unread, (oto.frontend, oto.unread)
    stream = [z for z in oto.groups if any(n.endswith("word_embeddings.weight") for n, _, _ in z.params)]
    # NB: without Dense the sentence embedding is the hidden width itself, an output: it stays whole
    assert bool(stream) is dense, oto.report()
    if dense:
        assert any(n.endswith("pooler.dense.weight") and d == 1 for n, d, _ in stream[0].params)
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is type(model) and n_params(small) == n_params(oto.compress(form="module"))
    assert n_params(small) < (0.5 if dense else 0.85) * n_params(model)
    texts = ["w7 w8 w9 w10 w11 w12", "w13", "w3 w3 w3"]
    with torch.no_grad():
        assert max_rel_diff(model.encode(texts, convert_to_tensor=True),
                            small.encode(texts, convert_to_tensor=True)) < 1e-4


def test_freed_sentence_embedding_keeps_every_similarity(tmp_path):
    """Freeing the sentence embedding too (``free_outputs``) removes the hidden width where nothing else
    reads it whole: the embeddings come back narrower, their removed entries were zero, so every dot
    product and cosine similarity is the zeroed model's."""
    model = _sentence_transformer(tmp_path, dense=False)
    oto = otofx.OTO(model, (_features(model, ["w1 w2 w3 w4", "w5 w6"]),),
                    free_outputs=("token_embeddings", "sentence_embedding"))
    assert any(any(n.endswith("word_embeddings.weight") for n, _, _ in z.params) for z in oto.groups), oto.report()
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    texts = ["w7 w8 w9 w10 w11 w12", "w13", "w3 w3 w3 w40"]
    with torch.no_grad():
        a, b = model.encode(texts, convert_to_tensor=True), small.encode(texts, convert_to_tensor=True)
    assert b.shape[-1] < a.shape[-1] == 32
    assert (a @ a.T - b @ b.T).abs().max() < 1e-5


def test_saved_head_original_follows_its_copy_and_disable_adapter_is_exact():
    """A classification task saves the head (``modules_to_save``): peft keeps the original beside the trained
    copy, and ``disable_adapter()`` and ``unload()`` go back to it. The forward never calls it; it reads what
    the copy reads, so its inputs go with the copy's and the adapter-free model stays exact too."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=48,
                                                    num_hidden_layers=2, num_attention_heads=4, num_labels=3))
    model = randomize(get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, init_lora_weights=False,
                                                      target_modules=["query", "key", "value", "dense"])).eval())
    oto = otofx.OTO(model, {"input_ids": _tokens(1, 16)})
    assert not oto.unread, oto.unread
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    head = small.get_submodule("base_model.model.classifier")
    assert head.original_module.in_features == head.modules_to_save["default"].in_features < 32
    x = _tokens(2, 9, seed=2)
    with torch.no_grad():
        assert max_rel_diff(model(input_ids=x).logits, small(input_ids=x).logits) < 1e-4
        with model.disable_adapter():
            want = model(input_ids=x).logits
        with small.disable_adapter():
            got = small(input_ids=x).logits
        assert max_rel_diff(want, got) < 1e-4
        assert max_rel_diff(want, small.unload()(input_ids=x).logits) < 1e-4
