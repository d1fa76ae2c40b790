"""Every Hugging Face architecture that builds from a tiny config: analysed, compressed, exact?

For every class in the installed transformers' causal-LM, masked-LM, sequence-classification,
image-classification and seq-to-seq (encoder-decoder) auto-mappings, :func:`tiny_config` shrinks the family's default config (hidden
32, 4 heads of 8 over 2 key/value heads, 2 layers, MLP 64, vocabulary 128, 4 experts of width 16,
images 32x32 in patches of 8; per-family overrides in ``OVERRIDES``), the class is built with random
weights (eval mode; norm weights, biases and constant-initialised parameters randomised), and:

* ``analysed``: ``otofx.OTO(model, x)`` (``x``: ``input_ids`` 2x16, with ``decoder_input_ids`` 2x8 for
  an encoder-decoder, or ``pixel_values`` 2x3xSxS);
* head / MLP / expert / hidden rows: rows of the groups that hold attention heads (2 to ``heads``
  rows of an attention projection, several positions each: a single row tying every head of a layer
  is not counted), fused experts (a 3-D ``experts`` parameter), the other groups (MLP widths ...),
  and the hidden width (a group holding a token embedding table's columns: the residual stream,
  removable when every norm on it is an RMS norm); ``heads`` is 0 for a model without attention
  modules;
* ``exact``: half (floor) of every group's rows zeroed, ``oto.compress()`` (the model's own class,
  or the graph where its forward cannot be re-sized), and max|diff| <= 1e-4 * max(1, max|y|)
  against the zeroed full model on the example input and a fresh draw of the same shape;
* ``from_pretrained``: for an exact result in the model's own class, ``small.save_pretrained`` then
  the class's ``from_pretrained``, against the zeroed full model on the example input: ``exact``,
  ``refused`` (loading raises: the config cannot express the new shapes, ``config.otofx_widths``
  says which; ``refused in forward`` when it loads and its forward raises), ``upstream`` (loaded
  different, and so does the uncompressed model: transformers' own round trip loses tensors), or
  ``OFF <error>`` (loaded, silently different: target none);
* ``why pinned``: for a model with multi-head attention whose heads were not found, the first pins
  ``oto.pinned`` reports on an attention projection's output (else the most frequent ones);
* the peers, in the same run: only-train-once 3.0.1 ``OTO(model, x)`` (groups found, or its error)
  and torch-pruning 1.6.1 ``DependencyGraph().build_dependency`` (root groups, or its error).

Each class runs in its own forked process with a time limit (``--timeout``); ``--jobs`` at a time.
``python bench/hf_sweep.py`` runs them all and prints the table, the failures with their reasons,
and the totals against the issue's targets; ``--only llama,bert`` picks model types, ``--no-peers``
skips the peers, ``--markdown FILE`` also writes the table, ``--save FILE`` appends each row to a
JSON-lines file (run again with the same file, it skips the classes already there), ``--rows FILE``
prints the table of saved rows. ``CI_SUBSET`` is the fixed subset
``tests/test_families.py`` runs.

Internals:
    * A class counts as buildable when its tiny config and the model construct and run one forward
      on the example input; the rest are listed as not buildable with the reason (multi-modal
      classes that need several inputs, remote-code-only families ...).
    * # NB: the sweep forks after importing transformers; every child builds its own model.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass

import torch

TASKS = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "image-cls": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "seq2seq-lm": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "token-cls": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "qa": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "multiple-choice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
    "semantic-seg": "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES",
    "depth": "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES",
    "backbone": "MODEL_FOR_BACKBONE_MAPPING_NAMES",
    "object-det": "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES",
}
PIXEL_TASKS = ("image-cls", "semantic-seg", "depth", "backbone", "object-det")
L, B, VOCAB, HIDDEN, HEADS, KV, HEAD_DIM, LAYERS, FFN = 16, 2, 128, 32, 4, 2, 8, 2, 64
IMAGE, PATCH = 32, 8
PEER_SECONDS = 15  # each peer, per class (torch-pruning's group search on an LLM runs for minutes)

# attribute -> tiny value, applied when the family's config has the attribute
SIZES = {
    # widths
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "embed_dim": HIDDEN, "dim": HIDDEN,
    "d_embed": HIDDEN, "embedding_size": HIDDEN, "word_embed_proj_dim": HIDDEN, "n_embed": HIDDEN,
    "model_dim": HIDDEN, "emb_dim": HIDDEN, "embedding_dim": HIDDEN,
    # heads
    "num_attention_heads": HEADS, "n_head": HEADS, "n_heads": HEADS, "num_heads": HEADS,
    "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS, "attention_heads": HEADS,
    "num_key_value_heads": KV, "num_kv_heads": KV, "n_kv_heads": KV, "multi_query_group_num": KV,
    "head_dim": HEAD_DIM, "d_kv": HEAD_DIM, "kv_channels": HEAD_DIM, "attention_head_size": HEAD_DIM,
    "qk_nope_head_dim": HEAD_DIM, "qk_rope_head_dim": HEAD_DIM, "v_head_dim": HEAD_DIM,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_head_dim": 2 * HEAD_DIM, "rotary_dim": HEAD_DIM // 2,
    # depth
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "encoder_layers": LAYERS, "decoder_layers": LAYERS, "num_decoder_layers": LAYERS,
    "first_k_dense_replace": 1,
    # MLP and experts
    "intermediate_size": FFN, "ffn_dim": FFN, "d_ff": FFN, "n_inner": FFN, "encoder_ffn_dim": FFN,
    "decoder_ffn_dim": FFN, "ffn_hidden_size": FFN, "inner_hidden_size": FFN, "mlp_dim": FFN,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32, "expert_ffn_hidden_size": 16,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1,
    # tables
    "vocab_size": VOCAB, "unpadded_vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "n_ctx": 64,
    "max_seq_len": 64, "max_sequence_length": 64, "type_vocab_size": 2,
    # images
    "image_size": IMAGE, "patch_size": PATCH, "num_channels": 3,
}
# per-family overrides (model_type -> attributes), applied last
OVERRIDES = {
    "distilbert": {"hidden_dim": FFN},
    "funnel": {"block_sizes": [1, 1], "d_inner": FFN, "d_head": HEAD_DIM},
    "transfo-xl": {"d_inner": FFN, "d_head": HEAD_DIM, "cutoffs": [64]},
    "xlnet": {"d_inner": FFN},
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_shape": [4, 4], "axial_pos_embds_dim": [16, 16],
                 "feed_forward_size": FFN, "attention_head_size": HEAD_DIM, "max_position_embeddings": 16},
    "big_bird": {"attention_type": "original_full"},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "longformer": {"attention_window": [4, 4]},
    "led": {"attention_window": [4, 4]},
    "mega": {"ema_projection_size": 4},
    "fnet": {},
    "mobilevit": {"image_size": 64},
    "mobilevitv2": {"image_size": 64},
    "levit": {"image_size": 64},
    "efficientformer": {"image_size": 64},
    "swiftformer": {"image_size": 64},
    "hrm_text": {"num_layers_per_stack": 1, "H_cycles": 1, "L_cycles": 1, "L_bp_cycles": [1]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 2 * HIDDEN // HEAD_DIM, "n_groups": 1},
    # Mamba-2 hybrids: heads x head width = expand x hidden; one Mamba layer and one attention layer
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16, "mamba_chunk_size": 16,
                         "layer_types": ["linear_attention", "full_attention"], "num_hidden_layers": 2},
    "bamba": {"mamba_n_heads": 8, "mamba_d_head": 8, "mamba_d_state": 16, "mamba_chunk_size": 16,
              "attn_layer_indices": [1]},
    "nemotron_h": {"mamba_num_heads": 8, "mamba_head_dim": 8, "ssm_state_size": 16, "n_groups": 2, "chunk_size": 16},
    "dory": {"layer_types": ["sliding_attention", "full_attention"], "num_hidden_layers": 2, "n_input_layers": 1,
             "n_output_layers": 1},
    "convnext": {"image_size": 64},
    "convnextv2": {"image_size": 64},
    # Perceiver keeps a 1280-wide latent array over 26 self-attention layers (260M parameters) otherwise
    "perceiver": {"d_latents": HIDDEN, "num_latents": 16, "num_self_attends_per_block": 2,
                  "num_self_attention_heads": HEADS, "num_cross_attention_heads": 1},
    # Gemma 3n: per-layer MLP widths (a list), no key/value sharing across the two tiny layers
    "gemma3n_text": {"num_kv_shared_layers": 0, "intermediate_size": [FFN] * LAYERS, "vocab_size_per_layer_input": VOCAB},
    # Qwen4-Exp's indexed attention needs its indexer sizes (none by default); hyper-connections' rank
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM, "indexer_budget": 8,
                       "indexer_compress_ratio": 2, "hc_lowrank": 8},
    # DeepSeek V4's heavily compressed attention compresses 128 tokens into one: below that its
    # compressor's gate is computed and dropped, so the capture never sees it read the stream
    "deepseek_v4": {"compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2, "num_dense_layers": 1},
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"], "hybrid_layer_ids": [1], "num_hidden_layers": 2,
               "mamba_headdim": HEAD_DIM, "n_mamba_heads": 8, "mamba_d_state": 16},
    # ESM (protein LM): no vocabulary by default
    "esm": {"vocab_size": VOCAB, "pad_token_id": 1, "mask_token_id": 2},
    # DPT (depth, segmentation): one reassembled feature map per backbone layer read, four of them
    "dpt": {"num_hidden_layers": 4, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [8, 16, 32, 32],
            "fusion_hidden_size": 16, "head_hidden_size": 8},
    "depth_anything": {"backbone_config": {"num_hidden_layers": 4, "out_indices": [1, 2, 3, 4], "reshape_hidden_states": False},
                       "neck_hidden_sizes": [8, 16, 32, 32], "reassemble_hidden_size": 32, "fusion_hidden_size": 16,
                       "head_hidden_size": 8},
}
# DETR and its kin read a timm backbone (random weights, nothing downloaded); RT-DETR its own ResNet,
# whose widths its encoder's input channels must follow
for _k in ("detr", "conditional_detr", "dab-detr", "deformable_detr", "table-transformer"):
    OVERRIDES[_k] = {"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet18", "out_indices": [1, 2, 3, 4]},
                     "num_queries": 10}
for _k in ("rt_detr", "rt_detr_v2"):
    OVERRIDES[_k] = {"backbone_config": {"model_type": "rt_detr_resnet", "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1],
                                         "embedding_size": 8, "out_indices": [2, 3, 4]},
                     "encoder_in_channels": [16, 32, 64], "encoder_hidden_dim": HIDDEN, "d_model": HIDDEN,
                     "decoder_in_channels": [HIDDEN] * 3, "num_queries": 10}
OVERRIDES["qwen4_exp"] = OVERRIDES["qwen4_exp_text"]
OVERRIDES["gemma3n"] = {"text_config": OVERRIDES["gemma3n_text"]}
# Swin's stages: one head count per stage (the defaults do not divide the tiny width), num_layers = stages
for _swin in ("swin", "swinv2", "donut-swin"):
    OVERRIDES[_swin] = {"num_heads": [2, 4], "depths": [1, 1], "num_layers": 2, "window_size": 4, "image_size": IMAGE,
                        "patch_size": 4}
# multi-head latent attention (DeepSeek V2/V3 and their descendants) has as many key/value heads as heads
for _mla in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "minicpm3",
             "longcat_flash", "youtu", "axk1", "axk2", "kimi_linear", "mistral4", "sarvam_mla"):
    OVERRIDES.setdefault(_mla, {})["num_key_value_heads"] = HEADS
OVERRIDES["deepseek_v2"]["num_experts_per_tok"] = 2
# sizes set even where the family's default is None ("derive it"): the tiny value is the derived one
DERIVED = ("head_dim", "num_key_value_heads")
# families whose heads stay pinned for a reason the pins alone do not say (diagnosed by hand)
NOTES = {
    "diffllama": "differential attention pairs head h with head h + H/2 and GQA groups the query heads over the "
                 "key/value heads: every head of a layer is tied into one row",
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
             "decoder_start_token_id", "unk_token_id", "image_token_id", "eoi_token_id", "boi_token_id")
CI_SUBSET = (("causal-lm", "qwen3"), ("causal-lm", "olmo2"), ("seq-cls", "deberta-v2"), ("causal-lm", "mixtral"))

_ATTN_WORDS = ("attn", "attention", "query", "q_proj", "qkv", "in_proj", ".q.", "wq", "c_attn", "self.q")


@dataclass
class Row:
    task: str
    model_type: str
    cls: str
    built: bool = False
    analysed: bool = False
    exact: bool | None = None
    err: float | None = None
    form: str = ""
    heads: int = 0  # configured attention heads (0: none)
    head_rows: int = 0
    mlp_rows: int = 0
    expert_rows: int = 0
    stream_rows: int = 0  # the hidden width (token embedding columns): older saved rows lack it
    groups: int = 0
    why: str = ""  # failure or pin reason
    seconds: float = 0.0
    oto: str = ""  # only-train-once: groups or error
    tp: str = ""  # torch-pruning: groups or error
    hub: str = ""  # save_pretrained + from_pretrained of an own-class result: exact / refused / OFF <err>


def entries(tasks=tuple(TASKS), only=None) -> list[tuple[str, str, str]]:
    from transformers.models.auto import modeling_auto as M

    out = []
    for task in tasks:
        for model_type, cls in getattr(M, TASKS[task]).items():
            if isinstance(cls, (tuple, list)):
                cls = cls[0]
            if only and model_type not in only:
                continue
            out.append((task, model_type, cls))
    return out


def _shrink_list(v):
    return [1 for _ in v] if all(isinstance(a, int) for a in v) else v


def _tiny_kwargs(have: dict) -> dict:
    return {k: v for k, v in SIZES.items()
            if k in have and (have[k] is not None or k in DERIVED) and not isinstance(have[k], (list, dict))}


def _readable(cfg, k: str) -> bool:
    try:
        getattr(cfg, k)
    except Exception:  # noqa: BLE001 -- transformers' per-layer attributes raise when read globally
        return False
    return True


def tiny_config(model_type: str, cls_name: str | None = None):
    """The family's config with every known size attribute set small (``SIZES``, ``OVERRIDES``).

    With ``cls_name``, the config class that model class takes (a text-only class of a multi-modal
    family, as ``Llama4ForCausalLM``, takes the text config, not the family's)."""
    import transformers
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    own = getattr(getattr(transformers, cls_name, None), "config_class", None) if cls_name else None
    if isinstance(own, type) and own is not cls and getattr(own, "model_type", None) \
            and isinstance(default.to_dict().get("text_config"), dict):
        cls = own  # a composite family config (text + vision) given to a text-only class
        default = cls()
    have = default.to_dict()
    kw = _tiny_kwargs(have)
    for k in DERIVED:  # NB: a size the family keeps per layer (Gemma 4's head_dim) cannot be set globally
        if k in kw and have.get(k) is None and not _readable(default, k):
            del kw[k]
    for k, v in have.items():  # multi-modal configs: their text / vision / audio sub-configs too
        sub = getattr(default, k, None) if isinstance(v, dict) else None
        if hasattr(sub, "to_dict") and getattr(sub, "model_type", None):
            kw[k] = {"model_type": sub.model_type, **_tiny_kwargs(sub.to_dict())}
    types = have.get("layer_types")
    if isinstance(types, list) and len(set(map(str, types))) > 1 and "layer_types" not in OVERRIDES.get(model_type, {}):
        # hybrids (convolution / linear attention / attention layers): one layer of each kind, so
        # the tiny model keeps its attention layers (the first LAYERS of the list may have none)
        kinds = list(dict.fromkeys(types))
        kw["layer_types"] = kinds
        for k in ("num_hidden_layers", "num_layers", "n_layers"):
            if k in have:
                kw[k] = len(kinds)
    for k in ("depths", "num_blocks", "layers_per_stage"):  # hierarchical vision models: one block a stage
        if isinstance(have.get(k), list):
            kw[k] = _shrink_list(have[k])
    if isinstance(have.get("image_size"), (list, tuple)):
        kw["image_size"] = [IMAGE, IMAGE]
    for k, v in OVERRIDES.get(model_type, {}).items():  # a dict for a sub-config is merged into it
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    cfg = cls(**kw)
    vocab = getattr(cfg, "vocab_size", None)
    for k in TOKEN_IDS:
        v = getattr(cfg, k, None)
        if isinstance(v, int) and vocab and not 0 <= v < vocab:
            setattr(cfg, k, 1)
        elif isinstance(v, list) and vocab:
            setattr(cfg, k, [t for t in v if 0 <= t < vocab] or 1)
    if getattr(cfg, "pad_token_id", None) is None:
        cfg.pad_token_id = 0  # sequence classification of a batch > 1 needs one (some configs lack it)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def example_input(task: str, cfg, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if task in PIXEL_TASKS:
        side = getattr(cfg, "image_size", IMAGE)
        side = side[0] if isinstance(side, (list, tuple)) else side
        ch = getattr(cfg, "num_channels", 3)
        return {"pixel_values": torch.randn(B, ch, side, side, generator=g)}
    vocab = getattr(cfg, "vocab_size", VOCAB) or VOCAB
    ids = torch.randint(3, min(vocab, VOCAB), (B, L), generator=g)
    eos = getattr(cfg, "eos_token_id", None)
    if task == "seq-cls" and getattr(cfg, "is_encoder_decoder", False) and isinstance(eos, int):
        ids[:, -1] = eos  # BART-style classifiers read the hidden state at each example's <eos>
    if task == "seq2seq-lm":  # an encoder-decoder: the decoder reads a shorter target prefix
        # NB: with the encoder's attention mask, as a tokenizer gives it (SwitchTransformers and LongT5
        # index it, and transformers builds no default one under torch.export)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "decoder_input_ids": torch.randint(3, min(vocab, VOCAB), (B, L // 2), generator=g)}
    if task == "multiple-choice":  # [batch, choices, length]
        return {"input_ids": torch.stack([ids, ids.flip(0)], 1)}
    return {"input_ids": ids}


def _heads_of(cfg) -> int:
    for k in ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
        if isinstance(v, (list, tuple)) and v and all(isinstance(a, int) for a in v):
            return max(v)
    return 0


def classify(oto, heads: int) -> tuple[int, int, int, int]:
    """(head rows, MLP rows, expert rows, stream rows) of ``oto.groups``.

    A head group has 2 to ``heads`` rows of an attention projection, each a slice of several positions;
    a group of one row (every head of a layer tied into one: MQA's one key/value head, DiffLlama's
    head pairs under GQA) is counted with the other rows, not as heads found. A stream group holds the
    columns of the token embedding (``get_input_embeddings()``: the residual stream's width, the hidden size)."""
    h = m = e = s = 0
    shapes = {n: p.shape for n, p in oto.model.named_parameters()}
    try:
        emb = oto.model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    # NB: every name of the table: a tied LM head may be the name the analysis reads it by (RoBERTa's decoder)
    table = getattr(emb, "weight", None)
    tables = {n for n, p in oto.model.named_parameters(remove_duplicate=False) if table is not None and p is table}
    for z in oto.groups:
        if any(n in tables and d == 1 for n, d, _ in z.params):
            s += z.rows
        elif any(len(shapes.get(n, ())) == 3 and "expert" in n for n, _, _ in z.params):
            e += z.rows
        elif heads and 2 <= z.rows <= heads and any(idx.shape[1] > 1 and any(w in n for w in _ATTN_WORDS)
                                               for n, _, idx in z.params):
            h += z.rows
        else:
            m += z.rows
    return h, m, e, s


def _why_pinned(oto) -> str:
    skip = ("model output", "softmax over", "layer_norm normalises", "mean over this axis", "used as an index",
            "gathered along", "gathered by an index")
    reasons = Counter(f"{p.op}: {p.reason}" for p in oto.pinned if not any(s in p.reason for s in skip))
    if not reasons:
        reasons = Counter(f"{p.op}: {p.reason}" for p in oto.pinned if "model output" not in p.reason)
    return "; ".join(r for r, _ in reasons.most_common(2))[:160]


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            for name, buf in m.named_buffers(recurse=False):
                if name == "running_mean" and buf.is_floating_point():
                    buf.copy_(torch.rand(buf.shape, generator=g) * 2 - 1)
                elif name == "running_var" and buf.is_floating_point():
                    buf.copy_(torch.rand(buf.shape, generator=g) * 1.5 + 0.5)
            for name, p in m.named_parameters(recurse=False):
                if not p.is_floating_point() or p.numel() == 0:
                    continue
                if "bias" in name:
                    p.copy_(torch.rand(p.shape, generator=g) - 0.5)
                elif p.numel() == 1 or bool((p == p.reshape(-1)[0]).all()):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _zero_half(model, groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for z in groups:
            rows = torch.randperm(z.rows, generator=gen)[: z.rows // 2]
            for name, dim, idx in z.params:
                params[name].data.movedim(dim, 0)[idx[rows].reshape(-1)] = 0


def _outputs(model, x: dict, kwargs: dict, every: bool = False, free: frozenset = frozenset()):
    """The floating tensors of ``model``'s output: with ``every``, all of them in pytree order (what a
    graph form returns: a ModelOutput flattens to its set fields) but the ``free`` ones (leaf indices
    of outputs the graph may return narrower: ``OTO.free_outputs``); else the task's outputs (logits,
    QA's start and end, a backbone's feature maps, depth, boxes), not the hidden states and attention
    maps, which the own class returns at its new widths."""
    from torch.utils._pytree import tree_flatten

    with torch.no_grad():
        out = model(**x, **kwargs)
    if not every and hasattr(out, "keys"):
        out = [v for k, v in out.items() if not any(w in k for w in ("hidden_state", "attention", "past_key", "cache"))]
    elif not every:
        out = out[0] if isinstance(out, (tuple, list)) else out
    leaves = [t for i, t in enumerate(tree_flatten(out)[0]) if not (every and i in free)]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _rel(ref: list, got: list) -> float:
    worst = 0.0
    for a, b in zip(ref, got):
        if a.shape != b.shape:
            return math.inf
        a64, b64 = a.double(), b.double()
        worst = max(worst, (a64 - b64).abs().max().item() / max(1.0, a64.abs().max().item()))
    return worst


def _hub_round_trip(model, small, x: dict, kwargs: dict) -> str:
    """``small.save_pretrained`` then its class's ``from_pretrained``: "exact" when the loaded model
    computes what ``model`` (zeroed) does, "refused" when loading raises (the config cannot express
    the model and says so in ``otofx_widths``; "refused in forward" when the loaded model fails to
    run: 4 heads of 4 and 2 heads of 8 load the same shapes), else "OFF <error>" (loaded, silently
    different)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            small.save_pretrained(d)
        except Exception as e:  # noqa: BLE001
            return "save: " + _err(e)[:60]
        try:
            back = type(small).from_pretrained(d).eval()
        except Exception:  # noqa: BLE001 - the shapes the config builds differ: a loud refusal
            return "refused"
    try:
        err = _rel(_outputs(model, x, kwargs), _outputs(back, x, kwargs))
    except Exception:  # noqa: BLE001 - loaded, then fails in its forward: loud too
        return "refused in forward"
    if err <= 1e-4:
        return "exact"
    return "upstream" if _plain_round_trip_differs(model, x, kwargs) else f"OFF {err:.1e}"


def _plain_round_trip_differs(model, x: dict, kwargs: dict) -> bool:
    """Whether the uncompressed model itself comes back different from ``save_pretrained`` +
    ``from_pretrained`` (transformers' own round trip loses tensors: PixioBackbone's layer norms)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            model.save_pretrained(d)
            back = type(model).from_pretrained(d).eval()
            return _rel(_outputs(model, x, kwargs), _outputs(back, x, kwargs)) > 1e-4
        except Exception:  # noqa: BLE001 - no verdict on the plain model: the compressed one stays OFF
            return False


def _err(e: BaseException) -> str:
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line}"[:160]


def _peers(row: Row, model, x: dict) -> None:
    import contextlib
    import copy
    import io
    import signal
    import warnings

    bench = os.path.dirname(os.path.abspath(__file__))
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import _peers as P

    class Wrap(torch.nn.Module):  # the peers pass one positional tensor
        def __init__(self, m, key):
            super().__init__()
            self.m, self.key = m, key

        def forward(self, t):
            out = self.m(**{self.key: t}, return_dict=False)
            return out[0]

    key, t = next(iter(x.items()))
    w = Wrap(copy.deepcopy(model), key).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            signal.alarm(PEER_SECONDS)
            b = P.oto_build(w, t)
            row.oto = str(len(P._oto_prunable_groups(b.obj, ()))) if b.ok else b.error[:80]
        except BaseException as e:  # noqa: BLE001 -- peer failures (and time-outs) are data
            row.oto = _err(e)[:80]
        try:
            signal.alarm(PEER_SECONDS)
            g = P.tp_groups(w, t, classifier_names=())
            row.tp = str(g.groups) if g.ok else (g.error or "")[:80]
        except BaseException as e:  # noqa: BLE001
            row.tp = _err(e)[:80]
        signal.alarm(0)


def build(task: str, model_type: str, cls_name: str):
    """``(config, model, example input, call kwargs)`` of one class: its tiny config, random weights
    (``_randomize``, seed 0), one forward run (so a class that does not build fails here); a child of
    :func:`sweep` then counts as built (its time-out is then the class's, not the build's)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tiny_config(model_type, cls_name)
    model = getattr(transformers, cls_name)(cfg).eval()
    _randomize(model)
    x = example_input(task, cfg)
    kwargs = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
    with torch.no_grad():
        model(**x, **kwargs)
    if _STAGE is not None:
        _STAGE.value = 1
    return cfg, model, x, kwargs


def run_one(task: str, model_type: str, cls_name: str, peers: bool = True) -> Row:
    """Build, analyse, zero half of every group, compress and check one architecture."""
    import logging

    import otofx

    logging.getLogger("otofx").setLevel(logging.ERROR)
    row = Row(task, model_type, cls_name)
    t0 = time.perf_counter()
    try:
        cfg, model, x, kwargs = build(task, model_type, cls_name)
    except Exception as e:  # noqa: BLE001 -- a failure is a row of the table
        row.why = "build: " + _err(e)
        return row
    row.built = True
    # NB: a hybrid whose tiny config kept no attention layer has no heads to find
    has_attn = any(w in n.rsplit(".", 1)[-1].lower() or w in type(m).__name__.lower()
                   for n, m in model.named_modules() for w in ("attn", "attention"))
    row.heads = _heads_of(cfg) if has_attn else 0
    try:
        oto = otofx.OTO(model, x)
    except Exception as e:  # noqa: BLE001
        row.why = "analysis: " + _err(e)
        row.seconds = time.perf_counter() - t0
        return row
    row.analysed = True
    row.groups = len(oto.groups)
    row.head_rows, row.mlp_rows, row.expert_rows, row.stream_rows = classify(oto, row.heads)
    if row.heads and not row.head_rows:
        row.why = NOTES.get(model_type) or _why_pinned(oto)
    try:
        _zero_half(model, oto.groups)
        small = oto.compress()
        row.form = "graph" if isinstance(small, torch.fx.GraphModule) else "module"
        kw_small = {} if row.form == "graph" else kwargs
        errs = []
        for seed in (0, 1):
            xi = example_input(task, cfg, seed)
            every, free = row.form == "graph", frozenset(f.index for f in oto.free_outputs)
            errs.append(_rel(_outputs(model, xi, kwargs, every, free), _outputs(small, xi, kw_small, every, free)))
        row.err = max(errs)
        row.exact = row.err <= 1e-4
        if not row.exact:
            row.why = f"mismatch {row.err:.2g}"
        elif row.form == "module" and hasattr(small, "save_pretrained"):
            row.hub = _hub_round_trip(model, small, example_input(task, cfg, 0), kwargs)
    except Exception as e:  # noqa: BLE001
        row.exact = False
        row.why = "compress: " + _err(e)
    row.seconds = time.perf_counter() - t0
    if peers:
        import signal

        def _late(*_):
            raise TimeoutError(f"over {PEER_SECONDS} s")

        old = signal.signal(signal.SIGALRM, _late)
        try:
            _peers(row, model, x)
        except BaseException as e:  # noqa: BLE001
            row.oto = row.oto or _err(e)[:60]
            row.tp = row.tp or _err(e)[:60]
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return row


_STAGE = None  # a shared int in the children: 1 once the model is built


def _child(conn, args, stage, fn=None):
    global _STAGE
    _STAGE = stage
    torch.set_num_threads(1)
    try:
        conn.send(dataclasses.asdict((fn or run_one)(*args)))
    except BaseException as e:  # noqa: BLE001
        conn.send({"error": _err(e) + " " + traceback.format_exc()[-200:]})
    conn.close()


def sweep(items, jobs: int = 2, timeout: float = 120.0, peers: bool = True, progress=None, fn=None,
          row_cls=None) -> list:
    """Run :func:`run_one` (or ``fn(task, model_type, cls, peers)``, whose rows are ``row_cls``) over
    ``items`` in forked children, ``jobs`` at a time, ``timeout`` seconds each."""
    Row_ = row_cls or Row
    import otofx  # noqa: F401  (imported once, before forking: every child runs the same code)

    ctx = mp.get_context("fork")
    pending = list(items)
    running, rows = [], {}
    while pending or running:
        while pending and len(running) < jobs:
            it = pending.pop(0)
            a, b = ctx.Pipe(duplex=False)
            stage = ctx.Value("i", 0)
            p = ctx.Process(target=_child, args=(b, (*it, peers), stage, fn))
            p.start()
            running.append((it, p, a, time.monotonic(), stage))
        time.sleep(0.05)
        for rec in list(running):
            it, p, conn, t, stage = rec
            done = conn.poll()
            msg = None
            if done:
                try:
                    msg = conn.recv()
                except EOFError:  # NB: the child died without a word (a crash in native code): poll() sees the EOF
                    done = False
            if done or not p.is_alive() or time.monotonic() - t > timeout:
                if done:
                    row = Row_(*it) if "error" in msg else Row_(**msg)
                    if "error" in msg:
                        row.why = "crash: " + msg["error"][:160]
                else:
                    row = Row_(*it)
                    built = stage.value == 1
                    row.why = ("timeout" if built else "build: timeout (the tiny model did not build in time)") \
                        if p.is_alive() else f"crash: exit code {p.exitcode}"
                    row.built = built
                if p.is_alive():
                    p.kill()
                p.join()
                running.remove(rec)
                rows[it] = row
                if progress:
                    progress(row)
    return [rows[it] for it in items]


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return v


def table(rows: list[Row], fmt: str = "github") -> str:
    from tabulate import tabulate

    head = ["task", "family", "class", "analysed", "exact", "rel err", "form", "heads", "head rows", "MLP rows",
            "expert rows", "hidden rows", "from_pretrained", "s", "only-train-once", "torch-pruning",
            "why (failure / heads pinned)"]
    body = [[r.task, r.model_type, r.cls, _cell(r.analysed), _cell(r.exact),
             f"{r.err:.1e}" if r.err is not None else "", r.form, r.heads or "", r.head_rows, r.mlp_rows,
             r.expert_rows, r.stream_rows, r.hub, f"{r.seconds:.1f}", r.oto, r.tp, r.why.replace("|", "/")]
            for r in rows if r.built]
    return tabulate(body, head, tablefmt=fmt)


def summary(rows: list[Row], total: int | None = None) -> str:
    built = [r for r in rows if r.built]
    ok = [r for r in built if r.analysed and r.exact]
    mism = [r for r in built if r.why.startswith("mismatch")]
    mha = [r for r in ok if r.heads > 1]
    with_heads = [r for r in mha if r.head_rows]
    pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "n/a"  # noqa: E731
    hub = [r for r in ok if r.hub]
    oto_ok = sum(1 for r in built if r.oto.isdigit())
    tp_ok = sum(1 for r in built if r.tp.isdigit())
    return "\n".join([
        f"classes in the auto-mappings asked for: {total or len(rows)}; run: {len(rows)} "
        f"({len({r.model_type for r in rows})} families); buildable from a tiny config: {len(built)}",
        f"analysed and exact: {len(ok)} / {len(built)} ({pct(len(ok), len(built))}; target >= 90%)",
        f"mismatches: {len(mism)} (target 0)",
        f"heads found: {len(with_heads)} / {len(mha)} of those with multi-head attention "
        f"({pct(len(with_heads), len(mha))}; target >= 90%)",
        f"hidden width (residual stream) removable: {sum(1 for r in ok if r.stream_rows)} / {len(ok)}, "
        f"{sum(1 for r in ok if r.stream_rows and r.form == 'module')} of them in the model's own class",
        f"only-train-once built a graph on {oto_ok} / {len(built)}; torch-pruning on {tp_ok} / {len(built)}",
        f"save_pretrained + from_pretrained of the own-class results: exact on "
        f"{sum(1 for r in hub if r.hub == 'exact')} / {len(hub)}, refused (config.otofx_widths: use otofx.save) on "
        f"{sum(1 for r in hub if r.hub.startswith('refused'))}, loaded but different on "
        f"{sum(1 for r in hub if r.hub.startswith('OFF'))} (target 0)"
        + (f"; the uncompressed model does not round-trip either on {n_up}" if (n_up := sum(1 for r in hub if r.hub == 'upstream')) else ""),
    ])


def read_rows(path: str, cls) -> list:
    """The rows a ``--save`` file holds (JSON lines), as ``cls`` instances."""
    import json

    with open(path) as f:
        return [cls(**json.loads(line)) for line in f if line.strip()]


def save_row(path: str, row) -> None:
    """Append one finished row to a ``--save`` file."""
    import json

    with open(path, "a") as f:
        f.write(json.dumps(dataclasses.asdict(row)) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated: " + ", ".join(TASKS) + " (default: all)")
    ap.add_argument("--only", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 2))))
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per class")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--markdown", default="", help="also write the table and summary to this file")
    ap.add_argument("--save", default="", help="append each finished row to this JSON-lines file")
    ap.add_argument("--rows", default="", help="print the table of rows saved by --save instead of running")
    a = ap.parse_args(argv)
    only = set(filter(None, a.only.split(",")))
    items = entries(tuple(filter(None, a.tasks.split(","))), only or None)
    # one class of every family first, then the other task heads of the same families
    seen: set = set()
    first = [it for it in items if it[1] not in seen and not seen.add(it[1])]
    items = first + [it for it in items if it not in first]
    t0 = time.time()
    done = []
    if a.rows:
        rows = read_rows(a.rows, Row)
    else:
        def progress(r: Row):
            done.append(r)
            print(f"[{len(done)}/{len(items)}] {r.task} {r.model_type} {r.cls}: "
                  f"{'exact' if r.exact else 'built' if r.built else 'not built'} {r.why[:100]}", file=sys.stderr,
                  flush=True)
            if a.save:
                save_row(a.save, r)

        # resume: classes already in the file are not run again
        before = read_rows(a.save, Row) if a.save and os.path.exists(a.save) else []
        have = {(r.task, r.model_type, r.cls) for r in before}
        rows = before + sweep([it for it in items if it not in have], a.jobs, a.timeout, not a.no_peers, progress)
        order = {it: i for i, it in enumerate(items)}
        rows.sort(key=lambda r: order.get((r.task, r.model_type, r.cls), -1))
    out = [table(rows), "", "Not buildable from a tiny config:"]
    out += [f"- {r.task} {r.model_type} ({r.cls}): {r.why}" for r in rows if not r.built]
    out += ["", "Failures (analysis, compression or mismatch):"]
    out += [f"- {r.task} {r.model_type} ({r.cls}): {r.why}" for r in rows if r.built and not (r.analysed and r.exact)]
    out += ["", summary(rows, len(items))]
    load = os.getloadavg()
    took = "rows read from " + a.rows if a.rows else f"took {time.time() - t0:.0f} s with {a.jobs} jobs"
    out += [f"{took}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    text = "\n".join(out)
    print(text)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
