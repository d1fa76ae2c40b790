"""litgpt's GPT over its architecture variants (Llama, Mistral, Mixtral, Gemma 1-3, Phi, Qwen 2.5/3 and 3-MoE,
Falcon, OLMo, StableLM...): captured, analysed, compressed, exact, and still a litgpt model?

litgpt builds every model as one ``GPT`` class from a ``Config`` dataclass that all blocks share and read
their head counts from in ``forward``. Each of litgpt's configs is reduced to its architecture (norm and MLP
classes, query groups, rotary, q/k norms, sliding windows, experts, soft-capping ... : the fields that are not
sizes) and the first config of each variant is built small (2 layers, width 32, 4 heads, random weights, no
download). Then, as ``bench/diffusers_models.py`` does (``_common.compressed_row``): groups, half (floor) of
every group's rows zeroed, ``compress()`` / ``form="module"`` (litgpt's own ``GPT``) / ``form="graph"``,
the parameters kept, the own class against the zeroed model on a batch of 2 of another length, and where it
keeps zero rows. Then what a litgpt user does with the model:

* ``kv decode``: greedy decoding with litgpt's key/value cache (``set_kv_cache``, ``input_pos``), a prompt of
  5 and 6 new tokens: the largest relative logit difference to the zeroed model;
* ``bf16``: both in bfloat16 on a batch of 2 (relative to the largest logit), next to what bfloat16 itself
  changes (the zeroed model in bfloat16 against float32);
* ``save/load``: ``otofx.save`` then ``otofx.load`` into a freshly built dense ``GPT(config)``: equal outputs.

``pip install litgpt`` (not in otofx's extras: it pins huggingface-hub below the version transformers 5
brings; a separate environment, or ``pip install --no-deps litgpt lightning lightning-utilities
jsonargparse torchmetrics`` beside them, will do). Each model runs in its own process (``--timeout``);
``--only Llama-3.1-8B,Mixtral`` picks variants.
"""
from __future__ import annotations

import copy

# the fields that set sizes (reduced below) or only numbers; every other field is the architecture
_SIZES = {"name", "hf_config", "block_size", "n_layer", "n_embd", "vocab_size", "padding_multiple",
          "padded_vocab_size", "n_head", "head_size", "n_query_groups", "intermediate_size", "moe_intermediate_size",
          "n_expert", "n_expert_per_token", "rope_base", "norm_eps", "sliding_window_size", "sliding_window_indices",
          "rope_indices", "attention_scores_scalar", "rope_adjustments", "rope_condense_ratio",
          "first_k_dense_replace", "n_shared_expert", "n_expert_groups", "n_topk_groups", "n_topk_scores_per_group",
          "latent_attention", "rope_local_base_freq", "routed_scaling_factor", "attention_logit_softcapping",
          "final_logit_softcapping"}
# of those, the ones whose presence is architecture (experts, windows, soft-capping, latent attention...)
_PRESENT = {"n_expert", "latent_attention", "sliding_window_size", "first_k_dense_replace", "n_shared_expert",
            "n_expert_groups", "rope_local_base_freq", "attention_logit_softcapping", "final_logit_softcapping",
            "attention_scores_scalar", "rope_adjustments"}


def _variant(c: dict) -> tuple:
    out = []
    for k, v in sorted(c.items()):
        if k in _PRESENT:
            out.append((k, bool(v)))
        elif k == "n_query_groups":
            out.append((k, "mha" if v in (None, c.get("n_head")) else "mqa" if v == 1 else "gqa"))
        elif k == "head_size":
            out.append((k, v is not None and c.get("n_embd") != v * c.get("n_head", 32)))
        elif k not in _SIZES:
            out.append((k, repr(v)))
    return tuple(out)


def _small(name: str):
    """The config ``name`` at 2 layers, width 32, 4 heads of 8 (12 where the model's heads are not its width
    over its head count), its query groups, experts, windows and rotary kept in kind."""
    from litgpt.config import Config, name_to_config

    c = copy.deepcopy(name_to_config[name])
    q = c.get("n_query_groups")
    kw = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=4 if q in (None, c.get("n_head", 32)) else 1 if q == 1
              else 2, head_size=8, intermediate_size=48, vocab_size=100, padded_vocab_size=128, block_size=64)
    if c.get("head_size") is not None and c["head_size"] * c.get("n_head", 32) != c.get("n_embd", 4096):
        kw["head_size"] = 12
    if c.get("moe_intermediate_size"):
        kw["moe_intermediate_size"] = 24
    if c.get("n_expert"):
        kw.update(n_expert=4, n_expert_per_token=2)
        if c.get("n_expert_groups"):
            kw.update(n_expert_groups=2, n_topk_groups=1, n_topk_scores_per_group=2)
        if c.get("first_k_dense_replace"):
            kw["first_k_dense_replace"] = 1
    if c.get("sliding_window_size"):
        kw["sliding_window_size"] = 6
        if c.get("sliding_window_indices") is not None:
            kw["sliding_window_indices"] = [1, 0]
    if c.get("rope_indices") is not None:
        kw["rope_indices"] = [1, 0]
    if c.get("latent_attention"):
        kw.update(latent_attention=dict(q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
                                        v_head_dim=8), n_query_groups=4)
    adj = c.get("rope_adjustments")
    if adj and "original_max_seq_len" in adj:
        kw["rope_adjustments"] = dict(adj, original_max_seq_len=32)
    c.update(kw)
    c.pop("hf_config", None)
    return Config(**c)


def _models() -> dict:
    """``{config name: (build, inputs)}``, the first config of each architecture variant."""
    import torch
    from litgpt.config import configs
    from litgpt.model import GPT

    names = {}
    for c in configs:
        names.setdefault(_variant(c), c["name"])
    return {name: (lambda name=name: GPT(_small(name)), lambda b, n: dict(idx=torch.randint(0, 100, (b, n))))
            for name in names.values()}


def _decode(model, prompt, steps: int = 6):
    import torch

    model.set_kv_cache(batch_size=prompt.shape[0], max_seq_length=32)
    T = prompt.shape[1]
    out = [model(prompt, input_pos=torch.arange(T))[:, -1]]
    for t in range(steps):
        out.append(model(out[-1].argmax(-1, keepdim=True), input_pos=torch.tensor([T + t]))[:, -1])
    model.clear_kv_cache()
    return torch.stack(out)


def _uses(zeroed, small) -> dict:
    """Greedy decoding with the cache, bfloat16, and a save/load round trip of the own class."""
    import tempfile

    import torch
    from litgpt.model import GPT

    import otofx

    def rel(a, b):
        return f"{((a.float() - b.float()).abs().max() / a.float().abs().max()).item():.1e}"

    row = {}
    torch.manual_seed(5)
    with torch.no_grad():
        prompt = torch.randint(0, 100, (2, 5))
        row["kv decode"] = rel(_decode(zeroed, prompt), _decode(small, prompt))
        x = torch.randint(0, 100, (2, 13))
        dense16 = copy.deepcopy(zeroed).to(torch.bfloat16)(x)
        row["bf16"] = rel(dense16, copy.deepcopy(small).to(torch.bfloat16)(x))
        row["bf16 dense vs fp32"] = rel(zeroed(x), dense16)  # NB: what bfloat16 itself costs, for scale
        with tempfile.TemporaryDirectory() as d:
            otofx.save(small, d)
            loaded = otofx.load(d, model=GPT(copy.deepcopy(zeroed.config))).eval()
            row["save/load"] = "equal" if torch.equal(loaded(x), small(x)) else "DIFFERS"
    return row


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, 16, 24, "litgpt",
                  more=_uses, more_keys=("kv decode", "bf16", "bf16 dense vs fp32", "save/load"))


if __name__ == "__main__":
    main()
