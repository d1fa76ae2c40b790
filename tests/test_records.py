"""A decoder whose blocks read their sizes off one shared settings record (litgpt's ``self.config``).

litgpt's ``GPT`` gives every block the same ``Config`` dataclass, and its attention computes its split
sizes, head views and key/value cache from ``self.config.n_head``, ``n_query_groups`` and ``head_size``
at forward time. Blocks that lose different heads need their own head counts: the module form copies
the record for each attention block that changed and sets the fields its class, built again from the
record, needs for the copy's shapes (``otofx.rebuild._follow_records``). The search tells apart numbers
that coincide: here a head count of 4 equals the rotary half-width ``head_size // 2``, which the graph
form keeps while it recounts the view's 4.

The mixture of experts dispatches tokens as litgpt and Mistral's reference do,
``y[token_idx] += w * expert(x[token_idx])`` (``aten.index_put_`` under torch.export, ``operator.setitem``
in a dynamo graph), or as Hugging Face's Mixtral does, ``y.index_add_(0, token_idx, ...)``: the stream's
channels pass (rule examples in ``tests/rule_examples/indexing.py``).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows

pytestmark = pytest.mark.usefixtures("single_thread")


@dataclasses.dataclass
class Config:
    vocab: int = 64
    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 4
    n_query_groups: int = 2
    head_size: int = 8
    intermediate_size: int = 48
    n_expert: int = 0
    n_expert_per_token: int = 2
    dispatch: str = "setitem"  # or "index_add" (Hugging Face's Mixtral; fx's symbolic_trace takes no setitem)
    norm: str = "torch"  # or "own": torchtune's RMSNorm (F.rms_norm over its own normalized_shape)

    @property
    def rope_half(self) -> int:
        return self.head_size // 2


def rope(x, cos, sin, half: int):
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: Config, block_idx: int):
        super().__init__()
        c = config
        self.qkv = nn.Linear(c.n_embd, (c.n_head + 2 * c.n_query_groups) * c.head_size, bias=True)
        self.proj = nn.Linear(c.n_head * c.head_size, c.n_embd, bias=False)
        self.config, self.block_idx = config, block_idx
        self.k_cache = self.v_cache = torch.zeros(0)  # NB: built by build_kv_cache

    def build_kv_cache(self, batch: int, length: int) -> None:
        c = self.config
        self.k_cache = torch.zeros(batch, c.n_query_groups, length, c.head_size)
        self.v_cache = torch.zeros(batch, c.n_query_groups, length, c.head_size)

    def forward(self, x, cos, sin, input_pos=None):
        c = self.config
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split((c.n_head * c.head_size, c.n_query_groups * c.head_size,
                                     c.n_query_groups * c.head_size), dim=-1)
        q = q.view(B, T, c.n_head, c.head_size).transpose(1, 2)
        k = k.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        v = v.view(B, T, c.n_query_groups, c.head_size).transpose(1, 2)
        q, k = rope(q, cos, sin, c.rope_half), rope(k, cos, sin, c.rope_half)
        mask = None
        if input_pos is not None:
            self.k_cache = self.k_cache.index_copy(2, input_pos, k)
            self.v_cache = self.v_cache.index_copy(2, input_pos, v)
            k, v = self.k_cache, self.v_cache
            mask = torch.arange(k.shape[2])[None, :] <= input_pos[:, None]
        k = k.repeat_interleave(c.n_head // c.n_query_groups, dim=1)
        v = v.repeat_interleave(c.n_head // c.n_query_groups, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_size))


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.fc_1 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.fc_2 = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))


class MoE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_expert))
        self.config = config

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(-1, C)
        probs, indices = torch.topk(self.gate(x), self.config.n_expert_per_token)
        probs = probs.softmax(dim=1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == e)
            out = probs[token_idx, slot, None] * expert(x[token_idx])
            if self.config.dispatch == "setitem":
                y[token_idx] += out
            else:
                y.index_add_(0, token_idx, out)
        return y.view(B, T, C)


class RMSNorm(nn.Module):
    """torchtune's: a module of its own class holding ``normalized_shape``, computed by F.rms_norm (its
    width follows the new stream; the graph form's kept divisor is refolded into eps and the scale)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.normalized_shape, self.eps = (dim,), eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), self.normalized_shape, self.scale, eps=self.eps).to(x.dtype)


class Block(nn.Module):
    def __init__(self, config: Config, block_idx: int):
        super().__init__()
        norm = RMSNorm if config.norm == "own" else nn.RMSNorm
        self.norm_1, self.norm_2 = norm(config.n_embd), norm(config.n_embd)
        self.attn = Attention(config, block_idx)
        self.mlp = MoE(config) if config.n_expert else MLP(config)
        self.config = config

    def forward(self, x, cos, sin, input_pos=None):
        x = x + self.attn(self.norm_1(x), cos, sin, input_pos)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab, config.n_embd)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab, bias=False)
        self.config = config
        inv = 1.0 / 10000 ** (torch.arange(0, config.head_size, 2).float() / config.head_size)
        ang = torch.outer(torch.arange(64).float(), inv).repeat(1, 2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def set_kv_cache(self, batch: int, length: int = 32) -> None:
        for b in self.h:
            b.attn.build_kv_cache(batch, length)

    def forward(self, idx, input_pos=None):
        pos = torch.arange(idx.shape[1]) if input_pos is None else input_pos
        cos, sin = self.cos[pos], self.sin[pos]
        x = self.wte(idx)
        for block in self.h:
            x = block(x, cos, sin, input_pos)
        return self.lm_head(self.ln_f(x))


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return randomize(GPT(Config(**kw)).eval(), seed)


def _decode(model: GPT, prompt: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """Greedy decoding with the key/value cache: the logits of the prompt's last token and each new one."""
    model.set_kv_cache(prompt.shape[0])
    T = prompt.shape[1]
    out = [model(prompt, torch.arange(T))[:, -1]]
    for t in range(steps):
        out.append(model(out[-1].argmax(-1, keepdim=True), torch.tensor([T + t]))[:, -1])
    return torch.stack(out)


CASES = [pytest.param(dict(), "symbolic_trace", id="gqa"),
         pytest.param(dict(n_query_groups=4), "symbolic_trace", id="mha"),
         pytest.param(dict(n_query_groups=1), "export", id="mqa-export"),
         pytest.param(dict(n_expert=3, dispatch="index_add"), "symbolic_trace", id="moe"),
         pytest.param(dict(n_expert=3), "export", id="moe-export"),
         pytest.param(dict(norm="own"), "symbolic_trace", id="own-norm"),
         pytest.param(dict(norm="own"), "export", id="own-norm-export")]


@pytest.mark.parametrize("kw,frontend", CASES)
def test_blocks_get_their_own_head_counts(kw, frontend):
    m = _model(**kw)
    x = torch.randint(0, 64, (1, 12))
    oto = otofx.OTO(m, x, frontend=frontend)
    config = copy.deepcopy(m.config)
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    small = oto.compress(form="module")
    assert type(small) is GPT
    assert n_params(small) == n_params(oto.compress(form="graph"))  # nothing kept for the class's sake
    assert m.config == config and all(b.attn.config is m.config for b in m.h)  # the user's model untouched
    heads = [(b.attn.config.n_head, b.attn.config.n_query_groups) for b in small.h]
    assert any(h != (config.n_head, config.n_query_groups) for h in heads)
    for b in small.h:
        c = b.attn.config
        assert b.attn.qkv.out_features == (c.n_head + 2 * c.n_query_groups) * c.head_size
        assert c.n_head % c.n_query_groups == 0
    assert small.config.n_head == config.n_head  # the model's own record still describes the dense model
    with torch.no_grad():
        other = torch.randint(0, 64, (2, 17))
        assert max_rel_diff(m(other), small(other)) < 1e-4
        prompt = torch.randint(0, 64, (2, 5))
        assert max_rel_diff(_decode(m, prompt), _decode(small, prompt)) < 1e-4
    if kw.get("n_expert") or kw.get("norm"):
        # the stream passes the experts' dispatch; a norm of the model's own class follows the new stream
        assert small.wte.embedding_dim < config.n_embd
        assert small.h[0].norm_1.normalized_shape == (small.wte.embedding_dim,)


def test_saved_and_loaded_with_their_records(tmp_path):
    m = _model()
    x = torch.randint(0, 64, (1, 12))
    oto = otofx.OTO(m, x)
    zero_random_rows(m, oto, seed=2, fraction=0.5)
    small = oto.compress(form="module")
    otofx.save(small, tmp_path)
    fresh = GPT(Config())
    loaded = otofx.load(tmp_path, model=fresh).eval()
    assert [b.attn.config for b in loaded.h] == [b.attn.config for b in small.h]
    assert loaded.config == Config()
    other = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(other), small(other))
        prompt = torch.randint(0, 64, (1, 4))
        assert max_rel_diff(_decode(small, prompt), _decode(loaded, prompt)) < 1e-6


def test_a_load_into_a_model_without_the_record_is_refused(tmp_path):
    m = _model()
    oto = otofx.OTO(m, torch.randint(0, 64, (1, 12)))
    zero_random_rows(m, oto, seed=2, fraction=0.5)
    otofx.save(oto.compress(form="module"), tmp_path)
    fresh = GPT(Config())
    fresh.h[1].attn.config = None
    before = [p.shape for p in fresh.parameters()]
    with pytest.raises(otofx.InputError, match="'config' of module 'h.1.attn' is a settings record"):
        otofx.load(tmp_path, model=fresh)
    assert [p.shape for p in fresh.parameters()] == before


def test_half_precision_and_training():
    m = _model(n_expert=2)
    oto = otofx.OTO(m, torch.randint(0, 64, (1, 12)))
    zero_random_rows(m, oto, seed=3, fraction=0.5)
    small = oto.compress(form="module")
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        ref, got = copy.deepcopy(m).to(torch.bfloat16)(x).float(), copy.deepcopy(small).to(torch.bfloat16)(x).float()
    assert max_rel_diff(ref, got) < 3e-2
    small.train()
    small(x).logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in small.h[0].attn.parameters())
