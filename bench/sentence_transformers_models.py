"""sentence-transformers' embedding models (BERT/MiniLM, MPNet, DistilBERT, RoBERTa, ModernBERT, T5's encoder,
Qwen 3 and Gemma 3 embedders): captured, analysed, compressed, exact, and still a SentenceTransformer?

Each row is the module stack of a popular embedding model (transformer, pooling, optional Dense layers,
Normalize) on a small Hugging Face config (2 layers, width 32, 4 heads, random weights, no download; one
word-piece vocabulary serves every tokenizer). Then, as ``bench/diffusers_models.py`` does
(``_common.compressed_row``): groups, half (floor) of every group's rows zeroed, ``compress()`` /
``form="module"`` (sentence-transformers' own class); the graph form is refused (the model is a pipeline of
modules, each a part), the own class against the zeroed model on a batch of 2 of another length, and
``encode`` (the user's call: tokenizing, batching, pooling, normalising) of three sentences against the
zeroed model's.

``free_outputs="auto"`` frees ``token_embeddings`` for these models, so the hidden width is a group wherever
the sentence embedding is not that width itself (a Dense layer after the pooling reads it).
``--only bert`` picks rows (a prefix will do); each row runs in its own process (``--timeout``).
"""
from __future__ import annotations

import functools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]


def _models() -> dict:
    import torch
    from transformers import (BertConfig, DistilBertConfig, Gemma3TextConfig, ModernBertConfig, MPNetConfig,
                              Qwen3Config, RobertaConfig, T5Config)

    size = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    configs = {
        "bert (MiniLM: mean)": (lambda: BertConfig(**size), "mean", ()),
        "bert (cls, dense)": (lambda: BertConfig(**size), "cls", (16,)),
        "mpnet (mean)": (lambda: MPNetConfig(**size), "mean", ()),
        "distilbert (mean, dense)": (lambda: DistilBertConfig(vocab_size=100, dim=32, hidden_dim=48, n_layers=2,
                                                               n_heads=4), "mean", (16,)),
        "roberta (mean)": (lambda: RobertaConfig(pad_token_id=0, **size), "mean", ()),
        "modernbert (mean)": (lambda: ModernBertConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                                       cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2,
                                                       **size), "mean", ()),
        "t5 encoder (sentence-t5: mean, dense)": (lambda: T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48,
                                                                   num_layers=2, num_heads=4), "mean", (16,)),
        "qwen3 (last token)": (lambda: Qwen3Config(num_key_value_heads=2, head_dim=8, **size), "lasttoken", ()),
        "gemma3 (EmbeddingGemma: mean, 2 dense)": (lambda: Gemma3TextConfig(num_key_value_heads=2, head_dim=8,
                                                                            **size), "mean", (48, 16)),
    }

    def build(config, pooling, dense):
        def make():
            from sentence_transformers import SentenceTransformer
            from transformers import AutoModel

            try:  # NB: sentence-transformers 6 moved the modules (``models`` still imports, with a warning)
                from sentence_transformers.sentence_transformer import modules as models
            except ImportError:
                from sentence_transformers import models

            folder = tempfile.mkdtemp(prefix="otofx-st-")
            _tokenizer().save_pretrained(folder)
            AutoModel.from_config(config()).save_pretrained(folder)
            mods = [models.Transformer(folder), models.Pooling(32, pooling_mode=pooling)]
            width = 32
            for out in dense:
                mods.append(models.Dense(width, out))
                width = out
            mods.append(models.Normalize())
            return SentenceTransformer(modules=mods, device="cpu")
        return make

    def features(b, n):
        import random

        rnd = random.Random(b * 1000 + n)
        texts = [" ".join(rnd.choice(_WORDS[5:]) for _ in range(max(1, n - 3 * i))) for i in range(b)]
        tok = _tokenizer()(texts, padding=True, return_tensors="pt")
        return {"input": {k: v for k, v in tok.items() if isinstance(v, torch.Tensor)}}

    return {name: (build(*c), features) for name, c in configs.items()}


@functools.cache
def _tokenizer():
    """The word-piece tokenizer of ``_WORDS`` (one per process: each row builds its model folder from it and
    tokenizes its inputs with it)."""
    from transformers import BertTokenizer

    folder = tempfile.mkdtemp(prefix="otofx-st-vocab-")
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(_WORDS))
    return BertTokenizer(os.path.join(folder, "vocab.txt"))


def _uses(zeroed, small) -> dict:
    """``encode`` of three sentences: the largest difference to the zeroed model's embeddings."""
    texts = ["w7 w8 w9 w10 w11 w12", "w13", "w3 w3 w3 w40"]
    a = zeroed.encode(texts, convert_to_tensor=True)
    b = small.encode(texts, convert_to_tensor=True)
    return {"encode": f"{(a - b).abs().max().item():.1e}", "width": int(b.shape[-1])}


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, 12, 20, "sentence-transformers", more=_uses,
                  more_keys=("encode", "width"))


if __name__ == "__main__":
    main()
