"""torch's own transformer blocks (nn.TransformerEncoder/Decoder and their layers, nn.Transformer).

* The default front-end traces through them (their reference path) instead of keeping them as
  opaque leaves: heads, feed-forward widths and the model width become groups.
* ``compress()`` returns the user's class: the stock layers run their forward with
  ``PrunedMultiheadAttention`` (its ``_qkv_same_embed_dim`` is False, so they skip the fused fast
  path that needs every head), exact against the zeroed model at other lengths, with masks.
* A compressed copy keeps the user's training flags (a replacement attention built fresh used to
  come back in training mode, so attention dropout ran at inference).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import otofx
from helpers import max_rel_diff, n_params, randomize, zero_random_rows
from otofx.passes.modules import PrunedMultiheadAttention

D = 16

pytestmark = pytest.mark.usefixtures("single_thread")


class Encoder(nn.Module):
    def __init__(self, norm_first: bool, batch_first: bool = True, activation: str = "relu"):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(5, D)
        layer = nn.TransformerEncoderLayer(D, 4, 32, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                                           activation=activation)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D) if norm_first else None,
                                         enable_nested_tensor=batch_first)
        self.out = nn.Linear(D, 3)

    def forward(self, x, mask=None, pad=None):
        return self.out(self.enc(self.inp(x), mask=mask, src_key_padding_mask=pad))


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.src, self.tgt = nn.Linear(5, D), nn.Linear(4, D)
        self.t = nn.Transformer(D, 4, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=24,
                                dropout=0.1, batch_first=True)
        self.out = nn.Linear(D, 3)

    def forward(self, src, tgt, tgt_mask=None):
        return self.out(self.t(self.src(src), self.tgt(tgt), tgt_mask=tgt_mask))


def _dense(model, *args, **kwargs):
    """The stock model's output on its reference path (the fused fast path needs no grad)."""
    with torch.enable_grad():
        return model(*args, **kwargs).detach()


def _compress(model, example, seed=0):
    oto = otofx.OTO(model, example)
    assert oto.frontend == "symbolic_trace"
    zero_random_rows(model, oto, seed=seed)
    return oto, oto.compress()


@pytest.mark.parametrize("norm_first,batch_first,activation", [(False, True, "relu"), (True, True, "gelu"),
                                                               (False, False, "gelu")])
def test_encoder_is_traced_and_compresses_to_its_own_class(norm_first, batch_first, activation):
    torch.manual_seed(0)
    model = randomize(Encoder(norm_first, batch_first, activation)).eval()
    shape = (2, 7, 5) if batch_first else (7, 2, 5)
    oto, small = _compress(model, torch.randn(shape))
    rows = sorted(z.rows for z in oto.groups)
    assert rows.count(4) == 2 and rows.count(32) == 2 and D in rows  # heads, FF widths, model width
    assert type(small) is Encoder and n_params(small) < n_params(model)
    assert all(type(l.self_attn) is PrunedMultiheadAttention for l in small.enc.layers)
    L = 9
    x = torch.randn((3, L, 5) if batch_first else (L, 3, 5))
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    pad = torch.zeros(3, L, dtype=torch.bool)
    pad[0, -3:] = True
    for kwargs in ({}, {"mask": causal}, {"pad": pad}):
        ref = _dense(model, x, **kwargs)
        with torch.no_grad():
            got = small(x, **kwargs)
        assert max_rel_diff(ref, got) <= 1e-4, kwargs
    if batch_first:
        # NB: in eval under no_grad the stock encoder runs padded batches as nested tensors (zeros at the
        # padded positions), which a pruned attention cannot take: the compressed encoder does not
        pad = torch.zeros(3, L, dtype=torch.bool)
        pad[:, -2:] = True
        with torch.no_grad():
            ref, got = model(x, pad=pad), small(x, pad=pad)
        assert max_rel_diff(ref[:, :-2], got[:, :-2]) <= 1e-4


def test_transformer_with_cross_attention_compresses_to_its_own_class():
    torch.manual_seed(0)
    model = randomize(Seq2Seq()).eval()
    oto, small = _compress(model, (torch.randn(2, 6, 5), torch.randn(2, 4, 4)))
    assert type(small) is Seq2Seq and n_params(small) < n_params(model)
    attn = [m for m in small.modules() if isinstance(m, PrunedMultiheadAttention)]
    assert len(attn) == 5  # encoder self, decoder self and cross (x2)
    src, tgt = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    ref = _dense(model, src, tgt, tgt_mask=mask)
    with torch.no_grad():
        got = small(src, tgt, tgt_mask=mask)
    assert max_rel_diff(ref, got) <= 1e-4


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, 4, dropout=0.5, batch_first=True)
        self.out = nn.Linear(D, 2)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("model_cls", [Attn, lambda: Encoder(False)])
def test_compressed_copy_keeps_the_users_eval_mode(model_cls, tmp_path):
    torch.manual_seed(0)
    model = randomize(model_cls()).eval()
    x = torch.randn(2, 6, D if model_cls is Attn else 5)
    oto, small = _compress(model, x)
    assert not any(m.training for m in small.modules())
    with torch.no_grad():
        a, b = small(x), small(x)
    assert torch.equal(a, b)  # no attention dropout at inference
    assert max_rel_diff(_dense(model, x), a) <= 1e-4
    otofx.save(small, tmp_path / "m")
    back = otofx.load(tmp_path / "m", model=model_cls().eval())  # its replaced modules too
    assert not any(m.training for m in back.modules())
    with torch.no_grad():
        assert torch.equal(back(x), a)
