"""peft's adapters on Hugging Face models (LoRA, rsLoRA, DoRA, IA3, LoHa, LoKr; Llama, Qwen 2, GPT-2's Conv1D,
BERT for classification with its head in ``modules_to_save``, ViT): captured, analysed, compressed, exact, and
still a PeftModel?

Each model is built small (2 layers, width 32, 4 heads, random weights, no download) and adapted with
``get_peft_model`` (adapter weights random: ``init_lora_weights=False``). Then, as
``bench/diffusers_models.py`` does (``_common.compressed_row``): groups, half (floor) of every group's rows
zeroed, ``compress()`` / ``form="module"`` (peft's own ``PeftModel``) / ``form="graph"``, the parameters kept,
the own class against the zeroed model on a batch of 2 of another length, and where it keeps zero rows. Then
what a peft user does with the model:

* ``generate``: greedy decoding (a prompt of 5, 6 new tokens) gives the zeroed model's tokens (the models
  that generate);
* ``merged``: ``merge_and_unload()`` of the compressed model (a plain Hugging Face model) against the zeroed
  model: the largest relative difference;
* ``save/load``: ``otofx.save`` then ``otofx.load`` into a dense copy of the adapted model: equal outputs.

``--only llama`` picks rows (a prefix will do); each row runs in its own process (``--timeout``).
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _models() -> dict:
    import torch
    from peft import (IA3Config, LoHaConfig, LoKrConfig, LoraConfig, TaskType, get_peft_model)
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, ViTConfig, ViTForImageClassification)

    size = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)

    def llama():
        return LlamaForCausalLM(LlamaConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, **size))

    def qwen2():
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, **size))

    def gpt2():
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64))

    def bert():
        return BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=3, **size))

    def vit():
        return ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_labels=3, **size))

    def adapted(base, config):
        return lambda: get_peft_model(base(), config())

    def lora(**kw):
        return lambda: LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)

    def tokens(b, n):
        return dict(input_ids=torch.randint(0, 100, (b, n)))

    def images(b, _):
        return dict(pixel_values=torch.randn(b, 3, 32, 32))  # NB: ViT's position table fixes the size

    return {
        "llama lora (all linear)": (adapted(llama, lora(target_modules=_ALL)), tokens),
        "llama lora (q, v)": (adapted(llama, lora(target_modules=["q_proj", "v_proj"])), tokens),
        "llama rslora": (adapted(llama, lora(target_modules="all-linear", use_rslora=True)), tokens),
        "llama dora": (adapted(llama, lora(target_modules=_ALL, use_dora=True)), tokens),
        "llama ia3": (adapted(llama, lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                       feedforward_modules=["down_proj"], init_ia3_weights=False)),
                      tokens),
        "llama loha": (adapted(llama, lambda: LoHaConfig(r=4, target_modules=_ALL, init_weights=False)), tokens),
        "llama lokr": (adapted(llama, lambda: LoKrConfig(r=4, target_modules=_ALL, init_weights=False)), tokens),
        "qwen2 lora": (adapted(qwen2, lora(target_modules=_ALL)), tokens),
        "gpt2 lora (Conv1D)": (adapted(gpt2, lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
                               tokens),
        "bert seq-cls lora": (adapted(bert, lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=4, init_lora_weights=False,
                                                              target_modules=["query", "key", "value", "dense"])),
                              tokens),
        "vit lora (+ classifier saved)": (adapted(vit, lora(target_modules=["q_proj", "v_proj", "fc1", "fc2"],
                                                            modules_to_save=["classifier"])), images),
    }


def _uses(zeroed, small) -> dict:
    """A peft user's columns: greedy decoding, merge_and_unload, otofx.save/load (see the docstring)."""
    import copy

    import torch

    import otofx

    def rel(a, b):
        return f"{((a.float() - b.float()).abs().max() / a.float().abs().max()).item():.1e}"

    base = zeroed.get_base_model()
    torch.manual_seed(5)
    if base.main_input_name == "pixel_values":
        x = dict(pixel_values=torch.randn(2, 3, 32, 32))
    else:
        x = dict(input_ids=torch.randint(0, 100, (2, 24)))
    row = {}
    with torch.no_grad():
        want = zeroed(**x).logits
        if base.can_generate():
            prompt = torch.randint(0, 100, (1, 5))
            same = torch.equal(zeroed.generate(input_ids=prompt, max_new_tokens=6, do_sample=False),
                               small.generate(input_ids=prompt, max_new_tokens=6, do_sample=False))
            row["generate"] = "same tokens" if same else "OTHER tokens"
        merged = copy.deepcopy(small).merge_and_unload()
        row["merged"] = f"{type(merged).__name__} {rel(want, merged(**x).logits)}"
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "small.otofx")
            otofx.save(small, path)
            loaded = otofx.load(path, copy.deepcopy(zeroed))  # NB: a dense model of the same build
            row["save/load"] = "equal" if torch.equal(small(**x).logits, loaded(**x).logits) else "DIFFER"
    return row


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, 16, 24, "peft", more=_uses, more_keys=("generate", "merged",
                                                                                      "save/load"))


if __name__ == "__main__":
    main()
