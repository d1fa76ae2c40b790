"""RMS norms without a weight (NanoChat, modded-nanoGPT, HRM) leave the residual stream prunable.

``x / sqrt(mean(x ** 2) + eps)`` of a zero feature is zero, so the stream's features are rows. The
graph keeps the old divisor. The model's own forward divides by the new width; with c = sqrt(new / old)
it computes the old function when the layers writing the norms' inputs are scaled by c and the linear
layers reading the normalised values by 1 / c, eps untouched (``passes.resize.weightless_stream_fold``).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows


class Norm(nn.Module):
    """One RMS norm without a weight, spelled ``kind``."""

    def __init__(self, kind: str, eps: float = 1e-3):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.rms = nn.RMSNorm(16, eps=eps, elementwise_affine=False) if kind == "module" else None

    def forward(self, x):
        if self.kind == "written":  # NanoChat's: in float32, then back
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if self.kind == "literal":  # eps a literal of the forward, held by no attribute
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        if self.kind == "functional":  # modded-nanoGPT's: eps None (the dtype's machine epsilon)
            return F.rms_norm(x, (x.size(-1),))
        return self.rms(x)


class Block(nn.Module):
    def __init__(self, kind: str, post: bool):
        super().__init__()
        self.post = post
        self.norm = Norm(kind)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.o = nn.Linear(16, 16)
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16)
        self.norm2 = Norm(kind)

    def attend(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4, -1)
        return self.o(a @ self.v(x))

    def forward(self, x):
        if self.post:  # HRM's: the norm's output is the stream
            x = self.norm(x + self.attend(x))
            return self.norm2(x + self.down(F.gelu(self.up(x))))
        x = x + self.attend(self.norm(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class LM(nn.Module):
    def __init__(self, kind: str, post: bool = False, embed_norm: bool = False, final_norm: bool = True,
                 tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.start = nn.Parameter(torch.zeros(16))  # an initial state added to the stream (HRM's z_L_init)
        self.embed_norm = Norm(kind) if embed_norm else None
        self.blocks = nn.ModuleList([Block(kind, post) for _ in range(2)])
        self.final = Norm(kind) if final_norm else None
        self.head = nn.Linear(16, 40, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids) + self.start
        if self.embed_norm is not None:  # NanoChat's norm right after the embedding
            x = self.embed_norm(x)
        for b in self.blocks:
            x = b(x)
        if self.final is not None:
            x = self.final(x)
        return self.head(x[:, -5:])  # the positions an LM head keeps


def _ids(batch=2, seq=9, seed=0):
    return torch.randint(0, 40, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _stream_rows(oto):
    return sum(z.rows for z in oto.groups if any(name == "emb.weight" and d == 1 for name, d, _ in z.params))


@pytest.mark.parametrize("kind", ["written", "literal", "functional", "module"])
@pytest.mark.parametrize("shape", ["pre", "post", "embed_norm", "no_final"])
def test_stream_under_weightless_norms_is_pruned_in_its_own_class(kind, shape, recwarn):
    torch.manual_seed(0)
    model = LM(kind, post=shape == "post", embed_norm=shape == "embed_norm", final_norm=shape != "no_final").eval()
    randomize(model)
    oto = otofx.OTO(model, _ids())
    assert _stream_rows(oto) == 16, oto.report()
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is LM, [str(w.message) for w in recwarn]
    assert small.emb.weight.shape[1] < 16 and n_params(small) < n_params(model)
    for ids in (_ids(), _ids(3, 14, seed=5)):  # another batch and length than the example's
        with torch.no_grad():
            assert max_rel_diff(model(ids), small(ids)) < 1e-4
    # train mode (no dropout, no batch statistics here): the same function, gradients flow
    model.train(), small.train()
    out = small(_ids(seed=7))
    assert max_rel_diff(model(_ids(seed=7)), out) < 1e-4
    out.sum().backward()
    assert small.emb.weight.grad is not None


def test_the_users_model_is_left_alone():
    torch.manual_seed(0)
    model = LM("written", embed_norm=True).eval()
    randomize(model)
    oto = otofx.OTO(model, _ids())
    zero_random_rows(model, oto, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    oto.compress()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class Returns(LM):
    """Also returns the stream before its final norm."""

    def forward(self, ids):
        x = self.emb(ids) + self.start
        for b in self.blocks:
            x = b(x)
        return self.head(self.final(x)), x


@pytest.mark.parametrize("case", ["tied", "stream_returned"])
def test_no_scaling_exists_so_the_graph_form_is_exact(case, caplog):
    """A head tied to the embedding would need the table scaled by c and by 1 / c at once; a stream
    returned raw cannot scale at all: the own class keeps the stream's zero rows (with a warning
    naming the norm where it went wrong) and removes the heads and the MLP width; the graph form
    removes the stream too, exactly."""
    torch.manual_seed(0)
    model = (Returns("written") if case == "stream_returned" else LM("written", tied=True)).eval()
    randomize(model)
    oto = otofx.OTO(model, _ids())
    if case == "stream_returned":  # the raw stream is a model output: pinned
        assert _stream_rows(oto) == 0
        return
    assert _stream_rows(oto) == 16
    zero_random_rows(model, oto, seed=1)
    with caplog.at_level("WARNING", logger="otofx"):
        own = oto.compress()
    assert type(own) is LM and "keeps the 8 zero row(s) of 1 group(s)" in caplog.text, caplog.text
    assert "blocks.0.norm" in caplog.text and "bug in otofx" not in caplog.text
    assert own.emb.weight.shape == (40, 16) and own.head.weight is own.emb.weight
    graph = oto.compress(form="graph")
    assert isinstance(graph, torch.fx.GraphModule)
    assert sum(p.numel() for p in graph.parameters()) < sum(p.numel() for p in own.parameters())
    with torch.no_grad():
        for small in (own, graph):
            assert max_rel_diff(model(_ids(3, 11)), small(_ids(3, 11))) < 1e-4


def test_nanochat_hidden_width_is_pruned_and_loads_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NanoChatForCausalLM"):
        pytest.skip("this transformers has no NanoChat")
    cfg = transformers.NanoChatConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.NanoChatForCausalLM(cfg).eval()
    randomize(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    oto = otofx.OTO(model, ids)
    hidden = [z for z in oto.groups if any(n == "model.embed_tokens.weight" and d == 1 for n, d, _ in z.params)]
    assert sum(z.rows for z in hidden) == 32
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is type(model) and small.config.hidden_size < 32
    other = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(other).logits
        assert max_rel_diff(ref, small(other).logits) < 1e-4
        small.save_pretrained(tmp_path)
        again = type(model).from_pretrained(tmp_path).eval()
        assert max_rel_diff(ref, again(other).logits) < 1e-4


class ModdedGPT(nn.Module):
    """modded-nanoGPT's stream: ``x = x0 = norm(embed(idx))``, each block first mixes ``x`` with ``x0``
    by learnable scalars, U-net skips added back with learnable weights, an untied head with a logit
    soft-cap; every norm ``F.rms_norm(x, (x.size(-1),))``."""

    def __init__(self, layers: int = 4):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.blocks = nn.ModuleList([Block("functional", post=False) for _ in range(layers)])
        self.lambdas = nn.Parameter(torch.rand(layers, 2) + 0.3)
        self.skip_weights = nn.Parameter(torch.rand(layers // 2) + 0.3)
        self.head = nn.Linear(16, 40, bias=False)

    def forward(self, ids):
        e = self.emb(ids)
        x = x0 = F.rms_norm(e, (e.size(-1),))
        n, skips = len(self.blocks), []
        for i, b in enumerate(self.blocks):
            if i >= n // 2:
                x = x + self.skip_weights[i - n // 2] * skips.pop()
            x = b(self.lambdas[i, 0] * x + self.lambdas[i, 1] * x0)
            if i < n // 2:
                skips.append(x)
        logits = self.head(F.rms_norm(x, (x.size(-1),))).float()
        return 30 * torch.tanh(logits / 30)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_stream_mixed_with_the_normed_embedding_keeps_its_own_class(frontend):
    """``lambdas[1] * x0`` reads a norm's output that the walk had not reached yet: its scale must
    still be known to be the stream's (it was taken for an unknown factor, which lost the own class)."""
    torch.manual_seed(0)
    model = randomize(ModdedGPT()).eval()
    oto = otofx.OTO(model, _ids(), frontend=frontend)
    assert _stream_rows(oto) == 16, oto.report()
    zero_random_rows(model, oto, seed=1)
    small = oto.compress(form="module")
    assert type(small) is ModdedGPT and small.emb.weight.shape[1] < 16
    for ids in (_ids(), _ids(3, 14, seed=5)):
        with torch.no_grad():
            assert max_rel_diff(model(ids), small(ids)) < 1e-4


class ConvReader(nn.Module):
    """A norm without a weight whose output a Conv1d reads (not a linear layer, a sum or a norm)."""

    def __init__(self, kind: str):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.norm, self.norm2, self.final = Norm(kind), Norm(kind), Norm(kind)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 40)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.conv(self.norm(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.down(F.gelu(self.up(self.norm2(x))))
        return self.head(self.final(x))


@pytest.mark.parametrize("kind", ["written", "functional", "module"])
def test_a_norm_read_by_a_conv_pins_the_stream_whatever_its_spelling(kind):
    """The own class cannot scale around a norm a conv reads: every spelling of the norm pins its
    axis with the same reason and keeps the own class (``F.rms_norm`` and ``nn.RMSNorm`` freed the
    stream, and compress() gave up the own class for the graph)."""
    from otofx.passes.nodes import WEIGHTLESS_READ

    torch.manual_seed(0)
    model = randomize(ConvReader(kind)).eval()
    oto = otofx.OTO(model, _ids())
    assert _stream_rows(oto) == 0
    assert any(p.reason == WEIGHTLESS_READ for p in oto.pinned), [p.reason for p in oto.pinned]
    assert [z.rows for z in oto.groups] == [32]
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is ConvReader
    with torch.no_grad():
        assert max_rel_diff(model(_ids(3, 14, seed=5)), small(_ids(3, 14, seed=5))) < 1e-4


@pytest.mark.parametrize("hooked", [False, True], ids=["parametrizations", "deprecated_hook"])
def test_weight_normed_layers_around_the_norms_scale_their_gain(hooked):
    """Weight-normed q and MLP inputs read the normed stream, weight-normed o and MLP outputs and the
    head write or read it: W = g * v / ||v|| scales with g, so the fold scales g (it found no
    parameter named ``weight`` and gave up the own class)."""
    import warnings

    def wn(m):
        if not hooked:
            return nn.utils.parametrizations.weight_norm(m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return nn.utils.weight_norm(m)

    torch.manual_seed(0)
    model = LM("functional")
    for b in model.blocks:
        b.q, b.o, b.up, b.down = wn(b.q), wn(b.o), wn(b.up), wn(b.down)
    model.head = wn(model.head)
    model = randomize(model).eval()
    oto = otofx.OTO(model, _ids())
    assert _stream_rows(oto) == 16
    zero_random_rows(model, oto, seed=1)
    small = oto.compress()
    assert type(small) is LM and small.emb.weight.shape[1] < 16
    with torch.no_grad():
        assert max_rel_diff(model(_ids(3, 14, seed=5)), small(_ids(3, 14, seed=5))) < 1e-4


class _Mixer(nn.Module):
    """A hyper-connection's mixing weights from the stream (DeepSeek V4's, HY v4's): an RMS norm of the
    stream whose weight is a linear layer's, read before (``after=True``: ``linear(norm(x), W)``) or
    after the normalising product (``linear(x, W) * rsqrt(mean(x ** 2) + eps)``); eps on a child module."""

    class _Inv(nn.Module):
        def __init__(self, eps):
            super().__init__()
            self.variance_epsilon = eps

        def forward(self, x, times):
            r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return x * r if times else r

    def __init__(self, after: bool, eps: float = 0.3):
        super().__init__()
        self.after = after
        self.input_norm = self._Inv(eps)
        self.fn = nn.Parameter(torch.randn(3, 16) * 0.3)

    def forward(self, x):
        if self.after:
            return F.linear(self.input_norm(x, True), self.fn.float())
        return F.linear(x, self.fn.float()) * self.input_norm(x, False)


class _MixLM(nn.Module):
    def __init__(self, after: bool):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.mix = nn.ModuleList([_Mixer(after) for _ in range(2)])
        self.ln = nn.ModuleList([nn.RMSNorm(16, eps=1e-5) for _ in range(2)])
        self.up, self.down = nn.ModuleList([nn.Linear(16, 32) for _ in range(2)]), nn.ModuleList([nn.Linear(32, 16)
                                                                                             for _ in range(2)])
        self.head = nn.Linear(16, 40)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        x = self.emb(ids)
        for mix, ln, up, down in zip(self.mix, self.ln, self.up, self.down):
            g = torch.sigmoid(mix(x)).sum(-1, keepdim=True)  # a gate per token
            x = x + g * down(torch.relu(up(ln(x))))
        return self.head(x)


@pytest.mark.parametrize("after", [True, False])
def test_norm_folds_into_the_linear_layer_that_reads_it(after):
    """A norm (without a weight of its own) whose output one linear layer alone reads, on either side
    of the normalising product, is that linear layer's RMS norm: the own class refolds it (eps, on the
    module that holds it, times old/new; the layer's weight times sqrt(old/new)). A norm with a weight
    reads the stream too, so scaling the stream (the weightless fold) cannot serve it; eps 0.3 makes
    the refold matter."""
    torch.manual_seed(0)
    model = randomize(_MixLM(after).eval())
    oto = otofx.OTO(model, _ids())
    assert _stream_rows(oto) == 16, [p.reason for p in oto.pinned]
    zero_random_rows(model, oto, seed=0)
    small = oto.compress(form="module")
    assert type(small) is _MixLM and small.emb.weight.shape[1] == 8
    assert small.mix[0].input_norm.variance_epsilon == pytest.approx(0.6)
    for ids in (_ids(), _ids(3, 7, seed=1)):
        with torch.no_grad():
            assert max_rel_diff(model(ids), small(ids)) <= 1e-5


class _AltUp(nn.Module):
    """Gemma 3n's AltUp: copies of the stream projected from the first, each rescaled to the first's
    root mean square (``p * rms(h0) / sqrt(clamp(mean(p ** 2), eps))``), summed back after a block."""

    def __init__(self, eps: float = 0.05):
        super().__init__()
        self.eps = eps
        self.emb = nn.Embedding(40, 16)
        self.proj = nn.ModuleList([nn.Linear(16, 16, bias=False) for _ in range(2)])
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 40)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, ids):
        h0 = self.emb(ids)
        target = torch.mean(h0 ** 2, dim=-1, keepdim=True) ** 0.5
        copies = [h0]
        for p in self.proj:
            q = p(h0)
            mag = torch.sqrt(torch.mean(q ** 2, dim=-1, keepdim=True).clamp(min=self.eps))
            copies.append(q * target / mag)
        s = torch.stack(copies).sum(0)
        return self.head(s + self.down(torch.relu(self.up(s))))


def test_magnitude_match_keeps_its_clamp_in_the_own_class():
    """The two means of squares of a magnitude match are over the stream: the graph keeps their old
    divisor, the own class scales the layer producing each projected copy by sqrt(new/old), so the
    clamp (its threshold a literal) sees what it saw: exact where eps binds too (0.05 here)."""
    torch.manual_seed(0)
    model = randomize(_AltUp().eval())
    with torch.no_grad():
        model.proj[0].weight.mul_(0.2)  # NB: some tokens' copy below the clamp
    oto = otofx.OTO(model, _ids())
    assert _stream_rows(oto) == 16, [p.reason for p in oto.pinned]
    zero_random_rows(model, oto, seed=0)
    small = oto.compress(form="module")
    assert type(small) is _AltUp and small.emb.weight.shape[1] == 8
    for ids in (_ids(), _ids(3, 7, seed=1)):
        with torch.no_grad():
            assert max_rel_diff(model(ids), small(ids)) <= 1e-5
